"""FER2013 from any of its common layouts, as uint8 arrays with the official split.

Layouts: the `.npz` in ../shared (also `.npz.xz`), Kaggle's `fer2013.csv` (emotion, pixels, Usage), and the
image-folder layout (`train/<class>/*.png`, `test/<class>/*.png`; Kaggle's file names like
`PublicTest_123.jpg` keep the official split). Only the `.npz` carries the FER+ votes (`ferplus_votes`,
`ferplus_valid`; see ../shared/data/fer2013/PROVENANCE.md); the other layouts leave them None.
"""

from __future__ import annotations

import csv
import io
import lzma
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fervid.errors import FervidError
from fervid.model.config import CLASSES

SPLITS = ("Training", "PublicTest", "PrivateTest")
SIZE = 48
FERPLUS_COLUMNS = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt", "unknown",
                   "NF")  # fmt: skip
FERPLUS_TO_FER = {"neutral": "Neutral", "happiness": "Happy", "surprise": "Surprise", "sadness": "Sad",
                  "anger": "Angry", "disgust": "Disgust", "fear": "Fear"}  # fmt: skip


def ferplus_distribution(votes: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The FER+ crowd's votes as a distribution over FER2013's 7 classes ([N, 7] float32), and which rows have
    one (a valid FER+ entry with at least one vote for one of the 7 emotions; contempt, unknown and NF votes are
    left out). Ten annotators per face: the distribution says how ambiguous the face is."""
    dist = np.zeros((len(votes), len(CLASSES)), np.float32)
    for col, name in enumerate(FERPLUS_COLUMNS):
        if name in FERPLUS_TO_FER:
            dist[:, CLASSES.index(FERPLUS_TO_FER[name])] = votes[:, col]
    total = dist.sum(1)
    has = np.asarray(valid, dtype=bool) & (total > 0)
    dist[has] /= total[has, None]
    dist[~has] = 0
    return dist, has


@dataclass
class FerData:
    images: np.ndarray  # uint8 [N, 48, 48]
    labels: np.ndarray  # int64 [N]
    usage: np.ndarray  # uint8 [N], index into SPLITS
    source: Path
    # FER+ votes per row (neutral, happiness, surprise, sadness, anger, disgust, fear, contempt, unknown, NF) and
    # whether the row's FER+ entry is known to belong to it; None when the source has no FER+ votes.
    ferplus_votes: np.ndarray | None = None  # uint8 [N, 10]
    ferplus_valid: np.ndarray | None = None  # bool [N]

    def split_mask(self, name: str) -> np.ndarray:
        if name not in SPLITS:
            raise FervidError(f"unknown split {name!r} (known: {', '.join(SPLITS)})")
        mask = self.usage == SPLITS.index(name)
        if not mask.any():
            raise FervidError(f"{self.source}: has no {name} rows")
        return mask

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        mask = self.split_mask(name)
        return self.images[mask], self.labels[mask]

    def has_split(self, name: str) -> bool:
        return bool((self.usage == SPLITS.index(name)).any())


def load_fer2013(path: str | Path) -> FerData:
    path = Path(path)
    if not path.exists():
        raise FervidError(f"{path}: data file not found")
    name = path.name.lower()
    if path.is_dir():
        data = _load_image_folder(path)
    elif name.endswith(".npz") or name.endswith(".npz.xz"):
        data = _load_npz(path)
    elif name.endswith(".csv"):
        data = _load_csv(path)
    else:
        raise FervidError(f"{path}: unknown data layout (expected .npz, .npz.xz, .csv or an image folder)")
    _check(data)
    return data


def _check(d: FerData) -> None:
    if d.images.ndim != 3 or d.images.shape[1:] != (SIZE, SIZE):
        raise FervidError(f"{d.source}: images are {d.images.shape[1:]}, expected 48x48 grayscale")
    if len(d.images) == 0:
        raise FervidError(f"{d.source}: holds no images")
    if not (len(d.images) == len(d.labels) == len(d.usage)):
        raise FervidError(f"{d.source}: images, labels and usage differ in length")
    bad = (d.labels < 0) | (d.labels >= len(CLASSES))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise FervidError(f"{d.source}: label {d.labels[i]} at row {i} is not in 0..6")
    if (d.ferplus_votes is None) != (d.ferplus_valid is None):
        raise FervidError(f"{d.source}: npz has only one of ferplus_votes and ferplus_valid (needs both or neither)")
    if d.ferplus_votes is not None and (
        d.ferplus_votes.shape != (len(d.images), 10) or d.ferplus_valid.shape != (len(d.images),)
    ):
        raise FervidError(
            f"{d.source}: ferplus_votes is {d.ferplus_votes.shape} and ferplus_valid {d.ferplus_valid.shape}, "
            f"expected ({len(d.images)}, 10) and ({len(d.images)},)"
        )


def _load_npz(path: Path) -> FerData:
    try:
        if path.name.lower().endswith(".xz"):
            with lzma.open(path) as f:
                raw = io.BytesIO(f.read())
            z = np.load(raw)
        else:
            z = np.load(path)
        missing = [k for k in ("images", "labels", "usage") if k not in z.files]
        if missing:
            raise FervidError(f"{path}: npz lacks the arrays {missing} (needs images, labels, usage)")
        return FerData(
            images=np.asarray(z["images"], dtype=np.uint8),
            labels=np.asarray(z["labels"], dtype=np.int64),
            usage=np.asarray(z["usage"], dtype=np.uint8),
            source=path,
            ferplus_votes=np.asarray(z["ferplus_votes"], dtype=np.int64) if "ferplus_votes" in z.files else None,
            ferplus_valid=np.asarray(z["ferplus_valid"], dtype=bool) if "ferplus_valid" in z.files else None,
        )
    except FervidError:
        raise
    except (OSError, ValueError, EOFError, lzma.LZMAError) as e:
        raise FervidError(f"{path}: not a readable npz file ({e})") from None


def _load_csv(path: Path) -> FerData:
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        cols = [c.strip() for c in header] if header else []
        needed = ["emotion", "pixels", "Usage"]
        if not all(c in cols for c in needed):
            raise FervidError(f"{path}: CSV columns are {cols}, expected {needed} (Kaggle fer2013.csv)")
        ie, ip, iu = (cols.index(c) for c in needed)
        images, labels, usage = [], [], []
        for lineno, row in enumerate(reader, start=2):
            try:
                label = int(row[ie])
                pixels = np.array(row[ip].split(), dtype=np.int64)
                split = SPLITS.index(row[iu].strip())
            except (ValueError, IndexError):
                raise FervidError(
                    f"{path}: line {lineno}: malformed row (emotion must be an integer, pixels integers, "
                    f"Usage one of {', '.join(SPLITS)})"
                ) from None
            if pixels.size != SIZE * SIZE or pixels.min() < 0 or pixels.max() > 255:
                raise FervidError(
                    f"{path}: line {lineno}: pixels must be {SIZE * SIZE} values in 0..255, got {pixels.size}"
                )
            images.append(pixels.astype(np.uint8).reshape(SIZE, SIZE))
            labels.append(label)
            usage.append(split)
    if not images:
        raise FervidError(f"{path}: CSV has no data rows")
    return FerData(np.stack(images), np.array(labels, np.int64), np.array(usage, np.uint8), path)


_FOLDER_SPLIT = {"train": 0, "training": 0, "val": 1, "valid": 1, "validation": 1, "publictest": 1,
                 "test": 2, "privatetest": 2}  # fmt: skip
_IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp"}


def _load_image_folder(root: Path) -> FerData:
    import cv2

    class_index = {c.lower(): i for i, c in enumerate(CLASSES)}
    images, labels, usage = [], [], []
    for split_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        folder_split = _FOLDER_SPLIT.get(split_dir.name.lower())
        if folder_split is None:
            continue
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            label = class_index.get(class_dir.name.lower())
            if label is None:
                raise FervidError(f"{class_dir}: unknown class folder (expected one of {', '.join(CLASSES)})")
            for f in sorted(class_dir.iterdir()):
                if f.suffix.lower() not in _IMAGE_EXT:
                    continue
                img = cv2.imread(str(f), cv2.IMREAD_GRAYSCALE)
                if img is None:
                    raise FervidError(f"{f}: not a readable image")
                if img.shape != (SIZE, SIZE):
                    raise FervidError(f"{f}: image is {img.shape[1]}x{img.shape[0]}, expected 48x48")
                # Kaggle's names (PublicTest_123.jpg) keep the official split inside test/.
                prefix = f.name.split("_", 1)[0]
                split = SPLITS.index(prefix) if prefix in SPLITS else folder_split
                images.append(img)
                labels.append(label)
                usage.append(split)
    if not images:
        raise FervidError(f"{root}: no images found under train/<class>/ or test/<class>/")
    return FerData(np.stack(images), np.array(labels, np.int64), np.array(usage, np.uint8), root)
