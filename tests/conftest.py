"""Test set-up: make `tests/` importable (shared check modules) and keep the hub offline."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
