"""Face crops shaped like FER2013's: aligned on the five landmarks, 48x48 grayscale, in batches on the device.

FER2013's faces are registered so that eyes and mouth sit at nearly fixed places in the 48x48 square.
`FER_TEMPLATE` holds those places, measured by running our RetinaFace on FER2013 Training images
(scripts/measure_fer_template.py); each face is mapped onto them with the least-squares similarity transform
of its five landmarks, so crops from video frames look like the images the classifier was trained on.

The margin (how much context around the template) was chosen by measurement (scripts/measure_crop_margin.py):
FER2013 PublicTest faces, upscaled and re-detected, cropped by this code at margins 0.85 to 1.2 and classified;
1.0, the FER framing itself, scored best (67.2% vs 66.0% at 1.1 and 64.0% at 1.2; 68.0% on the original
images). See BENCHMARKS.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fervid.model.vision_ops import roi_align

# Median landmark positions in 1,500 FER2013 Training images (found in 1,471), in 48x48 pixel coordinates
# (pixel centres at i + 0.5):
# the subject's right eye (image left), left eye, nose tip, right and left mouth corners.
FER_TEMPLATE = torch.tensor(
    [[15.42, 18.61], [32.90, 18.56], [24.09, 29.01], [17.29, 36.62], [31.17, 36.70]], dtype=torch.float32
)
# Patch size for the anti-aliased first resampling (roi_align averages several samples per output pixel).
_PATCH = 96
_SUPERSAMPLE = 2


def similarity_to_template(landmarks: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity (rotation, uniform scale, shift) taking landmarks [K, 5, 2] onto template [5, 2].

    Returns the inverse maps [K, 2, 3] (template coordinates -> frame coordinates), which is what sampling needs.
    """
    src_mean = landmarks.mean(1, keepdim=True)
    dst_mean = template.mean(0, keepdim=True)
    ps = landmarks - src_mean
    qs = (template - dst_mean).unsqueeze(0)
    denom = (ps**2).sum((1, 2)).clamp(min=1e-6)
    a = (ps * qs).sum((1, 2)) / denom
    b = (ps[..., 0] * qs[..., 1] - ps[..., 1] * qs[..., 0]).sum(1) / denom
    # Forward: q = [[a, -b], [b, a]] (p - p_mean) + q_mean; inverted:
    det = (a * a + b * b).clamp(min=1e-12)
    inv = torch.stack([torch.stack([a, b], 1), torch.stack([-b, a], 1)], 1) / det.view(-1, 1, 1)
    shift = src_mean.squeeze(1) - (inv @ dst_mean.T).squeeze(-1)
    return torch.cat([inv, shift.unsqueeze(-1)], dim=2)


def align_faces(
    gray: torch.Tensor,  # float [N, 1, H, W], 0..255
    frame_index: torch.Tensor,
    landmarks: torch.Tensor,
    size: int = 48,
    template: torch.Tensor | None = None,
    margin: float = 1.0,
) -> torch.Tensor:
    """uint8 crops [K, size, size] of the faces given by landmarks [K, 5, 2] in frames gray[frame_index].

    `margin` > 1 zooms out around the template's centre (more context), < 1 zooms in.
    """
    k = len(landmarks)
    if k == 0:
        return torch.empty(0, size, size, dtype=torch.uint8, device=gray.device)
    dev = gray.device
    tpl = (template if template is not None else FER_TEMPLATE).to(dev) * (size / 48)
    centre = torch.tensor([size / 2, size / 2], device=dev)
    tpl = (tpl - centre) / margin + centre
    inv = similarity_to_template(landmarks.float(), tpl)  # template -> frame

    # The crop square's corners in the frame give an axis-aligned region for roi_align.
    corners = torch.tensor([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], device=dev, dtype=torch.float32)
    pts = corners @ inv.transpose(1, 2)  # [K, 4, 2]
    lo, hi = pts.amin(1), pts.amax(1)
    boxes = torch.cat([frame_index.to(dev, torch.float32).unsqueeze(1), lo, hi], dim=1)
    # 2x2 samples per patch pixel: against roi_align's adaptive count (up to 5x5 for a 400 px face) this is 2x
    # faster and changes crops by 0.2 grey levels on average; the final 2x supersampling smooths the rest.
    patch = roi_align(gray, boxes, output_size=_PATCH, spatial_scale=1.0, sampling_ratio=2, aligned=True)

    # Output pixel centres -> frame coordinates -> the patch's normalised coordinates.
    n = size * _SUPERSAMPLE
    c = (torch.arange(n, device=dev, dtype=torch.float32) + 0.5) / _SUPERSAMPLE
    gy, gx = torch.meshgrid(c, c, indexing="ij")
    grid = torch.stack([gx, gy, torch.ones_like(gx)], -1).view(1, -1, 3)  # [1, n*n, 3]
    src = grid @ inv.transpose(1, 2)  # [K, n*n, 2]
    norm = (src - lo.unsqueeze(1)) / (hi - lo).clamp(min=1e-6).unsqueeze(1) * 2 - 1
    out = F.grid_sample(patch, norm.view(k, n, n, 2), mode="bilinear", padding_mode="border", align_corners=False)
    out = F.avg_pool2d(out, _SUPERSAMPLE)
    return out.squeeze(1).round().clamp(0, 255).to(torch.uint8)
