from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FERVID_SHARED", ROOT.parent / "shared"))
T = TypeVar("T")
pytest_plugins = ["tests.cluster"]  # the queue tests' fixtures: redis, cluster, proxied

# Under pytest-xdist (scripts/test.sh) each worker takes one file at a time, in collection order. The longest files
# go first (as `--durations` measured them), so that the fault tests, which mostly wait, overlap with everything
# else, and the short files even out the two workers' ends instead of a long one ending the run alone.
LONGEST_FIRST = ("test_chaos.py", "test_queue_faults.py", "test_training.py", "test_eval.py", "test_queue.py",
                 "test_ensemble.py")  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the others keep their order


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist each worker process gets a FERVID_HOME of its own: commands run without --db use the
    SQLite file there, and two workers must not share one."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        import tempfile

        home = Path(os.environ.get("FERVID_HOME") or tempfile.mkdtemp(prefix="fervid-tests-")) / worker
        home.mkdir(parents=True, exist_ok=True)
        os.environ["FERVID_HOME"] = str(home)


def shared_path(*parts: str) -> Path:
    """A file from ../shared. Missing data fails the test (never skips): CI must notice."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.fail(f"test data missing: {path} (set FERVID_SHARED to the shared/ folder)")
    return path


@pytest.fixture(scope="session")
def fer_npz() -> Path:
    return shared_path("data", "fer2013", "fer2013.npz")


def ffmpeg(*args: str) -> None:
    """Run the ffmpeg of imageio-ffmpeg (a dev dependency): odd videos made on the spot."""
    import imageio_ffmpeg

    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


def free_port() -> int:
    """A local TCP port nothing listens on (for a server a test starts, or one that must be refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """The first true value of `condition()`, polled until `timeout` seconds have passed; fails the test after."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {what}")
        time.sleep(interval)


def row_counts(sessions, job_id: int) -> tuple[int, int]:  # noqa: ANN001
    """(frames, faces) stored for a job."""
    from sqlalchemy import func, select

    from fervid.worker.store.schema import Face, Frame

    with sessions() as s:
        return tuple(s.scalar(select(func.count()).select_from(t).where(t.job_id == job_id)) for t in (Frame, Face))


@pytest.fixture(scope="session")
def analyzer():  # noqa: ANN201
    """The shipped default model and the detector on the CPU, loaded once for the whole run."""
    from fervid.worker.pipeline.frames_to_rows import Analyzer

    return Analyzer("small", "cpu")


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
