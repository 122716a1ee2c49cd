"""`fervid worker`: one Celery worker process per GPU (pinned with CUDA_VISIBLE_DEVICES), or N CPU workers.

Each process takes one segment at a time (prefork pool of one child): the models load in the child, after the
fork (CUDA must not be initialised before a fork), and a child killed mid-segment sends its message back to the
queue at once. Processes that exit are restarted; Ctrl-C or SIGTERM stops them all.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from model.errors import FervidError


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


def worker_commands(gpus: str | None, concurrency: int, loglevel: str = "INFO") -> list[tuple[str, dict]]:
    """(name, environment) of each worker process to start."""
    ids = _gpus(gpus)
    base = os.environ.copy()
    procs = []
    if ids:
        for g in ids:
            procs.append((f"fervid-gpu{g}", base | {"CUDA_VISIBLE_DEVICES": g, "FERVID_DEVICE": "cuda"}))
    else:
        threads = max(1, (os.cpu_count() or 1) // max(concurrency, 1))
        for i in range(max(concurrency, 1)):
            env = base | {"CUDA_VISIBLE_DEVICES": "", "FERVID_DEVICE": "cpu", "OMP_NUM_THREADS": str(threads)}
            procs.append((f"fervid-cpu{i}", env))
    return procs


def _start(name: str, env: dict, loglevel: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool", "prefork",
           "--concurrency", "1", "--hostname", f"{name}@%h", "--loglevel", loglevel, "-Q", "fervid",
           "--without-gossip", "--without-mingle", "--without-heartbeat"]  # fmt: skip
    return subprocess.Popen(cmd, env=env)


def run(gpus: str | None, concurrency: int, loglevel: str = "INFO") -> int:
    specs = worker_commands(gpus, concurrency, loglevel)
    procs = {name: _start(name, env, loglevel) for name, env in specs}
    envs = dict(specs)
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"fervid worker: started {', '.join(procs)}", flush=True)
    while True:
        time.sleep(1)
        for name, p in list(procs.items()):
            if p.poll() is not None and not stopping:
                print(f"fervid worker: {name} exited ({p.returncode}); restarting it", file=sys.stderr, flush=True)
                time.sleep(2)
                procs[name] = _start(name, envs[name], loglevel)
        if stopping and all(p.poll() is not None for p in procs.values()):
            return 0
