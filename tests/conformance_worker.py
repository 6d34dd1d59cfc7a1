"""Run under torchrun or mpiexec by the tests: `python tests/conformance_worker.py BACKEND SCENARIO`.

Scenarios: `conformance` (every check), `crash` (rank 1 raises mid-run: the job must end,
not hang), `timeout` (rank 1 stalls past the timeout: rank 0 must raise CollectiveTimeout),
`world_size` (asks for 5 ranks: must fail clearly).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import backends  # noqa: E402
from backends import CollectiveTimeout  # noqa: E402
from conformance import run_all  # noqa: E402

REDUCIBLE = {"torch": (torch.float32, torch.float16, torch.bfloat16), "mpi": (torch.float32,)}


def main(name: str, scenario: str) -> None:
    if scenario == "world_size":
        backends.create(name, world_size=5)
    timeout = 3.0 if scenario == "timeout" else 60.0

    def body(comm):
        if scenario == "conformance":
            n = run_all(comm, REDUCIBLE[name])
            print(f"rank {comm.rank}/{comm.world_size}: {n} checks passed", flush=True)
        elif scenario == "crash":
            comm.all_gather(torch.ones(4))
            if comm.rank == 1:
                raise RuntimeError("rank 1 crashed on purpose")
            comm.all_gather(torch.ones(4))
        elif scenario == "timeout":
            if comm.rank == 1:
                time.sleep(timeout * 4)
            try:
                comm.all_gather(torch.ones(4))
            except CollectiveTimeout as e:
                print(f"CollectiveTimeout: {e}", flush=True)
                raise

    backends.launch(name, body, timeout=timeout)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
