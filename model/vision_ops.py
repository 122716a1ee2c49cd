"""torchvision's compiled NMS and RoIAlign kernels, without importing the torchvision package.

`import torchvision.ops` first runs torchvision/__init__, which imports its datasets, models and torch._dynamo:
about 1.8 s of start-up here, a quarter of the time budget for analysing a short clip. The kernels live in one
shared library that torch loads directly in a millisecond. Where that library cannot be found (another
torchvision layout), the package's own functions are used, so behaviour never changes, only start-up time.
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import os

import torch


@functools.cache
def _kernels_loaded() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    folder = spec.submodule_search_locations[0]
    for name in ("_C_stable", "_C"):
        for suffix in (".so", *importlib.machinery.EXTENSION_SUFFIXES):
            path = os.path.join(folder, name + suffix)
            if os.path.exists(path):
                try:
                    torch.ops.load_library(path)
                    return hasattr(torch.ops.torchvision, "nms") and hasattr(torch.ops.torchvision, "roi_align")
                except (OSError, RuntimeError):
                    return False
    return False


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """torchvision.ops.batched_nms: NMS within each group of `idxs`, kept indices by decreasing score."""
    if not _kernels_loaded():
        from torchvision.ops import batched_nms as tv_batched_nms

        return tv_batched_nms(boxes, scores, idxs, iou_threshold)
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    # torchvision's own trick: shift each group's boxes apart so that one NMS never mixes groups.
    offsets = idxs.to(boxes) * (boxes.max() + 1)
    return torch.ops.torchvision.nms(boxes + offsets[:, None], scores, iou_threshold)


def roi_align(
    x: torch.Tensor, rois: torch.Tensor, output_size: int, spatial_scale: float = 1.0, sampling_ratio: int = -1,
    aligned: bool = False,
) -> torch.Tensor:  # fmt: skip
    """torchvision.ops.roi_align with rois [K, 5] (batch index, x1, y1, x2, y2)."""
    if not _kernels_loaded():
        from torchvision.ops import roi_align as tv_roi_align

        return tv_roi_align(x, rois, output_size, spatial_scale, sampling_ratio, aligned)
    return torch.ops.torchvision.roi_align(x, rois, spatial_scale, output_size, output_size, sampling_ratio, aligned)
