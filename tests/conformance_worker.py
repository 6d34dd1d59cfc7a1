"""Run under torchrun or mpiexec by the tests: `python tests/conformance_worker.py BACKEND SCENARIO`.

Scenarios: `conformance` (every check; under MPI it first prints the MPI library it runs on),
`timeout` (rank 1 stalls past the timeout: rank 0 must raise CollectiveTimeout), `world_size`
(asks for 5 ranks: must fail clearly).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import backends  # noqa: E402
from backends import CollectiveTimeout  # noqa: E402
from conformance import DTYPES, run_all  # noqa: E402

INTEGERS = (torch.int64, torch.int32)
REDUCIBLE = {"torch": DTYPES, "mpi": (torch.float32, *INTEGERS)}


def check_mpi_refuses_16_bit_reductions(comm: backends.Communicator) -> None:
    """MPI has no portable 16-bit float reductions: the backend must say so, not send garbage."""
    from mpi4py import MPI

    if comm.rank == 0:
        print(f"MPI library: {MPI.Get_library_version().splitlines()[0]}", flush=True)
    for dtype in (torch.float16, torch.bfloat16):
        try:
            comm.all_reduce(torch.ones(2, dtype=dtype))
        except TypeError as e:
            assert "cannot reduce" in str(e), e
        else:
            raise AssertionError(f"the mpi backend reduced {dtype}")


def main(name: str, scenario: str) -> None:
    if scenario == "world_size":
        backends.create(name, world_size=5)
    timeout = 3.0 if scenario == "timeout" else 60.0

    def body(comm):
        if scenario == "conformance":
            if name == "mpi":
                check_mpi_refuses_16_bit_reductions(comm)
            n = run_all(comm, REDUCIBLE[name])
            print(f"rank {comm.rank}/{comm.world_size}: {n} checks passed", flush=True)
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
