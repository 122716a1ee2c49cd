"""Ready-to-use emotion models by name: weights, classes, input size and preprocessing in one object."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from fervid.checksum import sha256_file
from fervid.errors import FervidError
from fervid.model import weights
from fervid.model.architectures import EmotionNet
from fervid.model.config import DEFAULT_MODEL, DEFAULT_PRECISION, SCORING_BATCH, ModelConfig
from fervid.model.device import resolve_precision
from fervid.model.ensemble import EnsembleNet
from fervid.model.names import ADHOC_TTA, adhoc_members, distinct_ids, resolve_weights
from fervid.model.predict import predict_proba, predict_proba_modes, preprocess
from fervid.model.registry import ARCHITECTURES, count_parameters, create_model
from fervid.model.weights import ensemble_sha256, load_state_dict_into, read_metadata


@dataclass
class EmotionClassifier:
    name: str
    net: EmotionNet
    meta: dict
    path: Path
    sha256: str
    precision: str = "fp32"  # what predict_proba computes in: "fp32" or "bf16" (resolved, never "auto")

    @property
    def cfg(self) -> ModelConfig:
        return self.net.cfg

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
        return preprocess(faces, self.cfg, self.device)

    def predict_proba(self, faces: torch.Tensor, batch_size: int = SCORING_BATCH, tta: str = "none") -> torch.Tensor:
        """Class probabilities [N, 7] (on the CPU) for uint8 faces at the model's input size."""
        return predict_proba(self.net, faces, batch_size=batch_size, tta=tta, amp=self.precision == "bf16")

    def predict_proba_modes(self, faces: torch.Tensor, modes: tuple[str, ...],
                            batch_size: int = SCORING_BATCH) -> dict[str, torch.Tensor]:  # fmt: skip
        """{TTA mode: class probabilities [N, 7]}, each view computed once for all the modes."""
        return predict_proba_modes(self.net, faces, modes, batch_size=batch_size, amp=self.precision == "bf16")


def load_model(name_or_path: str, device: str | torch.device = "cpu", optimize: bool = True,
               precision: str = DEFAULT_PRECISION) -> EmotionClassifier:  # fmt: skip
    """A shipped model by name (checksum verified), or a weights file by path, in eval mode on `device`.

    With `optimize`, BatchNorm is folded into the convolutions (`optimize_for_inference`); the net always
    runs channels_last. A shipped ensemble's name loads its members, each checked, behind one net. `precision`
    (auto, fp32, bf16) is what `predict_proba` computes in; the weights stay float32 either way.
    """
    resolved = resolve_precision(precision, torch.device(device))
    ensemble = weights.shipped_ensemble(name_or_path)
    members = None if ensemble else adhoc_members(name_or_path)
    if ensemble or members:
        spec = ensemble or (members, ADHOC_TTA, None)  # named by its members: nothing registered to check against
        clf = _load_ensemble(name_or_path, *spec, device=device, optimize=optimize)
        clf.precision = resolved
        return clf
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
    net = create_model(cfg.architecture, cfg)
    load_state_dict_into(net, path)
    if optimize:
        net = optimize_for_inference(net)
    net = net.to(device).to(memory_format=torch.channels_last).eval()
    return EmotionClassifier(name=name, net=net, meta=meta, path=path, sha256=sha, precision=resolved)


def _load_ensemble(name: str, members: list[str], tta: str, expected_sha: str | None, device: str | torch.device,
                   optimize: bool) -> EmotionClassifier:  # fmt: skip
    loaded = [load_model(m, device=device, optimize=optimize) for m in members]
    # Each member as model_identity records it (a shipped name, or its weights file's absolute path), from what
    # was loaded: a loose file is read and hashed once.
    shipped = weights.read_manifest()
    ids = distinct_ids(name, [(m if m in shipped else str(c.path.resolve()), c.sha256)
                               for m, c in zip(members, loaded, strict=True)])  # fmt: skip
    sha = ensemble_sha256(ids, tta)
    if expected_sha is not None and sha != expected_sha:
        raise FervidError(
            f"model {name!r}: the weights of its members ({', '.join(members)}) changed since the ensemble was "
            "registered; register it again (fervid.model.weights.register_ensemble) and measure it again"
        )
    net = EnsembleNet([c.net for c in loaded], tta=tta).to(device).eval()
    meta = {"config": net.cfg, "members": members, "tta": tta}
    return EmotionClassifier(name=name, net=net, meta=meta, path=weights.WEIGHTS_DIR / "manifest.json", sha256=sha)


def optimize_for_inference(net: EmotionNet) -> EmotionNet:
    """Fold each BatchNorm into the conv or linear layer just before it, in place (about 1.5x faster on a CPU, the
    same outputs to rounding). The net keeps its class and its config."""
    net.eval()
    for seq in [m for m in net.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            a, b = seq[i], seq[i + 1]
            if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d):
                seq[i], seq[i + 1] = fuse_conv_bn_eval(a, b), nn.Identity()
            elif isinstance(a, nn.Linear) and isinstance(b, nn.BatchNorm1d):
                seq[i], seq[i + 1] = fuse_linear_bn_eval(a, b), nn.Identity()
    return net


def _weights_row(name: str, arch: str) -> dict:
    net = create_model(arch)
    trainable, _ = count_parameters(net)
    row = {"name": name, "architecture": arch, "default": name == DEFAULT_MODEL, "parameters": trainable,
           "input_size": list(net.cfg.input_size), "accuracy": {}, "eval": None, "weights": None,
           "sha256": None}  # fmt: skip
    shipped = weights.shipped_weights(name)
    if shipped:
        path, sha = shipped
        measured = weights.measured_eval(name)
        if measured:
            accuracy = {s: measured[s]["accuracy"] for s in ("PublicTest", "PrivateTest") if s in measured}
        else:
            accuracy = read_metadata(path).get("accuracy", {})
        row.update(accuracy=accuracy, eval=measured, weights=str(path), sha256=sha)
    return row


def list_models() -> list[dict]:
    """Every architecture, then every other shipped weights file (named apart from its architecture), then the
    shipped ensembles, with their measured numbers where there are some.

    "default" marks DEFAULT_MODEL. "eval" is the manifest's block measured on the shipped weights
    (scripts/measure_model.py), read as stored, never recomputed; None without one. "accuracy" is
    {split: accuracy} from that block, or, for weights never measured, the accuracies training wrote into the
    weights' metadata (those are of the fp32 net before export, so they can differ in the 4th digit).
    """
    manifest = weights.read_manifest()
    rows = [_weights_row(arch, arch) for arch in ARCHITECTURES]
    rows += [_weights_row(name, read_metadata(weights.WEIGHTS_DIR / entry["file"])["config"].architecture)
             for name, entry in manifest.items() if "file" in entry and name not in ARCHITECTURES]  # fmt: skip
    for name, entry in manifest.items():
        if "members" not in entry:
            continue
        measured = weights.measured_eval(name)
        accuracy = {s: measured[s]["accuracy"] for s in ("PublicTest", "PrivateTest") if s in (measured or {})}
        params = 0
        for m in entry["members"]:
            shipped = weights.shipped_weights(m)
            if shipped:
                params += count_parameters(create_model(read_metadata(shipped[0])["config"].architecture))[0]
        rows.append({"name": name, "architecture": "ensemble", "default": name == DEFAULT_MODEL, "parameters": params,
                     "input_size": rows[0]["input_size"], "accuracy": accuracy, "eval": measured,
                     "weights": f"ensemble of {' + '.join(entry['members'])}, {entry['tta']} TTA",
                     "sha256": entry["sha256"]})  # fmt: skip
    return rows
