"""What a model's name means without loading it: a shipped weights file, a shipped ensemble, an ensemble named by
its members (`a+b+c`) or a weights file's path, and what a job records as its model. Free of torch, so that the
commands that only submit or watch jobs start in a fraction of a second."""

from __future__ import annotations

from pathlib import Path

from fervid.checksum import sha256_file
from fervid.errors import FervidError
from fervid.model import weights

ADHOC_TTA = "flip"  # what an ensemble named by its members (`a+b+c`) averages over, as shipped ensembles mostly do


def resolve_weights(name_or_path: str) -> tuple[str, Path, str | None]:
    """(name, weights path, expected sha256 or None) for a shipped model name or a weights file path."""
    shipped = weights.shipped_weights(name_or_path)
    if shipped:
        return name_or_path, *shipped
    path = Path(name_or_path)
    if path.suffix == ".safetensors" or path.exists():
        return path.stem, path, None
    from fervid.model.registry import ARCHITECTURES  # torch, on this error's path only

    if name_or_path in ARCHITECTURES:
        raise FervidError(f"model {name_or_path!r} has no trained weights shipped; train it with `fervid train`")
    known = ", ".join(sorted(weights.read_manifest())) or "none"
    raise FervidError(f"unknown model {name_or_path!r} (shipped: {known}; or a .safetensors path; or a+b+c)")


def adhoc_members(name_or_path: str) -> list[str] | None:
    """The members of an ensemble named by them, `a+b+c` (shipped names or weights paths, averaged with
    ADHOC_TTA), or None for a single model's name or path (a file whose own name holds a `+` stays one model)."""
    if "+" not in name_or_path or weights.read_manifest().get(name_or_path) or Path(name_or_path).exists():
        return None
    members = name_or_path.split("+")
    if not all(members) or len(set(members)) != len(members):
        raise FervidError(f"model {name_or_path!r}: an ensemble names distinct members as a+b+c")
    return members


def distinct_ids(name: str, identities: list[tuple[str, str]]) -> dict[str, str]:
    """{member identity: sha256} of an ensemble, refusing one weights file named twice (two spellings of a path)."""
    ids = dict(identities)
    if len(ids) != len(identities):
        raise FervidError(f"model {name!r}: an ensemble names distinct members as a+b+c")
    return ids


def model_identity(name_or_path: str) -> tuple[str, str]:
    """What a job records as its model, without loading it: (a shipped name, or the weights file's absolute
    path, which workers then load; the sha256 the loaded model must have). An ensemble named `a+b+c` is
    recorded as its members' identities joined by `+`."""
    ensemble = weights.shipped_ensemble(name_or_path)
    if ensemble:
        return name_or_path, ensemble[2]
    members = adhoc_members(name_or_path)
    if members:
        ids = distinct_ids(name_or_path, [model_identity(m) for m in members])
        return "+".join(ids), weights.ensemble_sha256(ids, ADHOC_TTA)
    name, path, expected_sha = resolve_weights(name_or_path)
    if not path.is_file():
        raise FervidError(f"{path}: weights file not found")
    if expected_sha is not None:
        return name_or_path, expected_sha
    return str(path.resolve()), sha256_file(path)
