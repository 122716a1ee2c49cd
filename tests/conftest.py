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


@pytest.fixture
def pg_url():
    """A fresh PostgreSQL database for one test (the server from FERVID_TEST_PG, default the local one)."""
    import uuid

    import psycopg

    base = os.environ.get("FERVID_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
    name = f"fervid_test_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect(base, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as e:
        pytest.fail(f"PostgreSQL is not reachable at {base}: {e}")
    admin.execute(f'CREATE DATABASE "{name}"')
    url = base.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + "/" + name
    yield url
    admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()
