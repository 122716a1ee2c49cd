"""Weights files: fp16 safetensors whose metadata says what they are (architecture, classes, accuracies...)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError

from fervid.checksum import sha256_file
from fervid.errors import FervidError
from fervid.model.config import TTA_MODES, ModelConfig

if TYPE_CHECKING:  # the manifest is read where torch is never loaded (`fervid submit`, `fervid status`)
    from torch import nn

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def save_weights(net: nn.Module, path: Path, cfg: ModelConfig, **info: object) -> str:
    """Write `net` as fp16 safetensors with its config and `info` (JSON-encoded) in the metadata.

    BatchNorm running statistics are kept in fp32: fp16 loses the variance of quiet channels.
    Returns the file's sha256.
    """
    tensors = {}
    for k, v in net.state_dict().items():
        v = v.detach().cpu()
        if v.is_floating_point() and "running_" not in k:
            v = v.half()
        tensors[k] = v.contiguous()
    metadata = {"config": json.dumps(cfg.to_dict())}
    metadata.update({k: json.dumps(v) for k, v in info.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    from safetensors.torch import save_file

    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)
    return sha256_file(path)


def read_metadata(path: Path) -> dict:
    """The decoded metadata of a weights file (config as ModelConfig under 'config')."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FervidError(f"{path}: weights file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise FervidError(f"{path}: not a readable safetensors weights file ({e})") from None
    if "config" not in raw:
        raise FervidError(f"{path}: weights file has no fervid config in its metadata")
    try:
        meta = {k: json.loads(v) for k, v in raw.items()}
        meta["config"] = ModelConfig.from_dict(meta["config"])
    except (ValueError, KeyError, TypeError) as e:
        raise FervidError(f"{path}: weights metadata is malformed ({e})") from None
    return meta


def load_state_dict_into(net: nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise FervidError(f"{path}: not a readable safetensors weights file ({e})") from None
    own = net.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    wrong = [k for k in own if k in tensors and tensors[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        detail = (missing[:2] and f"missing {missing[:2]}") or (unexpected[:2] and f"unexpected {unexpected[:2]}")
        if not detail:
            k = wrong[0]
            detail = f"shape of {k} is {tuple(tensors[k].shape)}, expected {tuple(own[k].shape)}"
        raise FervidError(f"{path}: weights do not fit architecture {net.cfg.architecture!r}: {detail}")
    net.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()})


def read_manifest(weights_dir: Path | None = None) -> dict[str, dict]:
    """{name: {"file", "sha256", "eval"?}} of the shipped weights (model/weights/manifest.json), and
    {name: {"members", "tta", "sha256", "eval"?}} of the shipped ensembles of them.

    "eval" holds the numbers measured on those weights by `python -m scripts.measure_model NAME` (accuracies, FER+
    majority accuracy, faces/s, the CPU and date); it names the sha256 it was measured on.
    """
    manifest = (weights_dir or WEIGHTS_DIR) / "manifest.json"
    if not manifest.is_file():
        return {}
    return json.loads(manifest.read_text())


def shipped_weights(name: str, weights_dir: Path | None = None) -> tuple[Path, str] | None:
    """(path, expected sha256) of the shipped weights called `name`, or None."""
    weights_dir = weights_dir or WEIGHTS_DIR
    entry = read_manifest(weights_dir).get(name)
    return (weights_dir / entry["file"], entry["sha256"]) if entry and "file" in entry else None


def shipped_ensemble(name: str, weights_dir: Path | None = None) -> tuple[list[str], str, str] | None:
    """(member names, TTA, expected sha256) of the shipped ensemble called `name`, or None."""
    entry = read_manifest(weights_dir).get(name)
    return (list(entry["members"]), entry["tta"], entry["sha256"]) if entry and "members" in entry else None


def _write_manifest(weights_dir: Path, manifest: dict[str, dict]) -> None:
    tmp = weights_dir / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.replace(weights_dir / "manifest.json")


def register_weights(name: str, path: Path) -> None:
    """Record a weights file lying in its weights folder (name, file, sha256) in that folder's manifest.

    The entry's measured "eval" block is kept only while it was measured on these very weights.
    """
    path = Path(path).resolve()
    manifest = read_manifest(path.parent)
    entry = {"file": path.name, "sha256": sha256_file(path)}
    old_eval = manifest.get(name, {}).get("eval")
    if old_eval and old_eval.get("weights_sha256") == entry["sha256"]:
        entry["eval"] = old_eval
    manifest[name] = entry
    _write_manifest(path.parent, manifest)


def ensemble_sha256(members: dict[str, str], tta: str) -> str:
    """What identifies an ensemble: its members' names and weights checksums, in order, and its TTA."""
    blob = json.dumps({"members": list(members.items()), "tta": tta})
    return hashlib.sha256(blob.encode()).hexdigest()


def register_ensemble(name: str, members: list[str], tta: str = "flip", weights_dir: Path | None = None) -> str:
    """Record an ensemble of shipped weights under `name` in the manifest; returns its sha256.

    The sha256 covers the members' weights checksums: retrained members make the ensemble refuse to load until it
    is registered again (and measured again).
    """
    weights_dir = weights_dir or WEIGHTS_DIR
    manifest = read_manifest(weights_dir)
    if name in manifest and "members" not in manifest[name]:
        raise FervidError(f"{name!r} names shipped weights, not an ensemble")
    if len(set(members)) != len(members) or not members:
        raise FervidError(f"ensemble {name!r}: members must be distinct and at least one: {members}")
    for m in members:
        if shipped_weights(m, weights_dir) is None:
            raise FervidError(f"ensemble {name!r}: {m!r} is not a shipped weights file (an ensemble holds weights)")
    if tta not in TTA_MODES:
        raise FervidError(f"ensemble {name!r}: unknown TTA {tta!r} (known: {', '.join(TTA_MODES)})")
    sha = ensemble_sha256({m: manifest[m]["sha256"] for m in members}, tta)
    entry: dict = {"members": list(members), "tta": tta, "sha256": sha}
    old_eval = manifest.get(name, {}).get("eval")
    if old_eval and old_eval.get("weights_sha256") == sha:
        entry["eval"] = old_eval
    manifest[name] = entry
    _write_manifest(weights_dir, manifest)
    return sha


def record_eval(name: str, measured: dict, weights_dir: Path | None = None) -> None:
    """Store `measured` as the "eval" block of shipped model `name` (it must name the weights' sha256)."""
    weights_dir = weights_dir or WEIGHTS_DIR
    manifest = read_manifest(weights_dir)
    if name not in manifest:
        raise FervidError(f"model {name!r} is not in {weights_dir / 'manifest.json'}")
    if measured.get("weights_sha256") != manifest[name]["sha256"]:
        raise FervidError(f"these numbers were not measured on the shipped {name!r} weights (sha256 differs)")
    manifest[name]["eval"] = measured
    _write_manifest(weights_dir, manifest)


def measured_eval(name: str, weights_dir: Path | None = None) -> dict | None:
    """The "eval" block of shipped model `name`, or None (none measured, or measured on other weights)."""
    entry = read_manifest(weights_dir).get(name) or {}
    measured = entry.get("eval")
    return measured if measured and measured.get("weights_sha256") == entry.get("sha256") else None
