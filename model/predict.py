"""Batched forward passes over uint8 faces, with optional test-time augmentation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fervid.model.config import AFFINE_WARPS, SCORING_BATCH, TTA_MODES, ModelConfig


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


# A view of a face: (kind, a, b, mirrored). ("shift", dy, dx, m): the face moved by (dy, dx) pixels, its border
# repeated; ("warp", k, 0, m): the face under AFFINE_WARPS[k]; m: then mirrored left to right.
View = tuple[str, int, int, bool]
_SHIFTS = ((0, 0), (-2, -2), (-2, 2), (2, -2), (2, 2))  # tencrop: the face and four corners of it padded by 2 px


def view_keys(tta: str) -> tuple[View, ...]:
    """The views that `tta` averages over: 1 for none, 2 for flip, 10 for tencrop, 2 + 2 x len(AFFINE_WARPS) for
    affine. The face itself and its mirror are views of every mode but none, so a report of several modes
    computes each view once (predict_proba_modes)."""
    if tta == "none":
        return (("shift", 0, 0, False),)
    if tta == "flip":
        return tuple(("shift", 0, 0, m) for m in (False, True))
    if tta == "tencrop":
        return tuple(("shift", dy, dx, m) for m in (False, True) for dy, dx in _SHIFTS)
    if tta == "affine":
        return view_keys("flip") + tuple(("warp", k, 0, m) for k in range(len(AFFINE_WARPS)) for m in (False, True))
    raise ValueError(f"unknown TTA mode {tta!r} (known: {', '.join(TTA_MODES)})")


def warp(x: torch.Tensor, angle: torch.Tensor, scale: torch.Tensor, shift_x: torch.Tensor, shift_y: torch.Tensor,
         mirror: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Each face of a batch [N, C, H, W] rotated by angle [N] (radians), scaled by scale [N] and shifted by
    shift_x/y [N] (fractions of the side), then mirrored where mirror [N] is -1; one grid_sample, borders repeated.
    The map training.augment draws at random and the affine TTA applies with fixed values."""
    sx = scale if mirror is None else scale * mirror
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos / sx, -sin / scale, shift_x * 2], dim=1),
                         torch.stack([sin / sx, cos / scale, shift_y * 2], dim=1)], dim=1)  # fmt: skip
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def render_view(x: torch.Tensor, view: View) -> torch.Tensor:
    """One view of a normalised batch [N, C, H, W]."""
    kind, a, b, mirrored = view
    if kind == "shift" and (a, b) != (0, 0):
        p = max(abs(a), abs(b))
        h, w = x.shape[-2:]
        x = F.pad(x, (p, p, p, p), mode="replicate")[..., p + a : p + a + h, p + b : p + b + w]
    elif kind == "warp":
        deg, scale, tx, ty = AFFINE_WARPS[a]
        # float64 like the math module: the same theta whichever device computes it
        x = warp(x, *(torch.full((len(x),), v, dtype=torch.float64, device=x.device)
                      for v in (math.radians(deg), scale, tx, ty)))  # fmt: skip
    return x.flip(-1) if mirrored else x


def tta_views(x: torch.Tensor, tta: str) -> list[torch.Tensor]:
    """The views of a normalised batch that `tta` averages over (view_keys)."""
    return [render_view(x, v) for v in view_keys(tta)]


@torch.inference_mode()
def predict_proba_modes(
    net: nn.Module, images: torch.Tensor, modes: tuple[str, ...], batch_size: int = SCORING_BATCH, amp: bool = False
) -> dict[str, torch.Tensor]:
    """{mode: class probabilities [N, C]} for uint8 images [N, 48, 48] or [N, 1, 48, 48] (any device), each view
    through the net once whichever modes average it; each mode's numbers are those it has on its own."""
    unknown = [m for m in modes if m not in TTA_MODES]
    if unknown:
        raise ValueError(f"unknown TTA mode {unknown[0]!r} (known: {', '.join(TTA_MODES)})")
    keys = {m: view_keys(m) for m in modes}
    union = list(dict.fromkeys(v for ks in keys.values() for v in ks))
    dev = next(net.parameters()).device
    was_training = net.training
    net.eval()
    out: dict[str, list[torch.Tensor]] = {m: [] for m in modes}
    for i in range(0, len(images), batch_size):
        x = preprocess(images[i : i + batch_size], net.cfg, dev)
        probs = {}
        for v in union:
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                probs[v] = net(render_view(x, v).contiguous(memory_format=torch.channels_last)).float().softmax(1)
        for m in modes:
            out[m].append((sum(probs[v] for v in keys[m]) / len(keys[m])).cpu())
    net.train(was_training)
    return {m: torch.cat(o) if o else torch.empty(0, len(net.cfg.classes)) for m, o in out.items()}


def predict_proba(
    net: nn.Module, images: torch.Tensor, batch_size: int = SCORING_BATCH, tta: str = "none", amp: bool = False
) -> torch.Tensor:
    """Class probabilities [N, C] for uint8 images [N, 48, 48] or [N, 1, 48, 48] (any device)."""
    return predict_proba_modes(net, images, (tta,), batch_size, amp)[tta]
