"""Batched forward passes over uint8 faces, with optional test-time augmentation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fervid.model.config import SCORING_BATCH, TTA_MODES, ModelConfig


def normalize(x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Pixels as floats in [0, 1] -> the input the model was trained on (training augments in between)."""
    return (x - cfg.mean) / cfg.std


def preprocess(faces: torch.Tensor, cfg: ModelConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 faces [N, H, W] or [N, 1, H, W] at the model's input size -> its normalised float NCHW input,
    channels_last (the memory format every net here runs in)."""
    if faces.ndim == 3:
        faces = faces.unsqueeze(1)
    x = normalize(faces.to(device, non_blocking=True).float() / 255.0, cfg)
    return x.contiguous(memory_format=torch.channels_last)


def tta_views(x: torch.Tensor, tta: str) -> list[torch.Tensor]:
    """The views of a normalised batch that `tta` averages over (1 for none, 2 for flip, 10 for tencrop)."""
    if tta == "none":
        return [x]
    if tta == "flip":
        return [x, x.flip(-1)]
    if tta == "tencrop":
        # Five 48x48 windows of the face padded by 2 px (centre and corners), each also flipped: the
        # ten-crop of FER papers at the model's own input size.
        p = 2
        h, w = x.shape[-2:]
        padded = F.pad(x, (p, p, p, p), mode="replicate")
        crops = [padded[..., p : p + h, p : p + w]]
        crops += [padded[..., i : i + h, j : j + w] for i in (0, 2 * p) for j in (0, 2 * p)]
        return crops + [c.flip(-1) for c in crops]
    raise ValueError(f"unknown TTA mode {tta!r} (known: {', '.join(TTA_MODES)})")


# Which views each mode averages, by the widest mode asked for: tencrop's first and sixth views are the face itself
# and its mirror, so a report of every mode costs the ten passes of tencrop, not thirteen.
_PICKS = {
    "none": {"none": (0,)},
    "flip": {"none": (0,), "flip": (0, 1)},
    "tencrop": {"none": (0,), "flip": (0, 5), "tencrop": tuple(range(10))},
}


@torch.inference_mode()
def predict_proba_modes(
    net: nn.Module, images: torch.Tensor, modes: tuple[str, ...], batch_size: int = SCORING_BATCH, amp: bool = False
) -> dict[str, torch.Tensor]:
    """{mode: class probabilities [N, C]} for uint8 images [N, 48, 48] or [N, 1, 48, 48] (any device), each view
    through the net once whichever modes average it; each mode's numbers are those it has on its own."""
    unknown = [m for m in modes if m not in TTA_MODES]
    if unknown:
        raise ValueError(f"unknown TTA mode {unknown[0]!r} (known: {', '.join(TTA_MODES)})")
    widest = max(modes, key=TTA_MODES.index)
    picks = _PICKS[widest]
    dev = next(net.parameters()).device
    was_training = net.training
    net.eval()
    out: dict[str, list[torch.Tensor]] = {m: [] for m in modes}
    for i in range(0, len(images), batch_size):
        views = tta_views(preprocess(images[i : i + batch_size], net.cfg, dev), widest)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            probs = [net(v.contiguous(memory_format=torch.channels_last)).float().softmax(1) for v in views]
        for m in modes:
            out[m].append((sum(probs[k] for k in picks[m]) / len(picks[m])).cpu())
    net.train(was_training)
    return {m: torch.cat(o) if o else torch.empty(0, len(net.cfg.classes)) for m, o in out.items()}


def predict_proba(
    net: nn.Module, images: torch.Tensor, batch_size: int = SCORING_BATCH, tta: str = "none", amp: bool = False
) -> torch.Tensor:
    """Class probabilities [N, C] for uint8 images [N, 48, 48] or [N, 1, 48, 48] (any device)."""
    return predict_proba_modes(net, images, (tta,), batch_size, amp)[tta]
