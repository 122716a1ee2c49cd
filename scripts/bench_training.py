"""Training speed of each architecture on this machine, setting by setting, against plain fp32 in the same run.

    python -m scripts.bench_training [--archs seed small] [--seconds 10] [--configs ...]

One step is what `fervid train` does per batch: augmentation, forward, loss, backward and the SGD update.
TFLOP/s counts the forward and backward FLOPs of the network (torch.utils.flop_counter). Prints a Markdown table
headed by the CPU, its features, the thread count, the date and the command, ready for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fervid.model.device import cpu_features, cpu_name
from fervid.model.predict import normalize
from fervid.model.registry import create_model
from fervid.training.augment import augment


@dataclass(frozen=True)
class Config:
    name: str
    batch: int = 128
    amp: bool = False  # bf16 autocast (fp32 master weights)
    bf16_weights: bool = False  # the whole net in bf16
    channels_last: bool = False
    compile: bool = False


CONFIGS = {
    c.name: c
    for c in [
        Config("fp32 (baseline)"),
        Config("fp32 channels_last", channels_last=True),
        Config("bf16 autocast", amp=True),
        Config("bf16 autocast channels_last", amp=True, channels_last=True),
        Config("bf16 autocast channels_last b64", batch=64, amp=True, channels_last=True),
        Config("bf16 autocast channels_last b256", batch=256, amp=True, channels_last=True),
        Config("bf16 weights channels_last", bf16_weights=True, channels_last=True),
        Config("compile fp32 channels_last", channels_last=True, compile=True),
        Config("compile bf16 autocast channels_last", amp=True, channels_last=True, compile=True),
    ]
}


def step_flops(arch: str, batch: int) -> float:
    net = create_model(arch)
    x = torch.randn(batch, 1, 48, 48)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(net(x), torch.zeros(batch, dtype=torch.long)).backward()
    return float(counter.get_total_flops())


def images_per_second(arch: str, cfg: Config, seconds: float) -> float:
    torch.manual_seed(0)
    net = create_model(arch)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    if cfg.bf16_weights:
        net = net.to(torch.bfloat16)
    model = torch.compile(net) if cfg.compile else net
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    data = torch.randint(0, 256, (4096, 1, 48, 48), dtype=torch.uint8)
    labels = torch.randint(0, 7, (4096,))
    gen = torch.Generator().manual_seed(0)

    def step(i: int) -> None:
        idx = torch.randint(0, len(data), (cfg.batch,), generator=gen)
        x = normalize(augment(data[idx].float() / 255.0, gen), net.cfg).contiguous(memory_format=fmt)
        if cfg.bf16_weights:
            x = x.to(torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.amp):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(3):  # warm-up (and compilation)
        step(i)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step(n)
        n += 1
    return n * cfg.batch / (time.perf_counter() - t0)


def command_line() -> str:
    import pathlib

    return " ".join(["python -m scripts." + pathlib.Path(sys.argv[0]).stem, *sys.argv[1:]])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="+", default=["seed", "small"])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), metavar="CONFIG")
    p.add_argument("--seconds", type=float, default=10.0)
    args = p.parse_args()
    feats = ", ".join(k for k, v in cpu_features().items() if v) or "none of avx512/avx512_bf16/amx"
    print(f"Machine: {cpu_name()} ({feats}), {torch.get_num_threads()} threads; torch {torch.__version__}; "
          f"{datetime.date.today()}")  # fmt: skip
    print(f"Command: `{command_line()}`\n")
    print("| architecture | setting | batch | images/s | TFLOP/s | vs fp32 |")
    print("|---|---|---:|---:|---:|---:|")
    for arch in args.archs:
        base = None
        for name in args.configs:
            cfg = CONFIGS[name]
            try:
                rate = images_per_second(arch, cfg, args.seconds)
            except Exception as e:  # noqa: BLE001 - a setting this machine cannot run is a row, not a crash
                print(f"| {arch} | {name} | {cfg.batch} | failed: {type(e).__name__} | | |", flush=True)
                continue
            base = base or rate
            tflops = rate / cfg.batch * step_flops(arch, cfg.batch) / 1e12
            print(f"| {arch} | {name} | {cfg.batch} | {rate:,.0f} | {tflops:.2f} | {rate / base:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
