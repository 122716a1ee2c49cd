"""Weights files: metadata round trip, checksums, and clear errors for the wrong file."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from fervid.errors import FervidError
from fervid.model import weights
from fervid.model.loader import list_models, load_model
from fervid.model.registry import create_model
from fervid.model.weights import read_metadata, register_weights, save_weights


@pytest.fixture
def small_file(tmp_path):
    torch.manual_seed(0)
    net = create_model("small").eval()
    path = tmp_path / "small.safetensors"
    save_weights(net, path, net.cfg, name="small", accuracy={"PublicTest": 0.5})
    return net, path


def test_round_trip_keeps_outputs_and_metadata(small_file):
    net, path = small_file
    meta = read_metadata(path)
    assert meta["accuracy"] == {"PublicTest": 0.5} and meta["config"] == net.cfg
    assert all(v.dtype in (torch.float16, torch.float32, torch.int64) for v in load_file(path).values())
    clf = load_model(str(path))
    x = torch.randint(0, 256, (8, 48, 48), dtype=torch.uint8)
    ref = (net.half().float())(clf.preprocess(x).contiguous()).softmax(1)
    assert torch.allclose(clf.predict_proba(x), ref, atol=1e-3)


def test_weights_for_another_architecture(small_file, tmp_path):
    _, path = small_file
    tensors = load_file(path)
    meta = {k: json.dumps(v) for k, v in read_metadata(path).items() if k != "config"}
    cfg = read_metadata(path)["config"]
    meta["config"] = json.dumps({**cfg.to_dict(), "architecture": "seed"})
    liar = tmp_path / "liar.safetensors"
    save_file(tensors, str(liar), metadata=meta)
    with pytest.raises(FervidError, match="do not fit architecture 'seed'") as e:
        load_model(str(liar))
    assert str(liar) in str(e.value)


def _ship(small_file, tmp_path, monkeypatch):
    """A copy of small's weights registered in a weights folder of the test's own, which the loader then reads."""
    _, path = small_file
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    shutil.copy(path, shipped / "small.safetensors")
    register_weights("small", shipped / "small.safetensors")
    monkeypatch.setattr(weights, "WEIGHTS_DIR", shipped)
    return shipped


def test_checksum_mismatch_of_shipped_weights(small_file, tmp_path, monkeypatch):
    shipped = _ship(small_file, tmp_path, monkeypatch)
    assert load_model("small").sha256 == weights.sha256_file(shipped / "small.safetensors")
    assert [r for r in list_models() if r["name"] == "small"][0]["weights"] == str(shipped / "small.safetensors")
    data = bytearray((shipped / "small.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (shipped / "small.safetensors").write_bytes(bytes(data))
    with pytest.raises(FervidError, match="checksum mismatch"):
        load_model("small")


def test_not_a_weights_file(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"garbage" * 10)
    with pytest.raises(FervidError, match="not a readable safetensors"):
        load_model(str(bad))


def test_unknown_model_name():
    with pytest.raises(FervidError, match="unknown model 'nosuch'"):
        load_model("nosuch")


def test_measured_eval_follows_the_weights(small_file, tmp_path, monkeypatch):
    shipped = _ship(small_file, tmp_path, monkeypatch)
    sha = weights.sha256_file(shipped / "small.safetensors")
    with pytest.raises(FervidError, match="sha256 differs"):
        weights.record_eval("small", {"weights_sha256": "f" * 64})
    with pytest.raises(FervidError, match="not in"):
        weights.record_eval("nosuch", {"weights_sha256": sha})
    measured = {"weights_sha256": sha, "PublicTest": {"accuracy": 0.25}, "PrivateTest": {"accuracy": 0.5}}
    weights.record_eval("small", measured)
    row = [r for r in list_models() if r["name"] == "small"][0]
    assert row["eval"] == measured and row["accuracy"] == {"PublicTest": 0.25, "PrivateTest": 0.5}
    register_weights("small", shipped / "small.safetensors")  # same file again: the numbers still hold
    assert weights.measured_eval("small") == measured
    # New weights in the same place: their old numbers are dropped, and the listing falls back to the metadata.
    net = create_model("small")
    save_weights(net, shipped / "small.safetensors", net.cfg, accuracy={"PublicTest": 0.1})
    register_weights("small", shipped / "small.safetensors")
    assert "eval" not in weights.read_manifest()["small"]
    row = [r for r in list_models() if r["name"] == "small"][0]
    assert row["eval"] is None and row["accuracy"] == {"PublicTest": 0.1}


def test_weights_shipped_under_their_own_name(small_file, tmp_path, monkeypatch):
    """A second set of weights for one architecture ships under a name of its own: listed with its architecture,
    loaded and checksummed by that name, and the architecture's own entry is untouched."""
    shipped = _ship(small_file, tmp_path, monkeypatch)
    shutil.copy(shipped / "small.safetensors", shipped / "small-v2.safetensors")
    register_weights("small-v2", shipped / "small-v2.safetensors")
    rows = {r["name"]: r for r in list_models()}
    assert rows["small-v2"]["architecture"] == "small" and rows["small"]["architecture"] == "small"
    assert rows["small-v2"]["weights"] == str(shipped / "small-v2.safetensors")
    assert rows["small-v2"]["parameters"] == rows["small"]["parameters"]
    assert load_model("small-v2").name == "small-v2"
    assert [r["name"] for r in list_models()].count("small-v2") == 1
