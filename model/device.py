"""Choosing the torch device from a user's words (cpu, cuda, cuda:N, auto)."""

from __future__ import annotations

import torch

from fervid.errors import FervidError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FervidError(f"--device {name} asked for, but PyTorch sees no CUDA GPU")
    if name != "cpu" and not name.startswith("cuda"):
        raise FervidError(f"unknown device {name!r} (cpu, cuda, cuda:N or auto)")
    return torch.device(name)


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one): every benchmark names the machine it ran on."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_features() -> dict[str, bool]:
    """What makes low-precision training fast on this CPU, detected at run time (machines of one kind vary)."""
    probe = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported",
             "avx512": "_is_avx512_supported"}  # fmt: skip
    return {k: bool(getattr(torch.cpu, fn, lambda: False)()) for k, fn in probe.items()}
