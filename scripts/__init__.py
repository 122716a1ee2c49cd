"""Operational scripts, run as `python -m scripts.NAME`."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The read-only data beside the checkout (FER2013, clips); FERVID_SHARED points elsewhere, as for the tests.
SHARED = Path(os.environ.get("FERVID_SHARED", ROOT.parent / "shared"))
