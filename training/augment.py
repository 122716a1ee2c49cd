"""Batched augmentation on the training device: one affine warp and one erase per batch, no Python loop."""

from __future__ import annotations

import math

import numpy as np
import torch

from fervid.model.predict import warp


def augment(
    x: torch.Tensor,
    gen: torch.Generator,
    max_rotate_deg: float = 12.0,
    max_shift: float = 0.10,
    scale: tuple[float, float] = (0.9, 1.1),
    flip: bool = True,
    erase_p: float = 0.5,
    erase_area: tuple[float, float] = (0.02, 0.15),
) -> torch.Tensor:
    """Random rotation, shift, scale and horizontal flip (one `grid_sample`), then random erasing.

    `x` is float [N, 1, H, W] in [0, 1]. Random crops of FER2013 are shifts plus scale here, which keeps
    the output 48x48 so evaluation needs no resize.
    """
    n, _, h, w = x.shape
    dev = x.device

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return torch.rand(*(shape or (n,)), generator=gen, device=dev) * (hi - lo) + lo

    angle = u(-max_rotate_deg, max_rotate_deg) * (math.pi / 180)
    s = u(*scale)
    mirror = torch.where(torch.rand(n, generator=gen, device=dev) < 0.5, -1.0, 1.0) if flip else None
    x = warp(x, angle, s, u(-max_shift, max_shift), u(-max_shift, max_shift), mirror)

    if erase_p > 0:
        area = u(*erase_area) * h * w
        aspect = torch.exp(u(math.log(0.3), math.log(3.3)))
        eh = (area * aspect).sqrt().clamp(max=h)
        ew = (area / aspect).sqrt().clamp(max=w)
        y0 = u(0, 1) * (h - eh)
        x0 = u(0, 1) * (w - ew)
        ys = torch.arange(h, device=dev, dtype=x.dtype).view(1, h, 1)
        xs = torch.arange(w, device=dev, dtype=x.dtype).view(1, 1, w)
        inside = (
            (ys >= y0.view(n, 1, 1)) & (ys < (y0 + eh).view(n, 1, 1))
            & (xs >= x0.view(n, 1, 1)) & (xs < (x0 + ew).view(n, 1, 1))
        )  # fmt: skip
        inside &= (torch.rand(n, generator=gen, device=dev) < erase_p).view(n, 1, 1)
        noise = torch.rand(x.shape, generator=gen, device=dev, dtype=x.dtype)
        x = torch.where(inside.unsqueeze(1), noise, x)
    return x


def mix(
    x: torch.Tensor, target: torch.Tensor, rng: np.random.Generator, mixup: float, cutmix: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp (the whole image blended) or CutMix (a box pasted) between each face and another of the batch, the
    targets mixed by the same weight: the area pasted, for CutMix. With both on, each batch takes one of them.

    `rng` is seeded per epoch by the caller, so a resumed run mixes as the uninterrupted one did.
    """
    if mixup <= 0 and cutmix <= 0:
        return x, target
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < 0.5)
    alpha = cutmix if use_cutmix else mixup
    lam = float(rng.beta(alpha, alpha))
    other = torch.from_numpy(rng.permutation(len(x))).to(x.device)
    if use_cutmix:
        h, w = x.shape[-2:]
        cut_h, cut_w = round(h * math.sqrt(1 - lam)), round(w * math.sqrt(1 - lam))
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + (cut_h + 1) // 2, h)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + (cut_w + 1) // 2, w)
        x = x.clone()
        x[..., y0:y1, x0:x1] = x[other, ..., y0:y1, x0:x1]  # only the box is gathered
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)  # the box clipped at the border: the area it really has
    else:
        x = x * lam + x[other] * (1 - lam)
    return x, target * lam + target[other] * (1 - lam)
