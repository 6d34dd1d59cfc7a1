"""Test set-up: make `tests/` importable (shared check modules), keep the hub offline, and
one simulator trace cache for the session."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """One simulator trace cache for the session: the simulator's test files (and the app's
    subprocesses they start) record each trace once between them."""
    return tmp_path_factory.mktemp("traces")
