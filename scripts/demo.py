"""The first run: make a short clip with a real face and analyse it with the embedded default (SQLite).

    python scripts/demo.py [--out fervid-demo]

The face is scikit-image's `astronaut` (Eileen Collins, a NASA photo in the public domain), panned and zoomed
over 4 seconds so the detector and the crops have motion to follow. Needs no ../shared data and no servers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

from fervid.cli import main as fervid


def make_clip(path: Path, seconds: float = 4.0, fps: int = 25, size: tuple[int, int] = (640, 360)) -> None:
    from skimage import data

    photo = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)  # 512x512
    canvas = cv2.copyMakeBorder(photo, 128, 128, 256, 256, cv2.BORDER_REFLECT)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    if not writer.isOpened():
        raise SystemExit(f"cannot write {path}: OpenCV has no MPEG-4 encoder here")
    w, h = size
    n = int(seconds * fps)
    for i in range(n):
        t = i / max(n - 1, 1)
        zoom = 1.0 + 0.35 * np.sin(np.pi * t)  # zoom in and out again
        angle = 6 * np.sin(2 * np.pi * t)  # a slight head tilt
        cx, cy = 256 + 512 * 0.5 + 40 * np.cos(2 * np.pi * t), 128 + 200
        m = cv2.getRotationMatrix2D((cx, cy), angle, zoom)
        m[:, 2] += (w / 2 - cx, h / 2 - cy)
        writer.write(cv2.warpAffine(canvas, m, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT))
    writer.release()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="fervid-demo", help="folder for the clip, the CSV and the plot")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clip = out / "astronaut.mp4"
    make_clip(clip)
    print(f"made {clip} (4 s, 640x360, a face panned and zoomed)")
    return fervid(["analyze", str(clip), "--fps", "10", "--csv", str(out / "astronaut.csv"),
                   "--plot", str(out / "astronaut.png")])  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
