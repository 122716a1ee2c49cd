"""Faces per second of each emotion model in batches, preprocessing included (uint8 faces in, probabilities out).

    python -m scripts.bench_models [--device cpu|cuda] [--batches 1 32 256] [--seconds 3]

Prints a Markdown table headed by the machine, the date and the command, ready for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time

import torch

from fervid.model.loader import optimize_for_inference
from fervid.model.predict import predict_proba
from fervid.model.registry import ARCHITECTURES, create_model


def faces_per_second(net: torch.nn.Module, batch: int, device: torch.device, seconds: float) -> float:
    faces = torch.randint(0, 256, (batch, 48, 48), dtype=torch.uint8, device=device)
    for _ in range(3):
        predict_proba(net, faces, batch_size=batch)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        predict_proba(net, faces, batch_size=batch)
        n += batch
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def command_line() -> str:
    """How this script was run, as a user would type it (python -m scripts.NAME ARGS)."""
    import pathlib

    return " ".join(["python -m scripts." + pathlib.Path(sys.argv[0]).stem, *sys.argv[1:]])


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", nargs="+", default=list(ARCHITECTURES))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32, 256])
    p.add_argument("--seconds", type=float, default=3.0)
    args = p.parse_args()
    device = torch.device(args.device)
    print(f"Machine: {machine(device)}; torch {torch.__version__}; {datetime.date.today()}")
    print(f"Command: `{command_line()}`\n")
    print("| model | " + " | ".join(f"batch {b}" for b in args.batches) + " |")
    print("|---|" + "---:|" * len(args.batches))
    for name in args.models:
        net = optimize_for_inference(create_model(name)).to(device).to(memory_format=torch.channels_last)
        rates = [faces_per_second(net, b, device, args.seconds) for b in args.batches]
        print(f"| {name} | " + " | ".join(f"{r:,.0f} faces/s" for r in rates) + " |", flush=True)


if __name__ == "__main__":
    main()
