"""Ensembles: several trained nets averaged (with test-time augmentation) behind one model name.

An ensemble is a net like any other here: it carries a config and returns logits, so everything that takes a model
name (`analyze`, `submit`, `eval`, the API) takes an ensemble's name too.
"""

from __future__ import annotations

import torch
from torch import nn

from fervid.model.architectures import EmotionNet
from fervid.model.config import TTA_MODES, ModelConfig
from fervid.model.predict import tta_views


class EnsembleNet(EmotionNet):
    """The mean of its members' class probabilities over the views of `tta` (model.predict.tta_views: the face; with
    "flip" its mirror image too; with "tencrop" five shifted windows and their mirror images).

    Returns the log of that mean: softmax of it gives the mean back, so callers treat it as logits.
    """

    architecture = "ensemble"

    def __init__(self, members: list[EmotionNet], tta: str = "flip") -> None:
        if not members:
            raise ValueError("an ensemble needs at least one member")
        if tta not in TTA_MODES:
            raise ValueError(f"unknown ensemble TTA {tta!r} (known: {', '.join(TTA_MODES)})")
        first = members[0].cfg
        for m in members[1:]:
            c = m.cfg
            if (c.input_size, c.mean, c.std, c.classes) != (first.input_size, first.mean, first.std, first.classes):
                raise ValueError(f"ensemble members differ in input or classes: {first} and {c}")
        super().__init__(ModelConfig("ensemble", first.input_size, first.mean, first.std, first.classes))
        self.members = nn.ModuleList(members)
        self.tta = tta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        views = [v.contiguous(memory_format=torch.channels_last) for v in tta_views(x, self.tta)]
        probs = sum(m(v).float().softmax(1) for m in self.members for v in views)
        return (probs / (len(self.members) * len(views))).clamp_min(1e-12).log()

