"""No hangs: when one rank fails mid-generation, the others end in time, non-zero, naming it.

The launched runs are real 2-rank generations (tests/fault_worker.py) in which rank 1 raises,
or SIGKILLs itself, at its 200th of about 330 all-gathers, under torchrun (gloo) and under
MPICH, Open MPI 4.1 and Open MPI 5.0. NCCL cannot run here; its settings are checked directly.
"""

from __future__ import annotations

import os
import re
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from backends import CollectiveTimeout, PeerFailure
from backends.torch_dist import TorchCommunicator, _translate
from launchers import LAUNCHERS, backend_of, run_ranks

WORKER = Path(__file__).with_name("fault_worker.py")
TIMEOUT = 20.0  # backend.timeout of the runs: the others must be gone within it
# torchrun polls its ranks every 0.1 s and SIGTERMs the others as soon as one has died; polling
# every 5 s instead lets the survivor show that it stops on its own, with its own message.
TORCHRUN_ARGS = ("--monitor-interval=5",)


def names_failed_rank(launcher: str, mode: str, output: str) -> bool:
    """Whether the run's output names rank 1 as the one that failed; who says it depends on the launcher."""
    if launcher == "torch":
        return "rank 0: rank 1 failed or left" in output  # the survivor's PeerFailure
    if mode == "raise":
        return "rank 1: aborting the MPI job" in output  # the failing rank, before MPI_Abort
    if launcher == "mpich":  # mpiexec names the dead pid; rank 0 logged each rank's host:pid
        pid = re.search(r"PID (\d+) RUNNING AT", output)
        return pid is not None and re.search(rf"\b1=\S+:{pid[1]}\b", output) is not None
    return "process rank 1 with PID" in output  # Open MPI's mpirun


@pytest.mark.parametrize("mode", ["raise", "kill"])
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_when_one_rank_fails_the_others_end_in_time_naming_it(launcher, mode, tmp_path):
    proc = run_ranks(
        launcher, 2, str(WORKER), mode, "1", "200", f"backend={backend_of(launcher)}",
        f"backend.timeout={TIMEOUT:g}", "parallel.split_cfg=false", "sampler.steps=5", f"output_dir={tmp_path}",
        timeout=240, launcher_args=TORCHRUN_ARGS if launcher == "torch" else (),
    )
    ended = time.time()
    output = proc.stdout + proc.stderr
    fault = re.search(r"FAULT rank 1 \w+ at ([\d.]+)", output)
    assert fault is not None, f"rank 1 never reached the fault:\n{output[-3000:]}"
    assert proc.returncode != 0, output[-3000:]
    assert ended - float(fault[1]) < TIMEOUT, f"the job ended {ended - float(fault[1]):.1f}s after the fault"
    assert names_failed_rank(launcher, mode, output), output[-3000:]


@pytest.mark.parametrize("error,expected,message", [
    ("Connection closed by peer [127.0.0.1]:4242", PeerFailure, "rank 2: rank 0 failed or left (Connection"),
    ("Timed out waiting 3000ms for recv operation to complete", CollectiveTimeout, "rank 2: Timed out waiting"),
])
def test_torch_errors_become_ours_naming_the_peer(error, expected, message):
    translated = _translate(RuntimeError(error), 2, [0])
    assert type(translated) is expected and str(translated).startswith(message)
    assert "one of ranks [0, 1, 3] failed" in str(_translate(RuntimeError("Connection reset by peer"), 2, [0, 1, 3]))


@pytest.mark.parametrize("backend,waited_with", [("nccl", ()), ("gloo", (timedelta(seconds=7),))])
def test_torch_backend_timeout_reaches_the_process_group_and_the_waits(monkeypatch, backend, waited_with):
    """Both backends get the timeout at init; gloo waits with it on the host, while NCCL waits on
    the stream (a host wait would stall overlap) and relies on the watchdog to tear down."""
    init = {}
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "unset")  # restored after the test
    monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda name, **kwargs: init.update(backend=name, **kwargs))
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    comm = TorchCommunicator(backend=backend, device="cuda" if backend == "nccl" else "cpu", timeout=7)
    assert init == {"backend": backend, "timeout": timedelta(seconds=7)}
    assert os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING") == ("3" if backend == "nccl" else None)

    waits = []

    class Handle:
        def wait(self, *args):
            waits.append(args)

    comm._finish(Handle(), torch.ones(1)).wait()
    assert waits == [waited_with]
