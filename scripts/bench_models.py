"""Faces per second of each emotion model in batches, preprocessing included (uint8 faces in, probabilities out).

    python -m scripts.bench_models [--device cpu|cuda] [--batches 1 32 256] [--seconds 3] [--precisions fp32 auto]

Prints a Markdown table headed by the machine, the date and the command, ready for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time

import torch

from fervid.model.config import DEFAULT_PRECISION, PRECISIONS
from fervid.model.device import cpu_features, cpu_name, resolve_precision
from fervid.model.loader import optimize_for_inference
from fervid.model.predict import predict_proba
from fervid.model.registry import ARCHITECTURES, create_model


def faces_per_second(net: torch.nn.Module, batch: int, device: torch.device, seconds: float,
                     precision: str = "fp32") -> float:  # fmt: skip
    """Faces through `net` per second at `batch`, in "fp32" or "bf16" (resolved)."""
    faces = torch.randint(0, 256, (batch, 48, 48), dtype=torch.uint8, device=device)
    amp = precision == "bf16"
    for _ in range(3):
        predict_proba(net, faces, batch_size=batch, amp=amp)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        predict_proba(net, faces, batch_size=batch, amp=amp)
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
    features = ", ".join(k for k, v in cpu_features().items() if v) or "no AVX-512"
    return f"{cpu_name()} ({features}), {torch.get_num_threads()} threads"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", nargs="+", default=list(ARCHITECTURES))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32, 256])
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=["fp32", "auto"],
                   help="arithmetic to time, each against fp32 (auto: what the pipeline runs here)")  # fmt: skip
    args = p.parse_args()
    device = torch.device(args.device)
    precisions = list(dict.fromkeys(["fp32"] + [resolve_precision(x, device) for x in args.precisions]))
    print(f"Machine: {machine(device)}; torch {torch.__version__}; {datetime.date.today()}")
    print(f"Command: `{command_line()}`; the pipeline runs {resolve_precision(DEFAULT_PRECISION, device)} here\n")
    print("| model | precision | " + " | ".join(f"batch {b}" for b in args.batches) + " | vs fp32 |")
    print("|---|---|" + "---:|" * (len(args.batches) + 1))
    for name in args.models:
        net = optimize_for_inference(create_model(name)).to(device).to(memory_format=torch.channels_last)
        base = None
        for precision in precisions:
            rates = [faces_per_second(net, b, device, args.seconds, precision) for b in args.batches]
            base = base or rates
            ratio = " / ".join(f"{r / b:.2f}x" for r, b in zip(rates, base, strict=True))
            print(f"| {name} | {precision} | " + " | ".join(f"{r:,.0f} faces/s" for r in rates) + f" | {ratio} |",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
