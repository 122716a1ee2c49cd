"""Choosing the torch device from a user's words (cpu, cuda, cuda:N, auto)."""

from __future__ import annotations

import torch

from fervid.errors import FervidError
from fervid.model.config import PRECISIONS


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FervidError(f"--device {name} asked for, but PyTorch sees no CUDA GPU")
    if name != "cpu" and not name.startswith("cuda"):
        raise FervidError(f"unknown device {name!r} (cpu, cuda, cuda:N or auto)")
    return torch.device(name)


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one): every benchmark names the machine it ran on.
    Family and model numbers follow, because one model name ("AMD EPYC") covers CPUs of different generations."""
    import platform

    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if not line.strip():
                    break  # the first processor is enough
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = info.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in info and "model" in info:
        name += f" (family {info['cpu family']} model {info['model']})"
    return name


def cpu_features() -> dict[str, bool]:
    """What makes low-precision training fast on this CPU, detected at run time (machines of one kind vary)."""
    probe = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported",
             "avx512": "_is_avx512_supported"}  # fmt: skip
    return {k: bool(getattr(torch.cpu, fn, lambda: False)()) for k, fn in probe.items()}


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 convolutions in hardware (elsewhere bf16 is emulated, and slower)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    features = cpu_features()
    return device.type == "cpu" and (features["avx512_bf16"] or features["amx_bf16"])


def resolve_precision(precision: str, device: torch.device) -> str:
    """"fp32" or "bf16" for a user's choice (auto, fp32, bf16) on `device` (model.config.DEFAULT_PRECISION)."""
    if precision not in PRECISIONS:
        raise FervidError(f"unknown precision {precision!r} ({', '.join(PRECISIONS)})")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision
