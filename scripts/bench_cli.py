"""Wall time of `fervid` commands as a user runs them (a new process each time): the median of --runs.

    python -m scripts.bench_cli [--runs 5] [--data ../shared/data/fer2013/fer2013.npz]

Prints a table with the CPU it ran on. To compare with an earlier commit, check that commit out and run a copy of
this script (the editable install runs whatever the checkout holds).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import subprocess
import sys
import tempfile
import time

from fervid.model.device import cpu_features, cpu_name


def timed(cmd: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="runs of each quick command (the evaluations run once)")
    p.add_argument("--data", default="../shared/data/fer2013/fer2013.npz")
    args = p.parse_args()
    fervid = [sys.executable, "-m", "fervid.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        db = f"sqlite:///{tmp}/bench.db"
        subprocess.run([*fervid, "status", "--db", db], check=True, capture_output=True)  # the file, created once
        evals = [*fervid, "eval", "--data", args.data, "--split", "PrivateTest", "--json"]
        rows = [
            ("fervid status (an empty SQLite file)", timed([*fervid, "status", "--db", db], args.runs), args.runs),
            ("fervid eval --model small --tta all", timed([*evals, "--model", "small", "--tta", "all"], 1), 1),
            ("fervid eval --model medium-distilled --tta flip",
             timed([*evals, "--model", "medium-distilled", "--tta", "flip"], 1), 1),
        ]  # fmt: skip
    features = ", ".join(k for k, v in cpu_features().items() if v) or "no AVX-512"
    print(f"{cpu_name()} ({features}), {os.cpu_count()} cores, {dt.date.today()}: `{' '.join(['python', *sys.argv])}`")
    print(f"{'command':<50} {'runs':>4} {'median s':>9}")
    for name, seconds, runs in rows:
        print(f"{name:<50} {runs:>4} {seconds:>9.2f}")


if __name__ == "__main__":
    main()
