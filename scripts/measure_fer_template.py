"""Measure where FER2013 puts the eyes, nose and mouth: the template that worker/crops.py aligns faces to.

    python -m scripts.measure_fer_template --data ../shared/data/fer2013/fer2013.npz [--n 3000]

Each Training image is upscaled 4x, padded (RetinaFace needs some context around a face that fills the
frame), and run through our detector; the median landmark positions, mapped back to 48x48 pixel
coordinates, are printed as a tensor literal.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from fervid.model.retinaface import load_retinaface
from fervid.training.data import load_fer2013

UP, PAD = 4, 64


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--n", type=int, default=3000)
    args = p.parse_args()
    images, _ = load_fer2013(args.data).split("Training")
    rng = np.random.default_rng(0)
    images = images[rng.choice(len(images), size=min(args.n, len(images)), replace=False)]
    det = load_retinaface("cpu")
    found = []
    for i in range(0, len(images), 64):
        x = torch.from_numpy(images[i : i + 64]).float().unsqueeze(1)
        x = F.interpolate(x, scale_factor=UP, mode="bicubic").clamp(0, 255)
        x = F.pad(x, (PAD,) * 4, mode="replicate")
        rgb = x.round().to(torch.uint8).squeeze(1).unsqueeze(-1).expand(-1, -1, -1, 3).contiguous()
        for d in det.detect(rgb, score_threshold=0.8):
            if len(d.scores):
                found.append(((d.landmarks[0] - PAD) / UP).numpy())
    pts = np.stack(found)
    med = np.median(pts, 0)
    print(f"faces found in {len(pts)} of {len(images)} images")
    print("median landmarks (x, y) in 48x48 pixel coordinates:")
    print("[" + ", ".join(f"[{x:.2f}, {y:.2f}]" for x, y in med) + "]")
    print("interquartile ranges:", np.round(np.percentile(pts, 75, 0) - np.percentile(pts, 25, 0), 2).tolist())


if __name__ == "__main__":
    main()
