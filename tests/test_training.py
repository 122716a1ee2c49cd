"""`fervid train` end to end on a slice of the real FER2013: both architectures, and resume after a kill."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fervid.model.loader import load_model
from fervid.model.weights import read_metadata
from tests.conftest import ROOT, run_cli


@pytest.mark.parametrize("arch, extra", [("small", []), ("seed", []),
                                         ("medium", ["--soft-targets", "0.5", "--ema", "0.99"]),
                                         ("resnet", [])])  # fmt: skip
def test_one_epoch_smoke_training(arch, extra, fer_npz, tmp_path):
    out = tmp_path / arch
    run_cli("train", "--arch", arch, "--data", str(fer_npz), "--out", str(out),
            "--epochs", "1", "--limit", "256", "--batch-size", "64", *extra, check=True)  # fmt: skip
    assert (out / "last.pt").is_file() and (out / "train.log").is_file()
    meta = read_metadata(out / "model.safetensors")
    assert meta["config"].architecture == arch
    assert set(meta["accuracy"]) == {"PublicTest", "PrivateTest"}
    assert meta["command"].startswith("fervid train --arch " + arch)
    clf = load_model(str(out / "model.safetensors"))
    probs = clf.predict_proba(torch.zeros(4, 48, 48, dtype=torch.uint8))
    assert probs.shape == (4, 7) and torch.allclose(probs.sum(1), torch.ones(4), atol=1e-4)


def test_existing_run_needs_resume(fer_npz, tmp_path):
    args = ["train", "--arch", "small", "--data", str(fer_npz), "--out", str(tmp_path),
            "--epochs", "1", "--limit", "128", "--batch-size", "64"]  # fmt: skip
    run_cli(*args, check=True)
    proc = run_cli(*args)
    assert proc.returncode == 2 and "--resume" in proc.stderr and "Traceback" not in proc.stderr


def _train_args(fer_npz, out, extra=()):
    return ["train", "--arch", "small", "--data", str(fer_npz), "--out", str(out),
            "--epochs", "3", "--limit", "512", "--batch-size", "64", *extra]  # fmt: skip


@pytest.mark.parametrize("extra", [(), ("--soft-targets", "0.5", "--ema", "0.99", "--cutmix", "1", "--mixup", "0.2")],
                         ids=["plain", "soft-ema-mix"])  # fmt: skip
def test_resume_after_kill_matches_uninterrupted_run(extra, fer_npz, tmp_path):
    run_cli(*_train_args(fer_npz, tmp_path / "full", extra), check=True)

    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "fervid.cli", *_train_args(fer_npz, cut, extra)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    log = cut / "train.log"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and "epoch 1/3" in log.read_text()):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (cut / "model.safetensors").exists()

    resumed = run_cli(*_train_args(fer_npz, cut, extra), "--resume", check=True)
    assert "epoch 1/3" not in resumed.stderr + resumed.stdout  # epoch 1 is not trained again
    assert "resumed from" in log.read_text()
    full, again = load_file(tmp_path / "full" / "model.safetensors"), load_file(cut / "model.safetensors")
    assert full.keys() == again.keys()
    for k in full:
        assert torch.equal(full[k], again[k]), k
    hist = torch.load(cut / "last.pt", weights_only=False)["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert json.loads(json.dumps(hist)) == hist  # history is plain data


def test_a_checkpoint_from_before_new_settings_still_resumes(fer_npz, tmp_path):
    """A run started before a training setting existed (the seed run carried across sessions) resumes: the
    missing setting counts as its default."""
    args = ["train", "--arch", "small", "--data", str(fer_npz), "--out", str(tmp_path), "--epochs", "1",
            "--limit", "128", "--batch-size", "64"]  # fmt: skip
    run_cli(*args, check=True)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=False)
    for key in ("soft_targets", "ema"):
        del ckpt["config"][key]
    torch.save(ckpt, tmp_path / "last.pt")
    assert run_cli(*args, "--resume", check=True).returncode == 0
    (tmp_path / "best.pt").unlink()  # the checkpoint carried alone, as across sessions
    assert run_cli(*args, "--resume", check=True).returncode == 0
    assert read_metadata(tmp_path / "model.safetensors")["accuracy"]["PublicTest"] >= 0
    proc = run_cli(*args, "--resume", "--ema", "0.99")  # but a different setting is still refused
    assert proc.returncode == 2 and "other settings" in proc.stderr


def test_soft_targets_mix_the_ferplus_votes():
    from fervid.training.config import TrainConfig
    from fervid.training.data import ferplus_distribution
    from fervid.training.train import _soft_target

    votes = torch.zeros(3, 10, dtype=torch.int64)
    votes[0, 1] = 8  # happiness
    votes[0, 0] = 2  # neutral
    votes[1, 7] = 10  # contempt only: no distribution over the 7 classes
    votes[2, 4] = 5  # anger, but the row is not valid
    dist, has = ferplus_distribution(votes.numpy(), [True, True, False])
    assert has.tolist() == [True, False, False]
    assert abs(dist[0][3] - 0.8) < 1e-6 and abs(dist[0][6] - 0.2) < 1e-6  # Happy, Neutral in FER2013's order
    cfg = TrainConfig(arch="small", data="-", out="-", soft_targets=0.5, label_smoothing=0.0)
    votes_t = (torch.from_numpy(dist), torch.from_numpy(has))
    t = _soft_target(torch.tensor([3, 0, 2]), votes_t, None, torch.arange(3), cfg)
    assert torch.allclose(t[0], torch.tensor([0, 0, 0, 0.9, 0, 0, 0.1]))
    assert torch.equal(t[1], torch.eye(7)[0]) and torch.equal(t[2], torch.eye(7)[2])


def test_mixup_and_cutmix_mix_images_and_targets_alike():
    from fervid.training.augment import mix

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(16, 1, 48, 48, generator=gen)
    target = torch.softmax(torch.randn(16, 7, generator=gen), 1)
    same = mix(x, target, np.random.default_rng(0), 0.0, 0.0)
    assert same[0] is x and same[1] is target  # off by default: nothing drawn, nothing changed

    for alpha in (0.2, 1.0):  # MixUp: one weight for the batch, the same for the images and the targets
        mx, mt = mix(x, target, np.random.default_rng(1), alpha, 0.0)
        rng = np.random.default_rng(1)
        w = float(rng.beta(alpha, alpha))
        other = torch.from_numpy(rng.permutation(16))
        assert 0 < w < 1 and (other != torch.arange(16)).any()
        assert torch.allclose(mx, x * w + x[other] * (1 - w), atol=1e-6)
        assert torch.allclose(mt, target * w + target[other] * (1 - w), atol=1e-6)

    kinds = set()
    for seed in range(20):  # CutMix: each target weighs the other face by the share of its pixels pasted in
        cx, ct = mix(x, target, np.random.default_rng(seed), 0.0, 1.0)
        rng = np.random.default_rng(seed)
        rng.beta(1.0, 1.0)
        other = torch.from_numpy(rng.permutation(16))
        moved = other != torch.arange(16)
        share = ((cx != x) & (cx == x[other])).flatten(1).float().mean(1, keepdim=True)
        assert torch.allclose(ct[moved], (target * (1 - share) + target[other] * share)[moved], atol=1e-6)
        assert ((cx == x) | (cx == x[other])).all()  # a box pasted, nothing blended
        assert torch.allclose(ct.sum(1), torch.ones(16), atol=1e-6)
        bx, _ = mix(x, target, np.random.default_rng(seed), 0.2, 1.0)  # both on: one or the other per batch
        pixels_of_the_batch = (bx.unsqueeze(1) == x.unsqueeze(0)).any(1).all()  # each from some face, unblended
        kinds.add("cutmix" if pixels_of_the_batch else "mixup")
    assert kinds == {"cutmix", "mixup"}


def test_fast_settings_follow_the_cpu(monkeypatch):
    """bf16 autocast on a CPU with native bf16, fp32 on one without (emulated bf16 is slower than fp32)."""
    import torch

    from fervid.training.train import resolve_amp

    cpu = torch.device("cpu")
    for bf16, amx, want in ((True, False, True), (False, True, True), (False, False, False)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert resolve_amp("auto", cpu) is want
    assert resolve_amp("off", cpu) is False and resolve_amp("on", cpu) is True


def test_distillation_targets_mix_labels_votes_and_teacher():
    from fervid.training.config import TrainConfig
    from fervid.training.train import _soft_target

    y = torch.tensor([0, 3])
    votes = (torch.tensor([[0.0, 0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0, 1]]), torch.tensor([True, False]))
    teacher = torch.tensor([[0.5, 0, 0, 0.5, 0, 0, 0], [0, 0, 0, 0.25, 0, 0.75, 0]])
    idx = torch.tensor([0, 1])
    cfg = TrainConfig(arch="small", data="-", out="-", label_smoothing=0.0, soft_targets=0.5, distill=0.5)
    target = _soft_target(y, votes, teacher, idx, cfg)
    # Row 0: label 0 and votes for 3, half each, then half the teacher's. Row 1 has no votes: label 3 and teacher.
    assert torch.allclose(target[0], torch.tensor([0.5, 0, 0, 0.5, 0, 0, 0]))
    assert torch.allclose(target[1], torch.tensor([0, 0, 0, 0.625, 0, 0.375, 0]))
    cfg.distill, cfg.soft_targets = 1.0, 0.0
    assert torch.equal(_soft_target(y, None, teacher, idx, cfg), teacher)


def test_distilling_a_teacher_into_a_student(fer_npz, tmp_path):
    common = ["--data", str(fer_npz), "--epochs", "1", "--limit", "256", "--batch-size", "64"]
    run_cli("train", "--arch", "small", "--out", str(tmp_path / "teacher"), *common, check=True)
    teacher = tmp_path / "teacher" / "model.safetensors"
    proc = run_cli("train", "--arch", "small", "--out", str(tmp_path / "x"), *common, "--distill", "0.5")
    assert proc.returncode == 2 and "--distill needs --teacher" in proc.stderr and "Traceback" not in proc.stderr
    out = tmp_path / "student"
    run_cli("train", "--arch", "small", "--out", str(out), *common, "--distill", "0.7", "--teacher", str(teacher),
            check=True)  # fmt: skip
    assert f"teacher {teacher} (sha256 " in (out / "train.log").read_text()
    assert f"--teacher {teacher}" in read_metadata(out / "model.safetensors")["command"]
    assert (out / "teacher_probs.pt").is_file()
    # --resume reads the teacher's probabilities back from the run folder instead of computing them again...
    resume = ["train", "--arch", "small", "--out", str(out), *common, "--distill", "0.7", "--teacher", str(teacher)]
    run_cli(*resume, "--resume", check=True)
    log = (out / "train.log").read_text()
    assert f"probabilities of 256 training faces from {out / 'teacher_probs.pt'}" in log
    # ...unless the teacher was retrained at the same path since: then they are computed anew.
    saved = torch.load(out / "teacher_probs.pt", weights_only=True)
    run_cli("train", "--arch", "small", "--out", str(tmp_path / "teacher2"), *common, "--seed", "5", check=True)
    shutil.copy(tmp_path / "teacher2" / "model.safetensors", teacher)
    run_cli(*resume, "--resume", check=True)
    log = (out / "train.log").read_text()
    assert log.count("256 training faces in ") == 2 and log.count("probabilities of 256 training faces from") == 1
    again = torch.load(out / "teacher_probs.pt", weights_only=True)
    assert again["teacher_sha256"] != saved["teacher_sha256"] and not torch.equal(again["probs"], saved["probs"])


def test_soft_targets_on_data_without_the_votes(tmp_path):
    """FER2013 without FER+ (Kaggle CSV, image folder, `fer2013_trainval.npz.xz`): one line naming what is missing."""
    data = tmp_path / "plain.npz"
    rng = np.random.default_rng(0)
    np.savez(data, images=rng.integers(0, 256, (160, 48, 48), dtype=np.uint8), labels=np.arange(160) % 7,
             usage=np.r_[np.zeros(128, np.uint8), np.ones(32, np.uint8)])  # fmt: skip
    proc = run_cli("train", "--arch", "small", "--data", str(data), "--out", str(tmp_path / "run"), "--epochs", "1",
                   "--batch-size", "64", "--soft-targets", "0.4")  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (f"fervid: error: {data}: has no FER+ votes (the arrays ferplus_votes and "
                                   "ferplus_valid), which --soft-targets needs; fer2013.npz carries them")  # fmt: skip


def test_a_teacher_named_by_its_members(fer_npz, tmp_path):
    """`--teacher small+medium`: the flip-averaged pair of shipped models is distilled, registered nowhere."""
    from fervid.model.config import REFERENCE_PRECISION
    from fervid.model.names import model_identity
    from fervid.training.data import load_fer2013

    out = tmp_path / "student"
    run_cli("train", "--arch", "small", "--out", str(out), "--data", str(fer_npz), "--epochs", "1", "--limit", "128",
            "--batch-size", "64", "--distill", "0.6", "--teacher", "small+medium", check=True)  # fmt: skip
    sha = model_identity("small+medium")[1]
    assert f"teacher small+medium (sha256 {sha[:12]}): 128 training faces in " in (out / "train.log").read_text()
    saved = torch.load(out / "teacher_probs.pt", weights_only=True)
    faces = torch.from_numpy(load_fer2013(str(fer_npz)).split("Training")[0][:128])
    expected = load_model("small+medium", precision=REFERENCE_PRECISION).predict_proba(faces, batch_size=512)
    assert saved["teacher_sha256"] == sha and torch.allclose(saved["probs"], expected, atol=1e-5)
    proc = run_cli("train", "--arch", "small", "--out", str(tmp_path / "x"), "--data", str(fer_npz), "--epochs", "1",
                   "--limit", "128", "--distill", "0.6", "--teacher", "small+nosuch")  # fmt: skip
    assert proc.returncode != 0 and "unknown model 'nosuch'" in proc.stderr and "Traceback" not in proc.stderr


def test_fine_tuning_starts_from_a_trained_model(fer_npz, tmp_path):
    """`--init`: the run starts from trained weights, not random ones; the wrong architecture or an ensemble is one
    line. A vanishing learning rate leaves the start visible in what is exported."""
    common = ["--data", str(fer_npz), "--epochs", "1", "--limit", "128", "--batch-size", "64"]
    run_cli("train", "--arch", "small", "--out", str(tmp_path / "base"), *common, check=True)
    base = tmp_path / "base" / "model.safetensors"
    tuned = tmp_path / "tuned"
    run_cli("train", "--arch", "small", "--out", str(tuned), *common, "--lr", "1e-9", "--init", str(base), check=True)

    def params(path: Path) -> dict[str, torch.Tensor]:  # BatchNorm's statistics and counts follow the data at any lr
        return {k: v for k, v in load_file(path).items() if v.dtype == torch.float16}

    start, end = params(base), params(tuned / "model.safetensors")
    assert start.keys() == end.keys() and all(torch.equal(start[k], end[k]) for k in start)
    assert f"initial weights: {base} (sha256 " in (tuned / "train.log").read_text()
    assert f"--init {base}" in read_metadata(tuned / "model.safetensors")["command"]
    for init, error in (("small", "--init small: weights of architecture 'small', not --arch 'resnet'"),
                        ("accurate", "--init accurate: an ensemble; fine-tuning starts from one model's weights")):
        proc = run_cli("train", "--arch", "resnet", "--out", str(tmp_path / "x"), *common, "--init", init)
        assert proc.returncode == 2 and proc.stderr.strip() == f"fervid: error: {error}"
