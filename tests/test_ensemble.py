"""Ensembles behind one model name, and the folding of BatchNorm that every loaded net goes through."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, run_cli, shared_path

from fervid.errors import FervidError
from fervid.model import weights
from fervid.model.ensemble import EnsembleNet
from fervid.model.loader import list_models, load_model, optimize_for_inference
from fervid.model.names import model_identity
from fervid.model.predict import predict_proba
from fervid.model.registry import create_model
from fervid.model.weights import register_ensemble, register_weights, save_weights
from fervid.worker.store.schema import EMOTIONS


def _trained_like(arch: str, seed: int) -> torch.nn.Module:
    """A net with random weights and BatchNorm statistics far from their initial values (so folding matters)."""
    torch.manual_seed(seed)
    net = create_model(arch)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    """Two shipped nets, `a` (small) and `b` (medium), in a weights folder of the test's own."""
    folder = tmp_path / "shipped"
    folder.mkdir()
    for name, arch, seed in (("a", "small", 0), ("b", "medium", 1)):
        net = _trained_like(arch, seed)
        save_weights(net, folder / f"{name}.safetensors", net.cfg)
        register_weights(name, folder / f"{name}.safetensors")
    monkeypatch.setattr(weights, "WEIGHTS_DIR", folder)
    return folder


@pytest.mark.parametrize("arch", ["seed", "small", "medium", "resnet"])
def test_folding_batchnorm_keeps_outputs_class_and_config(arch):
    net = _trained_like(arch, 3)
    x = torch.randn(6, 1, 48, 48)
    with torch.no_grad():
        before = net(x)
        folded = optimize_for_inference(net)
        after = folded(x)
    assert type(folded) is type(net) and folded.cfg.architecture == arch
    assert torch.allclose(before, after, atol=1e-4), (before - after).abs().max()
    if arch != "seed":  # the seed's BatchNorms follow a ReLU, and nothing can be folded there
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())


def test_an_ensemble_averages_its_members_with_flips(shipped):
    sha = register_ensemble("duo", ["a", "b"], tta="flip")
    clf = load_model("duo")
    assert clf.name == "duo" and clf.sha256 == sha and model_identity("duo") == ("duo", sha)
    assert isinstance(clf.net, EnsembleNet) and clf.cfg.classes == load_model("a").cfg.classes
    faces = torch.randint(0, 256, (10, 48, 48), dtype=torch.uint8)
    amp = clf.precision == "bf16"  # the default arithmetic of this machine, for the members too
    expected = (predict_proba(load_model("a").net, faces, tta="flip", amp=amp) +
                predict_proba(load_model("b").net, faces, tta="flip", amp=amp)) / 2  # fmt: skip
    got = clf.predict_proba(faces)
    assert torch.allclose(got, expected, atol=1e-5) and torch.allclose(got.sum(1), torch.ones(10), atol=1e-5)
    # Without TTA the mean of the plain predictions; a different identity.
    plain = register_ensemble("duo", ["a", "b"], tta="none")
    assert plain != sha
    expected = (predict_proba(load_model("a").net, faces, amp=amp) +
                predict_proba(load_model("b").net, faces, amp=amp)) / 2  # fmt: skip
    assert torch.allclose(load_model("duo").predict_proba(faces), expected, atol=1e-5)
    # Ten crops: the mean over both members' ten views each, the same views `fervid eval --tta tencrop` averages.
    crops = register_ensemble("duo", ["a", "b"], tta="tencrop")
    assert crops not in (sha, plain)
    expected = (predict_proba(load_model("a").net, faces, tta="tencrop", amp=amp) +
                predict_proba(load_model("b").net, faces, tta="tencrop", amp=amp)) / 2  # fmt: skip
    assert torch.allclose(load_model("duo").predict_proba(faces), expected, atol=1e-5)
    # Affine: the face, its mirror and the fixed warps of model.config.AFFINE_WARPS, each mirrored too.
    warps = register_ensemble("duo", ["a", "b"], tta="affine")
    assert warps not in (sha, plain, crops)
    expected = (predict_proba(load_model("a").net, faces, tta="affine", amp=amp) +
                predict_proba(load_model("b").net, faces, tta="affine", amp=amp)) / 2  # fmt: skip
    assert torch.allclose(load_model("duo").predict_proba(faces), expected, atol=1e-5)
    plain = register_ensemble("duo", ["a", "b"], tta="none")
    row = [r for r in list_models() if r["name"] == "duo"][0]
    n_a = sum(p.numel() for p in create_model("small").parameters())
    n_b = sum(p.numel() for p in create_model("medium").parameters())
    assert row["architecture"] == "ensemble" and row["parameters"] == n_a + n_b and row["sha256"] == plain


