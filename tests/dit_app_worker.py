"""Run under torchrun or mpiexec by tests/test_dit_app.py: `python tests/dit_app_worker.py BACKEND OVERRIDE...`.

Every rank runs the app's own rank function (`run_rank`: the config check, the generation, rank
0's image and report) for each tiny DiT in turn, with the overrides given, in one launch: the
ranks import torch and diffusers once for the three models instead of once each.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import backends  # noqa: E402
from distrifusion.__main__ import run_rank  # noqa: E402
from distrifusion.config import backend_options  # noqa: E402
from test_bad_input import config  # noqa: E402

DITS = ("pixart", "sd3", "flux")


def main(backend: str, overrides: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout)  # as the app's Hydra logging does
    configs = [config(f"backend={backend}", f"model={model}", *overrides) for model in DITS]

    def run(comm: backends.Communicator) -> None:
        for cfg in configs:
            run_rank(comm, cfg)

    backends.launch(backend, run, **backend_options(configs[0]))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
