from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FERVID_SHARED", ROOT.parent / "shared"))


def shared_path(*parts: str) -> Path:
    """A file from ../shared. Missing data fails the test (never skips): CI must notice."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.fail(f"test data missing: {path} (set FERVID_SHARED to the shared/ folder)")
    return path


@pytest.fixture(scope="session")
def fer_npz() -> Path:
    return shared_path("data", "fer2013", "fer2013.npz")


def run_cli(*args: str, check: bool = False, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the installed `fervid` command the way a user would."""
    proc = subprocess.run(
        [sys.executable, "-m", "fervid.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"fervid {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc
