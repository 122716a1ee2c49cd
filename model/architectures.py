"""The emotion classifiers: `seed` (the Keras reference, reproduced exactly), `small` (fast on a CPU), `medium` and
`resnet` (another family, for ensemble members).

Every model here carries its config (`net.cfg`: input size, normalisation, classes), takes a float tensor
[N, 1, 48, 48] normalised as that config says (`fervid.model.predict.preprocess`) and returns logits [N, 7].
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from fervid.model.config import ModelConfig


class EmotionNet(nn.Module):
    """An emotion classifier that carries its own config, as timm models carry their pretrained_cfg.

    The class names its architecture; weights files bring the config they were trained with (same architecture).
    """

    architecture: ClassVar[str]

    def __init__(self, cfg: ModelConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or ModelConfig(architecture=self.architecture)
        if self.cfg.architecture != self.architecture:
            raise ValueError(f"a {self.architecture!r} net cannot take a {self.cfg.architecture!r} config")

    @property
    def num_classes(self) -> int:
        return len(self.cfg.classes)


class SeedCNN(EmotionNet):
    """gitshanks/fer2013's Keras CNN, layer for layer.

    Keras puts the ReLU inside Conv2D (activation='relu') and the BatchNormalization after it, so the
    order here is conv -> ReLU -> BN. BatchNorm uses Keras' defaults (epsilon 1e-3, momentum 0.99, which is
    PyTorch momentum 0.01). The first conv is unpadded (46x46 out) and carries an L2 penalty of 0.01 on its
    kernel, which the trainer adds to the loss through `regularization_loss()`.
    """

    architecture = "seed"
    l2_first_conv = 0.01

    def __init__(self, cfg: ModelConfig | None = None, width: int = 64) -> None:
        super().__init__(cfg)
        w = width

        def bn(c: int) -> nn.BatchNorm2d:
            return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)

        def conv(cin: int, cout: int, padding: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=padding), nn.ReLU(inplace=True)]

        def pool_drop() -> list[nn.Module]:
            return [nn.MaxPool2d(2, 2), nn.Dropout(0.5)]

        self.features = nn.Sequential(
            *conv(1, w, padding=0), *conv(w, w), bn(w), *pool_drop(),
            *conv(w, 2 * w), bn(2 * w), *conv(2 * w, 2 * w), bn(2 * w), *pool_drop(),
            *conv(2 * w, 4 * w), bn(4 * w), *conv(4 * w, 4 * w), bn(4 * w), *pool_drop(),
            *conv(4 * w, 8 * w), bn(8 * w), *conv(8 * w, 8 * w), bn(8 * w), *pool_drop(),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(8 * w * 2 * 2, 8 * w), nn.ReLU(inplace=True), nn.Dropout(0.4),
            nn.Linear(8 * w, 4 * w), nn.ReLU(inplace=True), nn.Dropout(0.4),
            nn.Linear(4 * w, 2 * w), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(2 * w, self.num_classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def regularization_loss(self) -> torch.Tensor:
        first = self.features[0]
        assert isinstance(first, nn.Conv2d)
        return self.l2_first_conv * first.weight.pow(2).sum()


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


class SmallCNN(EmotionNet):
    """A VGG-style net sized for a 2-core CPU.

    FER2013 faces fill the 48x48 frame, so the first conv works at full resolution but only with few
    channels, and each later stage halves the resolution before doubling the width. Plain dense 3x3
    convolutions (no depthwise ones): oneDNN runs them several times closer to peak per FLOP on a CPU,
    so they buy more accuracy per millisecond. Global average pooling keeps the head tiny.
    """

    architecture = "small"

    def __init__(self, cfg: ModelConfig | None = None, widths: tuple[int, ...] = (32, 48, 96, 192)) -> None:
        super().__init__(cfg)
        c1, c2, c3, c4 = widths
        self.features = nn.Sequential(
            *_conv_bn_relu(1, c1), nn.MaxPool2d(2),                           # 48 -> 24
            *_conv_bn_relu(c1, c2), nn.MaxPool2d(2),                          # 24 -> 12
            *_conv_bn_relu(c2, c3), *_conv_bn_relu(c3, c3), nn.MaxPool2d(2),  # 12 -> 6
            *_conv_bn_relu(c3, c4), *_conv_bn_relu(c4, c4),                   # 6
        )  # fmt: skip
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3), nn.Linear(c4, self.num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class MediumCNN(EmotionNet):
    """`small` with two convolutions at every resolution (48, 24, 12, 6) and wider stages: 1.17M parameters,
    ~117 MMAC a face (2.7x small), still above 1,500 faces/s at batch 32 on two CPU cores in fp32
    (BENCHMARKS.md). A candidate for the CPU default, meant to be trained with the FER+ votes and weight averaging."""

    architecture = "medium"

    def __init__(self, cfg: ModelConfig | None = None, widths: tuple[int, ...] = (32, 64, 128, 256)) -> None:
        super().__init__(cfg)
        layers: list[nn.Module] = []
        cin = 1
        for i, w in enumerate(widths):
            layers += _conv_bn_relu(cin, w) + _conv_bn_relu(w, w)
            cin = w
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3), nn.Linear(cin, self.num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _BasicBlock(nn.Module):
    """ResNet's basic block (two 3x3 convolutions and a shortcut; a strided 1x1 projection where the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn_relu(cin, cout, stride),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class ResNetCNN(EmotionNet):
    """A small ResNet: residual blocks and strided convolutions instead of `medium`'s VGG stack and max-pooling.

    Another family than `small` and `medium`, for ensemble members: a student distilled from `accurate` lifted the best
    PublicTest ensemble from 0.7027 to 0.7080 (BENCHMARKS.md), though that ensemble was not shipped.
    """

    architecture = "resnet"

    def __init__(
        self,
        cfg: ModelConfig | None = None,
        widths: tuple[int, ...] = (32, 64, 128, 256),
        blocks: tuple[int, ...] = (1, 1, 2),
    ) -> None:
        super().__init__(cfg)
        c0, *stages = widths
        layers: list[nn.Module] = _conv_bn_relu(1, c0)  # 48
        cin = c0
        for w, n in zip(stages, blocks, strict=True):  # 48 -> 24 -> 12 -> 6
            layers += [_BasicBlock(cin, w, stride=2)] + [_BasicBlock(w, w) for _ in range(n - 1)]
            cin = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3), nn.Linear(cin, self.num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