def test_an_ensemble_refuses_members_retrained_since_it_was_registered(shipped):
    register_ensemble("duo", ["a", "b"])
    net = _trained_like("medium", 7)
    save_weights(net, shipped / "b.safetensors", net.cfg)
    register_weights("b", shipped / "b.safetensors")
    with pytest.raises(FervidError, match="'duo': the weights of its members .* changed"):
        load_model("duo")
    sha = register_ensemble("duo", ["a", "b"])
    assert load_model("duo").sha256 == sha


def test_an_ensemble_named_by_its_members(shipped, tmp_path):
    """`a+b` anywhere a model name goes: the flip-averaged ensemble of its members, registered nowhere; a member
    given as a weights file is recorded by its absolute path, as a job records a single model."""
    register_ensemble("duo", ["a", "b"], tta="flip")
    registered = load_model("duo")
    clf = load_model("a+b")
    assert clf.name == "a+b" and isinstance(clf.net, EnsembleNet) and clf.net.tta == "flip"
    assert clf.sha256 == registered.sha256 and model_identity("a+b") == ("a+b", registered.sha256)
    faces = torch.randint(0, 256, (10, 48, 48), dtype=torch.uint8)
    assert torch.equal(clf.predict_proba(faces), registered.predict_proba(faces))
    assert model_identity("b+a")[1] != registered.sha256  # the order is part of the identity

    loose = tmp_path / "loose.safetensors"
    net = _trained_like("small", 5)
    save_weights(net, loose, net.cfg)
    mixed = load_model(f"a+{loose}")
    ident = model_identity(f"a+{loose}")
    assert ident[0] == f"a+{loose.resolve()}" and mixed.sha256 == ident[1]
    assert load_model(ident[0]).sha256 == ident[1]  # what a worker loads back from the job's record
    expected = (predict_proba(load_model("a").net, faces, tta="flip", amp=mixed.precision == "bf16")
                + predict_proba(load_model(str(loose)).net, faces, tta="flip", amp=mixed.precision == "bf16")) / 2
    assert torch.allclose(mixed.predict_proba(faces), expected, atol=1e-5)

    plus = tmp_path / "a+b.safetensors"  # a file whose own name holds a "+" is one model
    save_weights(net, plus, net.cfg)
    assert load_model(str(plus)).net.cfg.architecture == "small" and model_identity(str(plus))[0] == str(plus.resolve())
    spelled_twice = f"{loose}+{tmp_path}/../{tmp_path.name}/loose.safetensors"
    for bad, msg in (("a+a", "distinct members"), ("a++b", "distinct members"), (spelled_twice, "distinct members"),
                     ("a+nosuch", "unknown model 'nosuch'")):  # fmt: skip
        with pytest.raises(FervidError, match=msg):
            load_model(bad)
        with pytest.raises(FervidError, match=msg):
            model_identity(bad)


def test_registering_a_bad_ensemble_says_why(shipped):
    with pytest.raises(FervidError, match="'nosuch' is not a shipped weights file"):
        register_ensemble("duo", ["a", "nosuch"])
    register_ensemble("duo", ["a", "b"])
    with pytest.raises(FervidError, match="'duo' is not a shipped weights file"):
        register_ensemble("trio", ["a", "duo"])
    with pytest.raises(FervidError, match="unknown TTA 'mirror'"):
        register_ensemble("trio", ["a", "b"], tta="mirror")
    with pytest.raises(FervidError, match="distinct"):
        register_ensemble("trio", ["a", "a"])
    with pytest.raises(FervidError, match="names shipped weights, not an ensemble"):
        register_ensemble("a", ["b"])


