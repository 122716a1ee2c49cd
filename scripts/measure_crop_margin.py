"""Which crop margin makes pipeline crops classify best: measured on labelled faces.

    python -m scripts.measure_crop_margin --data ../shared/data/fer2013/fer2013.npz [--images ../shared/images]

1. FER2013 PublicTest faces, upscaled 4x and padded so they look like faces in a frame, go through the
   pipeline's own steps (RetinaFace, landmark alignment at each margin, 48x48 grayscale, the CNN); accuracy is
   compared with classifying the original 48x48 images. PublicTest, not PrivateTest: this is a choice.
2. The labelled posed photos (file names say the emotion) are cropped at each margin and classified.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import torch
import torch.nn.functional as F

from fervid.model.config import REFERENCE_PRECISION
from fervid.model.loader import load_model
from fervid.model.retinaface import load_retinaface
from fervid.training.data import load_fer2013
from fervid.worker.pipeline.crops import align_faces

MARGINS = (0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.2)
PHOTO_LABELS = {"su": "Surprise", "hao": "Happy", "anc": "Angry", "di": "Disgust"}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--images", default=str(Path(__file__).resolve().parents[2] / "shared" / "images"))
    p.add_argument("--model", default="small")
    args = p.parse_args()
    clf = load_model(args.model, precision=REFERENCE_PRECISION)
    det = load_retinaface("cpu")

    images, labels = load_fer2013(args.data).split("PublicTest")
    base = (clf.predict_proba(torch.from_numpy(images)).argmax(1).numpy() == labels).mean()
    correct = {m: 0 for m in MARGINS}
    found = 0
    for i in range(0, len(images), 128):
        x = torch.from_numpy(images[i : i + 128]).float().unsqueeze(1)
        x = F.pad(F.interpolate(x, scale_factor=4, mode="bicubic").clamp(0, 255), (64,) * 4, mode="replicate")
        frames = x.round().to(torch.uint8).squeeze(1).unsqueeze(-1).expand(-1, -1, -1, 3).contiguous()
        dets = det.detect(frames, score_threshold=0.5)
        keep = [j for j, d in enumerate(dets) if len(d)]
        found += len(keep)
        if not keep:
            continue
        lm = torch.stack([dets[j].landmarks[0] for j in keep])
        gray = frames[..., 0].unsqueeze(1).float()  # the FER faces are grey already
        y = labels[i : i + 128][keep]
        for m in MARGINS:
            crops = align_faces(gray, torch.tensor(keep), lm, margin=m)
            correct[m] += int((clf.predict_proba(crops).argmax(1).numpy() == y).sum())
    print(f"FER2013 PublicTest: {len(images)} faces, found again by RetinaFace in {found}")
    print(f"accuracy on the original 48x48 images: {base:.4f}")
    print("| margin | accuracy of pipeline crops (faces found) |\n|---:|---:|")
    for m in MARGINS:
        print(f"| {m:.2f} | {correct[m] / max(found, 1):.4f} |")

    photos = sorted(Path(args.images).glob("*.jpg"))
    if photos:
        print("\nlabelled photos (predicted class, probability of the true class) per margin:")
        for path in photos:
            true = PHOTO_LABELS[path.stem.split("-")[2]]
            bgr = cv2.imread(str(path))
            frame = torch.from_numpy(bgr)[None]
            gray = torch.from_numpy(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY))[None, None].float()
            d = det.detect(frame, bgr=True)[0]
            cells = []
            for m in MARGINS:
                crop = align_faces(gray, torch.tensor([0]), d.landmarks[:1], margin=m)
                prob = clf.predict_proba(crop)[0]
                cells.append(f"{m:.2f}: {clf.classes[int(prob.argmax())]} ({prob[clf.classes.index(true)]:.2f})")
            print(f"  {path.name} [{true}]: " + "; ".join(cells))


if __name__ == "__main__":
    main()
