"""Every FER2013 layout loads to the same arrays; every kind of bad input gives one clear error."""

import lzma

import cv2
import numpy as np
import pytest

from fervid.errors import FervidError
from fervid.training.data import SPLITS, load_fer2013


@pytest.fixture
def synthetic() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    n = 21
    images = rng.integers(0, 256, (n, 48, 48), dtype=np.uint8)
    labels = np.arange(n) % 7
    usage = np.array([0] * 14 + [1] * 4 + [2] * 3, dtype=np.uint8)
    return images, labels, usage


def write_csv(path, images, labels, usage, header="emotion,pixels,Usage"):
    lines = [header]
    for img, lab, use in zip(images, labels, usage, strict=True):
        lines.append(f"{lab},{' '.join(map(str, img.ravel()))},{SPLITS[use]}")
    path.write_text("\n".join(lines) + "\n")


def test_npz_csv_xz_and_folder_agree(tmp_path, synthetic):
    images, labels, usage = synthetic
    np.savez(tmp_path / "d.npz", images=images, labels=labels, usage=usage)
    with lzma.open(tmp_path / "d.npz.xz", "wb") as f:
        np.savez(f, images=images, labels=labels, usage=usage)
    write_csv(tmp_path / "fer2013.csv", images, labels, usage)
    classes = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
    for i, (img, lab, use) in enumerate(zip(images, labels, usage, strict=True)):
        folder = tmp_path / "folder" / ("train" if use == 0 else "test") / classes[lab]
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"{SPLITS[use]}_{i}.png"), img)

    for source in ["d.npz", "d.npz.xz", "fer2013.csv"]:
        d = load_fer2013(tmp_path / source)
        np.testing.assert_array_equal(d.images, images)
        np.testing.assert_array_equal(d.labels, labels)
        np.testing.assert_array_equal(d.usage, usage)
    d = load_fer2013(tmp_path / "folder")
    for split in SPLITS:  # folder order differs; compare each split as a set of (label, image)
        a_img, a_lab = d.split(split)
        mask = usage == SPLITS.index(split)
        assert sorted((int(lab), img.tobytes()) for img, lab in zip(a_img, a_lab, strict=True)) == sorted(
            (int(lab), img.tobytes()) for img, lab in zip(images[mask], labels[mask], strict=True)
        )


def test_real_npz_has_the_official_split(fer_npz):
    d = load_fer2013(fer_npz)
    assert [len(d.split(s)[0]) for s in SPLITS] == [28709, 3589, 3589]


def _error(path) -> str:
    with pytest.raises(FervidError) as e:
        load_fer2013(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_missing_file(tmp_path):
    assert "not found" in _error(tmp_path / "nope.npz")


def test_csv_with_wrong_columns(tmp_path, synthetic):
    write_csv(tmp_path / "bad.csv", *synthetic, header="label,pixels,split")
    assert "columns" in _error(tmp_path / "bad.csv")


def test_csv_with_malformed_pixel_row(tmp_path, synthetic):
    images, labels, usage = synthetic
    write_csv(tmp_path / "bad.csv", images, labels, usage)
    lines = (tmp_path / "bad.csv").read_text().splitlines()
    lines[3] = "2,12 34 abc,Training"
    (tmp_path / "bad.csv").write_text("\n".join(lines))
    assert "line 4" in _error(tmp_path / "bad.csv")


def test_csv_with_short_pixel_row(tmp_path, synthetic):
    images, labels, usage = synthetic
    write_csv(tmp_path / "bad.csv", images, labels, usage)
    lines = (tmp_path / "bad.csv").read_text().splitlines()
    lines[2] = "2," + " ".join(["7"] * 100) + ",Training"
    (tmp_path / "bad.csv").write_text("\n".join(lines))
    msg = _error(tmp_path / "bad.csv")
    assert "line 3" in msg and "2304" in msg


def test_images_of_the_wrong_size(tmp_path):
    folder = tmp_path / "train" / "happy"
    folder.mkdir(parents=True)
    cv2.imwrite(str(folder / "a.png"), np.zeros((64, 64), np.uint8))
    with pytest.raises(FervidError, match="64x64, expected 48x48"):
        load_fer2013(tmp_path)
    np.savez(tmp_path / "big.npz", images=np.zeros((3, 64, 64), np.uint8), labels=np.zeros(3), usage=np.zeros(3))
    assert "48x48" in _error(tmp_path / "big.npz")


def test_npz_without_the_arrays(tmp_path):
    np.savez(tmp_path / "x.npz", foo=np.zeros(3))
    assert "images" in _error(tmp_path / "x.npz")


def test_not_an_npz(tmp_path):
    (tmp_path / "x.npz").write_text("hello")
    assert "not a readable npz" in _error(tmp_path / "x.npz")


def test_bad_label(tmp_path, synthetic):
    images, labels, usage = synthetic
    labels = labels.copy()
    labels[5] = 9
    write_csv(tmp_path / "bad.csv", images, labels, usage)
    assert "label 9" in _error(tmp_path / "bad.csv")