def _build_ensemble_script():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("build_ensemble", ROOT / "scripts" / "build_ensemble.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _confident(classes: list[int], p: float) -> np.ndarray:
    probs = np.full((len(classes), 7), (1 - p) / 6)
    probs[np.arange(len(classes)), classes] = p
    return probs


def test_an_ensemble_is_chosen_on_fer2013_without_losing_on_ferplus():
    """A subset perfect on FER2013 but wrong where the FER+ crowd disagrees loses to one that keeps the FER+ floor."""
    rank_subsets = _build_ensemble_script().rank_subsets
    fer2013 = [0, 1, 2, 3, 4, 5, 6, 0, 1, 2]
    ferplus = np.array([0, 1, 2, 3, 4, 5, 3, 3, 3, -1])  # rows 6-8: the crowd says Happy; row 9 has no majority
    crowd = [int(f) if f >= 0 else c for f, c in zip(ferplus, fer2013, strict=True)]
    probs = {"fer": _confident(fer2013, 0.6), "fer2": _confident(fer2013, 0.6), "plus": _confident(crowd, 0.9)}
    labels = np.array(fer2013)

    def table(ranked):  # noqa: ANN001, ANN202
        return [(c.members, c.tta, c.fer2013, c.ferplus) for c in ranked]

    # No floor (a new name): FER2013 first, then FER+, then the larger subset; "plus" is outvoted by the two fers.
    assert table(rank_subsets({"none": probs}, labels, ferplus)[:2]) == [
        (("fer", "fer2", "plus"), "none", 1.0, 6 / 9), (("fer", "fer2"), "none", 1.0, 6 / 9)]  # fmt: skip
    # A floor of 0.9 on FER+: only the pairs with "plus" keep it, and they lead whatever their FER2013.
    ranked = rank_subsets({"none": probs}, labels, ferplus, ferplus_floor=0.9)
    assert table(ranked[:2]) == [(("fer", "plus"), "none", 0.7, 1.0), (("fer2", "plus"), "none", 0.7, 1.0)]
    assert ranked[2].members == ("fer", "fer2", "plus") and ranked[2].ferplus < 0.9

    # Without FER+ votes, FER2013 alone ranks; a tie goes to the larger subset, then to the TTA with fewer views.
    assert table(rank_subsets({"flip": probs, "none": probs}, labels, None, ferplus_floor=0.9)[:4]) == [
        (("fer", "fer2", "plus"), "none", 1.0, None), (("fer", "fer2", "plus"), "flip", 1.0, None),
        (("fer", "fer2"), "none", 1.0, None), (("fer", "fer2"), "flip", 1.0, None),
    ]  # fmt: skip


def test_build_ensemble_registers_its_choice_and_then_keeps_its_ferplus(shipped, tmp_path, monkeypatch, capsys):
    """The script as a maintainer runs it: scores every subset and TTA on PublicTest, then registers the best; run
    again, it measures the registered ensemble first and holds a new choice to its FER+ accuracy."""
    rng = np.random.default_rng(0)
    n = 40
    votes = rng.integers(0, 6, size=(n, 10)).astype(np.uint8)
    np.savez(tmp_path / "d.npz", images=rng.integers(0, 256, size=(n, 48, 48), dtype=np.uint8),
             labels=rng.integers(0, 7, size=n), usage=np.array([1] * 30 + [2] * 10, np.uint8),
             ferplus_votes=votes, ferplus_valid=np.ones(n, bool))  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["build_ensemble", "duo", "a", "b", "--tta", "none", "flip",
                                      "--data", str(tmp_path / "d.npz")])  # fmt: skip
    script = _build_ensemble_script()
    script.main()
    out = capsys.readouterr().out
    chosen = next(line for line in out.splitlines() if line.startswith("chosen: "))
    assert chosen.startswith("chosen: a + b with ") and "FER+" in chosen and "duo now:" not in out
    tta = chosen.split(" with ")[1].split()[0]
    members, registered_tta, sha = weights.shipped_ensemble("duo")
    assert members == ["a", "b"] and registered_tta == tta
    assert out.count("PublicTest FER2013") == 2 * 2 + 2 + 1  # each member and the pair under each TTA; the choice

    script.main()
    out = capsys.readouterr().out
    now = next(line for line in out.splitlines() if line.startswith("duo now: "))
    assert now.startswith(f"duo now: a + b with {tta} TTA") and "keeps FER+ at" in now
    assert "right on 0 faces it gets wrong, wrong on 0 it gets right" in out  # the same choice again
    assert "not better than duo now beyond chance on PublicTest: 'duo' is left as it is" in out
    assert weights.shipped_ensemble("duo") == (members, tta, sha)


