"""Every training setting and its default, in one block (`fervid train` reads its options' defaults here)."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class TrainConfig:
    arch: str
    data: str
    out: str
    epochs: int = 60
    batch_size: int = 128
    lr: float = 0.05
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    # Weight of the FER+ crowd's vote distribution in the target (0: FER2013's labels alone). FER2013's labels are
    # one annotator's; the ten FER+ votes per face say how ambiguous it is.
    soft_targets: float = 0.0
    # Distillation: the weight of a trained model's class probabilities in the target (0: off), and that model (a
    # shipped name, an ensemble's too, or a .safetensors path). It teaches what an ensemble knows to one small net.
    distill: float = 0.0
    teacher: str = ""
    # MixUp and CutMix: the alpha of the Beta distribution their mixing weight is drawn from (0: off; both on:
    # one or the other per batch, as timm does). Targets mix with the images, so they combine with every target above.
    mixup: float = 0.0
    cutmix: float = 0.0
    # Fine-tuning: start from a trained model's weights (a shipped name or a .safetensors path, of --arch) instead
    # of random ones, e.g. to teach a shipped model a better teacher in a fraction of a full run.
    init: str = ""
    ema: float = 0.0  # decay of an exponential moving average of the weights, evaluated and exported (0: off)
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"  # bf16 autocast: auto = on CUDA and on CPUs with native bf16
    limit: int = 0  # use only the first N rows of each split (smoke tests)


def default(field_name: str) -> object:
    return next(f.default for f in fields(TrainConfig) if f.name == field_name)
