"""Architectures by name. `create_model(name)` returns an untrained network that carries its config."""

from __future__ import annotations

from torch import nn

from fervid.errors import FervidError
from fervid.model.architectures import EmotionNet, MediumCNN, ResNetCNN, SeedCNN, SmallCNN
from fervid.model.config import ModelConfig

ARCHITECTURES: dict[str, type[EmotionNet]] = {
    cls.architecture: cls for cls in (SeedCNN, SmallCNN, MediumCNN, ResNetCNN)
}


def create_model(architecture: str, cfg: ModelConfig | None = None) -> EmotionNet:
    """An untrained `architecture` net with `cfg` (a weights file's config) or the architecture's default one."""
    try:
        cls = ARCHITECTURES[architecture]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise FervidError(f"unknown architecture {architecture!r} (known: {known})") from None
    return cls(cfg)


def count_parameters(net: nn.Module) -> tuple[int, int]:
    """(trainable parameters, parameters plus BatchNorm running statistics as Keras counts them)."""
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    stats = sum(
        m.running_mean.numel() + m.running_var.numel()
        for m in net.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
    )
    return trainable, trainable + stats
