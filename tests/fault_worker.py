"""`python -m distrifusion` with one rank failing on purpose mid-generation, for tests/test_faults.py.

`python tests/fault_worker.py MODE RANK AT [overrides...]`: run the app with `overrides`; rank
RANK, on reaching its AT-th all-gather, raises (MODE=raise) or sends itself SIGKILL (MODE=kill),
after printing `FAULT rank RANK MODE at <unix time>` so the test can time how fast the others end.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import time

from backends.base import Communicator


def inject(mode: str, rank: int, at: int) -> None:
    """Make every communicator of this process fail at its AT-th all-gather if it is rank RANK."""
    all_gather = Communicator.all_gather
    calls = [0]

    def failing_all_gather(self: Communicator, *args, **kwargs):
        if self.rank == rank:
            calls[0] += 1
            if calls[0] == at:
                print(f"FAULT rank {rank} {mode} at {time.time():.3f}", flush=True)
                if mode == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError(f"rank {rank} failed on purpose at all-gather {at}")
        return all_gather(self, *args, **kwargs)

    Communicator.all_gather = failing_all_gather


if __name__ == "__main__":
    mode, rank, at, *overrides = sys.argv[1:]
    if mode not in ("raise", "kill"):
        sys.exit(f"MODE must be raise or kill, not {mode!r}")
    inject(mode, int(rank), int(at))
    sys.argv = [sys.argv[0], *overrides]
    runpy.run_module("distrifusion", run_name="__main__", alter_sys=True)