def test_a_new_ensemble_must_beat_the_registered_one_beyond_chance():
    beats = _build_ensemble_script().beats
    labels = np.zeros(1000, int)
    old = np.ones(1000, int)  # wrong everywhere
    new = old.copy()
    new[:10] = 0  # right on 10 faces the old one gets wrong: 10 - 0 > 1.96 * sqrt(10)
    assert beats(new, old, labels) == (True, 10, 0)
    old[10:16] = 0  # the old one right on 6 others: 10 - 6 is no lead among 16 coin flips
    assert beats(new, old, labels) == (False, 10, 6)
    new[10:16] = 0
    assert beats(new, old, labels) == (True, 10, 0)
    assert beats(old, old, labels) == (False, 0, 0)


def test_the_shipped_accurate_ensemble_wherever_a_model_name_goes(fer_npz, tmp_path):
    """`accurate` as a user meets it: listed with the numbers its manifest holds, evaluated, and analysing a clip.

    Its full-split figures come from `scripts.measure_model` (the committed report, checked against the manifest):
    recomputing PrivateTest's costs about 11 minutes on a 2-core CPU (six members, 16 views a face). `fervid eval`
    runs on the first 32 PrivateTest faces here and must predict what its members' own probabilities, averaged over
    its views, predict."""
    from fervid.model.config import REFERENCE_PRECISION
    from fervid.training.data import SPLITS, load_fer2013
    from fervid.training.evaluate import confusion_matrix

    listed = {r["name"]: r for r in json.loads(run_cli("models", "--json", check=True).stdout)}["accurate"]
    members, tta, sha = weights.shipped_ensemble("accurate")
    assert listed["architecture"] == "ensemble" and len(members) >= 2 and listed["sha256"] == sha
    ev = listed["eval"]
    committed = json.loads((ROOT / "model" / "weights" / "accurate.PrivateTest.json").read_text())
    assert ev["weights_sha256"] == committed["weights_sha256"] == sha
    assert ev["PrivateTest"]["accuracy"] == committed["accuracy"] >= 0.71 and committed["n"] == 3589
    best_member = max(weights.measured_eval(m)["PrivateTest"]["accuracy"] for m in members)
    assert committed["accuracy"] > best_member

    faces, labels = load_fer2013(str(fer_npz)).split("PrivateTest")
    faces, labels = faces[:32], labels[:32]
    part = tmp_path / "private32.npz"
    np.savez(part, images=faces, labels=labels, usage=np.full(32, SPLITS.index("PrivateTest"), np.uint8))
    report = json.loads(run_cli("eval", "--model", "accurate", "--data", str(part), "--split", "PrivateTest",
                                "--json", check=True).stdout)  # fmt: skip
    assert report["weights_sha256"] == sha and report["n"] == 32
    probs = [load_model(m, precision=REFERENCE_PRECISION).predict_proba(torch.from_numpy(faces), tta=tta)
             for m in members]  # fmt: skip
    pred = torch.stack(probs).mean(0).argmax(1).numpy()
    assert report["confusion"] == confusion_matrix(labels, pred, 7).tolist()
    assert report["accuracy"] == round(float((pred == labels).mean()), 4)
    db, out = f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "t.csv"
    run_cli("analyze", str(shared_path("videos", "pyfeat_single_face.mp4")), "--fps", "5", "--model", "accurate",
            "--db", db, "--csv", str(out), "--json", str(tmp_path / "t.json"), check=True)  # fmt: skip
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and all(abs(sum(float(r[e]) for e in EMOTIONS) - 1) < 1e-3 for r in rows)
    job = json.loads((tmp_path / "t.json").read_text())["jobs"][0]
    assert job["model"] == "accurate" and job["model_sha256"] == listed["sha256"]
