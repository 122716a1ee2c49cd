"""Ready-to-use emotion models by name: weights, classes, input size and preprocessing in one object."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

from fervid.checksum import sha256_file
from fervid.errors import FervidError
from fervid.model import weights
from fervid.model.config import DEFAULT_MODEL, ModelConfig
from fervid.model.predict import normalize, predict_proba
from fervid.model.registry import ARCHITECTURES, count_parameters, create_model
from fervid.model.weights import load_state_dict_into, read_metadata


@dataclass
class EmotionClassifier:
    name: str
    net: nn.Module
    meta: dict
    path: Path
    sha256: str

    @property
    def cfg(self) -> ModelConfig:
        return self.net.cfg  # type: ignore[return-value]

    @property
    def classes(self) -> tuple[str, ...]:
        return self.cfg.classes

    @property
    def input_size(self) -> tuple[int, int, int]:
        return self.cfg.input_size

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self, device: str | torch.device) -> EmotionClassifier:
        self.net.to(device)
        return self

    def preprocess(self, faces: torch.Tensor) -> torch.Tensor:
        """uint8 faces [N, H, W] or [N, 1, H, W] at the model's input size -> normalised float NCHW."""
        if faces.ndim == 3:
            faces = faces.unsqueeze(1)
        return normalize(faces.to(self.device).float() / 255.0, self.cfg).contiguous(memory_format=torch.channels_last)

    def predict_proba(self, faces: torch.Tensor, batch_size: int = 256, tta: str = "none") -> torch.Tensor:
        """Class probabilities [N, 7] (on the CPU) for uint8 faces at the model's input size."""
        return predict_proba(self.net, faces, batch_size=batch_size, tta=tta)


def resolve_weights(name_or_path: str) -> tuple[str, Path, str | None]:
    """(name, weights path, expected sha256 or None) for a shipped model name or a weights file path."""
    shipped = weights.shipped_weights(name_or_path)
    if shipped:
        return name_or_path, *shipped
    path = Path(name_or_path)
    if path.suffix == ".safetensors" or path.exists():
        return path.stem, path, None
    if name_or_path in ARCHITECTURES:
        raise FervidError(f"model {name_or_path!r} has no trained weights shipped; train it with `fervid train`")
    known = ", ".join(sorted(weights.read_manifest())) or "none"
    raise FervidError(f"unknown model {name_or_path!r} (shipped: {known}; or give a .safetensors path)")


def model_identity(name_or_path: str) -> tuple[str, str]:
    """What a job records as its model, without loading it: (a shipped name, or the weights file's absolute
    path, which workers then load; the sha256 the loaded model must have)."""
    name, path, expected_sha = resolve_weights(name_or_path)
    if not path.is_file():
        raise FervidError(f"{path}: weights file not found")
    if expected_sha is not None:
        return name_or_path, expected_sha
    return str(path.resolve()), sha256_file(path)


def load_model(name_or_path: str, device: str | torch.device = "cpu", optimize: bool = True) -> EmotionClassifier:
    """A shipped model by name (checksum verified), or a weights file by path, in eval mode on `device`.

    With `optimize`, BatchNorm is folded into the convolutions (`optimize_for_inference`); the net always
    runs channels_last.
    """
    name, path, expected_sha = resolve_weights(name_or_path)
    if not path.is_file():
        raise FervidError(f"{path}: weights file not found")
    sha = sha256_file(path)
    if expected_sha is not None and sha != expected_sha:
        raise FervidError(
            f"{path}: checksum mismatch (sha256 {sha[:12]}..., the manifest expects {expected_sha[:12]}...): "
            "the file is corrupt or was replaced"
        )
    meta = read_metadata(path)
    cfg: ModelConfig = meta["config"]
    if cfg.architecture not in ARCHITECTURES:
        raise FervidError(f"{path}: weights are for unknown architecture {cfg.architecture!r}")
    net = create_model(cfg.architecture)
    net.cfg = cfg  # type: ignore[assignment]
    load_state_dict_into(net, path)
    if optimize:
        net = optimize_for_inference(net)
    net = net.to(device).to(memory_format=torch.channels_last).eval()
    return EmotionClassifier(name=name, net=net, meta=meta, path=path, sha256=sha)


def optimize_for_inference(net: nn.Module) -> nn.Module:
    """Fold each BatchNorm into the conv before it (about 1.5x faster on a CPU, same outputs to rounding)."""
    cfg = net.cfg
    fused = fuse(net.eval())
    fused.cfg = cfg  # type: ignore[assignment]
    return fused


def list_models() -> list[dict]:
    """Every architecture, with its shipped weights and their measured numbers where there are some.

    "default" marks DEFAULT_MODEL. "eval" is the manifest's block measured on the shipped weights
    (scripts/measure_model.py), read as stored, never recomputed; None without one. "accuracy" is
    {split: accuracy} from that block, or, for weights never measured, the accuracies training wrote into the
    weights' metadata (those are of the fp32 net before export, so they can differ in the 4th digit).
    """
    rows = []
    for arch in ARCHITECTURES:
        net = create_model(arch)
        trainable, _ = count_parameters(net)
        row = {"name": arch, "architecture": arch, "default": arch == DEFAULT_MODEL, "parameters": trainable,
               "input_size": list(net.cfg.input_size), "accuracy": {}, "eval": None, "weights": None,
               "sha256": None}  # fmt: skip
        shipped = weights.shipped_weights(arch)
        if shipped:
            path, sha = shipped
            measured = weights.measured_eval(arch)
            if measured:
                accuracy = {s: measured[s]["accuracy"] for s in ("PublicTest", "PrivateTest") if s in measured}
            else:
                accuracy = read_metadata(path).get("accuracy", {})
            row.update(accuracy=accuracy, eval=measured, weights=str(path), sha256=sha)
        rows.append(row)
    return rows
