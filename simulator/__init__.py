"""Discrete-event simulator of DistriFusion's patch-parallel inference.

`simulate(trace, hardware, steps)` replays a recorded trace (compute segments and the
collectives between them, per rank) on a modelled device and interconnect and returns a
`SimResult` (latency, compute and communication time, exposed communication, bytes sent).
Hardware presets live in `conf/hardware/*.yaml` (`load_hardware`); a `CalibrationProfile`
swaps roofline op times for measured ones. `chrome_trace` and `sweep` write the timeline and
sweep results.
"""

from .compute_model import CalibrationProfile
from .engine import SimResult, Span, simulate
from .hardware import Hardware, available_hardware, load_hardware

__all__ = ["simulate", "SimResult", "Span", "load_hardware", "available_hardware", "Hardware", "CalibrationProfile"]
