"""`fervid worker`: one Celery worker process per GPU (pinned with CUDA_VISIBLE_DEVICES), or N CPU workers.

Each process takes one segment at a time (prefork pool of one child): the models load in the child, after the
fork (CUDA must not be initialised before a fork), and a child killed mid-segment sends its message back to the
queue at once. Processes that exit are restarted. Ctrl-C or SIGTERM (docker stop) stops them all: each pool child
hands its segment back between two batches (a second or so), well inside Docker's stop grace period.

This process also runs the sweeper (worker.queue.sweeper), which recovers what dead workers and lost messages leave.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fervid.errors import FervidError
from fervid.worker.settings import Options

# The Celery application each worker process runs (module path, as `celery -A` takes it).
CELERY_APP = "fervid.worker.queue.celery_app"


def _gpus(spec: str | None) -> list[str]:
    if spec is None or spec == "all":
        try:
            import torch

            n = torch.cuda.device_count()
        except ImportError:
            n = 0
        if spec == "all" and n == 0:
            raise FervidError("--gpus all: PyTorch sees no CUDA GPU")
        return [str(i) for i in range(n)]
    if spec in ("", "none", "cpu"):
        return []
    ids = [g.strip() for g in spec.split(",") if g.strip()]
    if not all(g.isdigit() for g in ids):
        raise FervidError(f"--gpus takes all, none or a list like 0,1 (got {spec!r})")
    return ids


def threads_per_worker(concurrency: int) -> int:
    """Torch threads of each CPU worker process: the cores shared out."""
    return max(1, (os.cpu_count() or 1) // max(concurrency, 1))


def worker_commands(gpus: str | None, concurrency: int, loglevel: str = Options.loglevel) -> list[tuple[str, dict]]:
    """(name, environment) of each worker process to start."""
    ids = _gpus(gpus)
    base = os.environ.copy()
    procs = []
    if ids:
        for g in ids:
            procs.append((f"fervid-gpu{g}", base | {"CUDA_VISIBLE_DEVICES": g, "FERVID_DEVICE": "cuda"}))
    else:
        threads = threads_per_worker(concurrency)
        for i in range(max(concurrency, 1)):
            env = base | {"CUDA_VISIBLE_DEVICES": "", "FERVID_DEVICE": "cpu", "OMP_NUM_THREADS": str(threads)}
            procs.append((f"fervid-cpu{i}", env))
    return procs


def _start(name: str, env: dict, loglevel: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "celery", "-A", CELERY_APP, "worker", "--pool", "prefork",
           "--concurrency", "1", "--hostname", f"{name}@%h", "--loglevel", loglevel, "-Q", "fervid",
           "--without-gossip", "--without-mingle", "--without-heartbeat"]  # fmt: skip
    return subprocess.Popen(cmd, env=env)


def _children(pid: int) -> list[int]:
    """The child processes of `pid` (Linux /proc): the prefork pool of a Celery worker."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _start_sweeper():  # noqa: ANN202
    """The sweeper thread; None when the database cannot be opened yet (the workers wait for it too)."""
    import logging

    from fervid.worker.queue.celery_app import PRIORITY_STEPS, QUEUE, SEP, broker_url
    from fervid.worker.queue.sweeper import RedisView, Sweeper
    from fervid.worker.queue.tasks import send
    from fervid.worker.settings import QueuePolicy
    from fervid.worker.store.db import open_database

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s: %(levelname)s/sweeper] %(message)s")
    try:
        sessions = open_database()
    except FervidError as e:
        print(f"fervid worker: sweeper not started: {e}", file=sys.stderr, flush=True)
        return None
    sweeper = Sweeper(sessions, QueuePolicy.from_env(), lambda j, r, idxs, pr: send(sessions, j, r, idxs, pr),
                      lambda: RedisView(broker_url(), QUEUE, PRIORITY_STEPS, SEP))  # fmt: skip
    sweeper.start()
    return sweeper


def run(gpus: str | None, concurrency: int = Options.concurrency, loglevel: str = Options.loglevel) -> int:
    from fervid.worker.pipeline.media import media_roots

    media_roots()  # a worker that may read no video would fail every segment it takes: refuse to start instead
    specs = worker_commands(gpus, concurrency, loglevel)
    procs = {name: _start(name, env, loglevel) for name, env in specs}
    envs = dict(specs)
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for p in procs.values():
            if p.poll() is None:
                # The pool children too: each hands its segment back instead of running it to the end.
                for child in _children(p.pid):
                    try:
                        os.kill(child, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
                p.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"fervid worker: started {', '.join(procs)}", flush=True)
    sweeper, sweeper_tried = None, 0.0
    while True:
        if sweeper is None and not stopping and time.monotonic() - sweeper_tried > 15:
            sweeper_tried = time.monotonic()
            sweeper = _start_sweeper()
        time.sleep(1)
        for name, p in list(procs.items()):
            if p.poll() is not None and not stopping:
                print(f"fervid worker: {name} exited ({p.returncode}); restarting it", file=sys.stderr, flush=True)
                time.sleep(2)
                procs[name] = _start(name, envs[name], loglevel)
        if stopping and all(p.poll() is not None for p in procs.values()):
            if sweeper is not None:
                sweeper.stop()
            return 0
