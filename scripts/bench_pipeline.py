"""End-to-end speed of `fervid analyze` on real clips: frames/s with start-up included, and time per stage.

    python -m scripts.bench_pipeline [--videos ../shared/videos/*.mp4 ...] [--fps 0] [--device cpu] [--model small]

Each clip runs as a fresh `fervid analyze` process (so start-up, model loading and the database are counted)
against a throw-away SQLite file. Stage times come from the job's own timings; decoding runs in a background
thread, overlapping the other stages. Prints a Markdown table headed by the machine, the date and the command.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scripts.bench_models import command_line, machine

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_videos = sorted(glob.glob(str(ROOT.parent / "shared" / "videos" / "*.mp4")) +
                            glob.glob(str(ROOT.parent / "shared" / "videos" / "*.mov")))  # fmt: skip
    p.add_argument("--videos", nargs="+", default=default_videos)
    p.add_argument("--fps", default="0", help="sampling rate passed to fervid analyze (0 = every frame)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="small")
    p.add_argument("--extra", default="", help="more arguments for fervid analyze, e.g. '--min-face 60'")
    args = p.parse_args()
    import torch

    print(f"Machine: {machine(torch.device(args.device))}; {datetime.date.today()}")
    print(f"Command: `{command_line()}`\n")
    stages = ["decode", "detect", "crop", "classify", "write"]
    print("| clip | size | frames | faces | wall s (start-up incl.) | frames/s | faces/s | "
          + " | ".join(f"{s} s" for s in stages) + " |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(stages))
    with tempfile.TemporaryDirectory() as tmp:
        for video in args.videos:
            out = Path(tmp) / "t.json"
            cmd = [
                sys.executable,
                "-m",
                "fervid.cli",
                "analyze",
                video,
                "--fps",
                args.fps,
                "--device",
                args.device,
                "--model",
                args.model,
                "--db",
                f"sqlite:///{tmp}/b.db",
                "--json",
                str(out),
                *args.extra.split(),
            ]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                print(f"| {Path(video).name} | failed: {proc.stderr.strip().splitlines()[-1:]} |")
                continue
            job = json.loads(out.read_text())["jobs"][0]
            n_frames = len({r["frame"] for r in job["rows"]})
            n_faces = sum(r["face"] is not None for r in job["rows"])
            tm = job["timings"]
            print(f"| {Path(video).name} | {job['width']}x{job['height']} | {n_frames} | {n_faces} | {wall:.2f} | "
                  f"{n_frames / wall:.1f} | {n_faces / wall:.1f} | "
                  + " | ".join(f"{tm.get(s, 0):.2f}" for s in stages) + " |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
