"""End-to-end speed of `fervid analyze` on real clips: frames/s with start-up included, and time per stage.

    python -m scripts.bench_pipeline [--videos ../shared/videos/*.mp4 ...] [--fps 0] [--device cpu] [--model small]
    python -m scripts.bench_pipeline --videos ../shared/videos/pyfeat_WolfgangLanger_Pexels.mp4 \
        --model small medium-distilled --repeat 5     # models side by side: rounds alternate their order

Each clip runs as a fresh `fervid analyze` process (so start-up, model loading and the database are counted)
against a throw-away SQLite file. Stage times come from the job's own timings; decoding runs in a background
thread, overlapping the other stages. Prints a Markdown table headed by the machine, the date and the command;
with several models, a second table of each model's median frames/s per clip against the first model's.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import statistics
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
    p.add_argument("--model", nargs="+", default=["small"], help="one or more models, run side by side")
    p.add_argument("--repeat", type=int, default=1, help="rounds over every clip and model")
    p.add_argument("--extra", default="", help="more arguments for fervid analyze, e.g. '--min-face 60'")
    args = p.parse_args()
    import torch

    print(f"Machine: {machine(torch.device(args.device))}; {datetime.date.today()}")
    print(f"Command: `{command_line()}`\n")
    stages = ["decode", "detect", "crop", "classify", "write"]
    print("| clip | model | size | frames | faces | wall s (start-up incl.) | frames/s | faces/s | "
          + " | ".join(f"{s} s" for s in stages) + " |")  # fmt: skip
    print("|---|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(stages))
    rates: dict[tuple[str, str], list[float]] = {}
    runs = [(video, model) for r in range(args.repeat) for video in args.videos
            for model in (args.model if r % 2 == 0 else args.model[::-1])]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for video, model in runs:
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
                model,
                "--db",
                f"sqlite:///{tmp}/b.db",
                "--json",
                str(out),
                *args.extra.split(),
            ]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            wall = time.perf_counter() - t0
            Path(tmp, "b.db").unlink(missing_ok=True)
            if proc.returncode != 0:
                print(f"| {Path(video).name} | {model} | failed: {proc.stderr.strip().splitlines()[-1:]} |")
                continue
            job = json.loads(out.read_text())["jobs"][0]
            n_frames = len({r["frame"] for r in job["rows"]})
            n_faces = sum(r["face"] is not None for r in job["rows"])
            tm = job["timings"]
            rates.setdefault((Path(video).name, model), []).append(n_frames / wall)
            print(f"| {Path(video).name} | {model} | {job['width']}x{job['height']} | {n_frames} | {n_faces} | "
                  f"{wall:.2f} | "
                  f"{n_frames / wall:.1f} | {n_faces / wall:.1f} | "
                  + " | ".join(f"{tm.get(s, 0):.2f}" for s in stages) + " |", flush=True)  # fmt: skip
    if len(args.model) > 1:
        print(f"\n| clip | model | runs | median frames/s | against {args.model[0]} |")
        print("|---|---|---:|---:|---:|")
        for video in args.videos:
            base = rates.get((Path(video).name, args.model[0]))
            for model in args.model:
                got = rates.get((Path(video).name, model))
                if not got:
                    continue
                ratio = f"{statistics.median(got) / statistics.median(base):.1%}" if base else "-"
                print(f"| {Path(video).name} | {model} | {len(got)} | {statistics.median(got):.1f} | {ratio} |")


if __name__ == "__main__":
    main()
