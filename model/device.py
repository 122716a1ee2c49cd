"""Choosing the torch device from a user's words (cpu, cuda, cuda:N, auto)."""

from __future__ import annotations

import torch

from model.errors import FervidError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FervidError(f"--device {name} asked for, but PyTorch sees no CUDA GPU")
    if name != "cpu" and not name.startswith("cuda"):
        raise FervidError(f"unknown device {name!r} (cpu, cuda, cuda:N or auto)")
    return torch.device(name)
