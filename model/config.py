"""What a model needs to be used: classes, input size and normalisation, carried by the model itself.

Like timm's pretrained_cfg: every net has `net.cfg`, and preprocessing (`fervid.model.predict.preprocess`) reads
it, so no caller repeats the constants.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# The shipped model used when none is named (`Settings.model`, `fervid eval --model`, `fervid models`' "*").
# Here, not in the heavier loader, because worker.settings reads it while every `fervid` command builds its parser.
DEFAULT_MODEL = "medium-distilled"

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

