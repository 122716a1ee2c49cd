"""What a model needs to be used: classes, input size and normalisation, carried by the model itself.

Like timm's pretrained_cfg: every net has `net.cfg`, and preprocessing (`fervid.model.predict.preprocess`) reads
it, so no caller repeats the constants.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# The shipped model used when none is named (`Settings.model`, `fervid eval --model`, `fervid models`' "*").
# Here, not in the heavier loader, because worker.settings reads it while every `fervid` command builds its parser.
DEFAULT_MODEL = "medium-distilled"

# The arithmetic the emotion model runs in. "auto": bfloat16 where the device computes it natively (CPUs with
# AVX-512 BF16 or AMX, CUDA GPUs with bf16), else float32. On such CPUs bf16 is about 2x faster at batch 32, and on
# FER2013's PrivateTest it moves the top class of 0.3-0.6% of faces and each probability by at most ~0.04
# (BENCHMARKS.md); its results do not depend on how faces are batched. Accuracy reports use REFERENCE_PRECISION:
# bf16 kernels differ between CPU generations, float32 gives the same figures on every machine.
PRECISIONS = ("auto", "fp32", "bf16")
DEFAULT_PRECISION = "auto"
REFERENCE_PRECISION = "fp32"
# Faces per forward pass when scoring a set of faces (eval, ensembles, teachers): on 2 CPU threads batches of 64
# run about 30% faster than 256 or 512 (they stay in cache) and give the same float32 outputs (BENCHMARKS.md).
SCORING_BATCH = 64

# Test-time augmentation: the face; with "flip" its mirror image too; with "tencrop" five shifted windows and their
# mirror images; with "affine" the face, its mirror and the AFFINE_WARPS of it, each mirrored too
# (model.predict.view_keys).
TTA_MODES = ("none", "flip", "tencrop", "affine")
# (degrees, scale, shift x, shift y as fractions of the side): seven draws (torch.Generator seed 1234, rounded) from
# the range training.augment warps faces in (12 degrees, scale 0.9 to 1.1, 10% shifts), so the net sees at test time
# the faces it learnt on. On PublicTest (2026-12-01) they beat tencrop's 2-pixel shifts on seven of the eight
# shipped single models (BENCHMARKS.md, "affine TTA").
AFFINE_WARPS: tuple[tuple[float, float, float, float], ...] = (
    (-11.3, 0.98, -0.048, -0.027),
    (-10.6, 1.04, -0.09, -0.006),
    (4.17, 0.966, 0.057, 0.013),
    (6.6, 1.064, -0.044, 0.036),
    (-5.19, 1.031, -0.052, 0.046),
    (2.43, 0.961, -0.049, 0.026),
    (11.2, 1.048, -0.01, -0.005),
)

# The face detector a job records beside its emotion model (RetinaFace-mobilenet0.25, model.retinaface).
DETECTOR = "retinaface-mnet0.25"

# FER2013 label order.
CLASSES: tuple[str, ...] = ("Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral")

# Pixel statistics of the FER2013 Training split (uint8 / 255).
FER_MEAN = 0.5077
FER_STD = 0.2550


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    input_size: tuple[int, int, int] = (1, 48, 48)
    mean: float = FER_MEAN
    std: float = FER_STD
    classes: tuple[str, ...] = field(default=CLASSES)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        return cls(
            architecture=d["architecture"],
            input_size=tuple(d["input_size"]),
            mean=float(d["mean"]),
            std=float(d["std"]),
            classes=tuple(d["classes"]),
        )
