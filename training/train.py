"""Training, readable top to bottom: data on the device as uint8, augmentation there in batches,
SGD with a one-cycle schedule, a checkpoint every epoch and `resume` from it.

Model selection uses PublicTest only; PrivateTest is reported at the end and never used for a choice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from fervid.errors import FervidError
from fervid.model.config import CLASSES, REFERENCE_PRECISION
from fervid.model.device import native_bf16, resolve_device
from fervid.model.predict import normalize, predict_proba
from fervid.model.registry import create_model
from fervid.model.weights import save_weights
from fervid.training.augment import augment, mix
from fervid.training.config import TrainConfig
from fervid.training.data import ferplus_distribution, load_fer2013

log = logging.getLogger("fervid.train")


def resolve_amp(amp: str, device: torch.device) -> bool:
    """bf16 autocast where the hardware has it: CUDA, and CPUs with native bf16 (AVX512-BF16 or AMX), detected at
    run time. Emulated bf16 is slower than fp32, so other CPUs train in fp32 (scripts/bench_training.py)."""
    if amp == "auto":
        return native_bf16(device)
    return amp == "on"


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _setup_logging(out: Path) -> None:
    handler = logging.FileHandler(out / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def _save_atomic(obj: object, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _accuracy(net: torch.nn.Module, images: np.ndarray, labels: np.ndarray, amp: bool) -> float:
    return float((predict_proba(net, torch.from_numpy(images), amp=amp).argmax(1).numpy() == labels).mean())


def _soft_target(y: torch.Tensor, soft: tuple[torch.Tensor, torch.Tensor] | None, teacher: torch.Tensor | None,
                 idx: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:  # fmt: skip
    """FER2013's label (smoothed), mixed with the FER+ vote distribution where the face has one, then with the
    teacher's class probabilities."""
    n_cls = len(CLASSES)
    target = F.one_hot(y, n_cls).float() * (1 - cfg.label_smoothing) + cfg.label_smoothing / n_cls
    if soft is not None:
        dist, has = soft[0][idx], soft[1][idx]
        w = cfg.soft_targets * has.float().unsqueeze(1)
        target = target * (1 - w) + dist * w
    if teacher is not None:
        target = target * (1 - cfg.distill) + teacher[idx] * cfg.distill
    return target


def _teacher_probs(cfg: TrainConfig, images: np.ndarray, device: torch.device, out: Path) -> torch.Tensor:
    """The teacher's class probabilities for the training images as they are (before augmentation).

    They cost minutes for an ensemble teacher on a CPU, so the run folder keeps them (`teacher_probs.pt`) for
    `--resume`, keyed by the teacher's checksum and the images' own: a retrained teacher or other data recomputes.
    """
    if not cfg.teacher:
        raise FervidError("--distill needs --teacher (a shipped model name or a .safetensors path)")
    from fervid.model.loader import load_model  # the loader only where a teacher is used
    from fervid.model.names import model_identity

    key = {"teacher_sha256": model_identity(cfg.teacher)[1],
           "images_sha256": hashlib.sha256(np.ascontiguousarray(images)).hexdigest()}
    cache = out / "teacher_probs.pt"
    if cache.is_file():
        saved = torch.load(cache, map_location="cpu", weights_only=True)
        if {k: saved.get(k) for k in key} == key:
            log.info("teacher %s (sha256 %s): probabilities of %d training faces from %s", cfg.teacher,
                     key["teacher_sha256"][:12], len(images), cache)  # fmt: skip
            return saved["probs"].to(device)
    t0 = time.time()
    teacher = load_model(cfg.teacher, device=device, precision=REFERENCE_PRECISION)  # same targets on any CPU
    probs = teacher.predict_proba(torch.from_numpy(images))
    log.info("teacher %s (sha256 %s): %d training faces in %.0f s", cfg.teacher, teacher.sha256[:12], len(images),
             time.time() - t0)  # fmt: skip
    tmp = cache.with_suffix(".tmp")
    torch.save({**key, "probs": probs}, tmp)
    os.replace(tmp, cache)
    return probs.to(device)


def _init_weights(cfg: TrainConfig, net: torch.nn.Module) -> None:
    """Fine-tuning starts from a trained model's weights: one model of `cfg.arch`, checksum verified if shipped."""
    from fervid.model.loader import load_model  # the loader only where it is used

    init = load_model(cfg.init, optimize=False)  # unfused: the same parameters and BatchNorm buffers as `net`
    if "members" in init.meta:
        raise FervidError(f"--init {cfg.init}: an ensemble; fine-tuning starts from one model's weights")
    if init.cfg.architecture != cfg.arch:
        arch = init.cfg.architecture
        raise FervidError(f"--init {cfg.init}: weights of architecture {arch!r}, not --arch {cfg.arch!r}")
    net.load_state_dict(init.net.state_dict())
    log.info("initial weights: %s (sha256 %s)", cfg.init, init.sha256[:12])


def train(cfg: TrainConfig, resume: bool = False, command: str | None = None) -> Path:
    """Train `cfg.arch`; returns the path of the exported best weights (`<out>/model.safetensors`)."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    _setup_logging(out)
    device = resolve_device(cfg.device)
    amp = resolve_amp(cfg.amp, device)
    command = command or " ".join(["fervid", "train", *sys.argv[2:]])

    data = load_fer2013(cfg.data)
    x_train, y_train = data.split("Training")
    if data.has_split("PublicTest"):
        x_val, y_val = data.split("PublicTest")
    else:  # a layout without a validation split: hold out the last 10% of Training (fixed order)
        cut = len(x_train) * 9 // 10
        x_train, x_val, y_train, y_val = x_train[:cut], x_train[cut:], y_train[:cut], y_train[cut:]
    if cfg.limit:
        n = cfg.limit
        x_train, y_train, x_val, y_val = x_train[:n], y_train[:n], x_val[:n], y_val[:n]
    if len(x_train) < cfg.batch_size:
        raise FervidError(f"{cfg.data}: {len(x_train)} training images, fewer than one batch of {cfg.batch_size}")
    soft = None
    if cfg.soft_targets:
        if data.ferplus_votes is None:
            raise FervidError(f"{cfg.data}: has no FER+ votes (the arrays ferplus_votes and ferplus_valid), which "
                              "--soft-targets needs; fer2013.npz carries them")  # fmt: skip
        mask = data.split_mask("Training")
        dist, has = ferplus_distribution(data.ferplus_votes[mask], data.ferplus_valid[mask])
        if cfg.limit:
            dist, has = dist[: cfg.limit], has[: cfg.limit]
        soft = (torch.from_numpy(dist).to(device), torch.from_numpy(has).to(device))
    teacher = _teacher_probs(cfg, x_train, device, out) if cfg.distill else None
    x_train = torch.from_numpy(x_train).unsqueeze(1).to(device)
    y_train = torch.from_numpy(y_train).to(device)

    torch.manual_seed(cfg.seed)
    net = create_model(cfg.arch)
    if cfg.init and not (resume and (out / "last.pt").exists()):  # a resumed run's checkpoint holds its weights
        _init_weights(cfg, net)
    net = net.to(device).to(memory_format=torch.channels_last)
    steps_per_epoch = len(x_train) // cfg.batch_size
    decay, no_decay = [], []
    for p in net.parameters():
        (decay if p.ndim > 1 else no_decay).append(p)
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, momentum=0.9, nesterov=True,
    )  # fmt: skip
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch, pct_start=0.15
    )
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True) if cfg.ema else None
    judged = (lambda: ema.module) if ema is not None else (lambda: net)  # noqa: E731 - what is evaluated and kept

    ckpt_path = out / "last.pt"
    start_epoch, best_acc, history = 0, -1.0, []
    if ckpt_path.exists() and not resume:
        raise FervidError(f"{ckpt_path}: a run is already there; pass --resume to continue it or use another --out")
    if resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        defaults = asdict(TrainConfig(arch=cfg.arch, data=cfg.data, out=cfg.out))  # settings added since: defaults
        diff = {k: (ckpt["config"].get(k, defaults[k]), v) for k, v in asdict(cfg).items()
                if k not in ("device", "out") and ckpt["config"].get(k, defaults[k]) != v}  # fmt: skip
        if diff:
            raise FervidError(f"{ckpt_path}: checkpoint was made with other settings (was, now): {diff}")
        net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        start_epoch, best_acc, history = ckpt["epoch"], ckpt["best_acc"], ckpt["history"]
        if not (out / "best.pt").exists():  # a checkpoint carried alone to another machine: best starts anew
            best_acc = -1.0
            log.info("no best.pt beside %s: the best epoch is chosen among the epochs still to run", ckpt_path)
        log.info("resumed from %s after epoch %d", ckpt_path, start_epoch)
    else:
        log.info("start %s on %s (amp=%s): %s", cfg.arch, device, amp, json.dumps(asdict(cfg)))

    mixing = cfg.mixup > 0 or cfg.cutmix > 0
    t_start = time.time() - sum(h["seconds"] for h in history)
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        net.train()
        # Seeds per epoch (batches, augmentation, dropout): a resumed run repeats exactly what the
        # uninterrupted run would have done.
        gen = torch.Generator(device=device).manual_seed(cfg.seed * 100_003 + epoch)
        torch.manual_seed(cfg.seed * 100_003 + epoch)
        perm = torch.randperm(len(x_train), generator=gen, device=device)
        mix_rng = np.random.default_rng(cfg.seed * 100_003 + epoch)  # MixUp/CutMix draws, resumable like the rest
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=None, dynamic_ncols=True)  # fmt: skip
        for step in bar:
            idx = perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            x = augment(x_train[idx].float() / 255.0, gen)
            y = y_train[idx]
            target = None
            if soft is not None or teacher is not None or mixing:
                x, target = mix(x, _soft_target(y, soft, teacher, idx, cfg), mix_rng, cfg.mixup, cfg.cutmix)
            x = normalize(x, net.cfg).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = net(x)
            if target is None:
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            else:
                loss = F.cross_entropy(logits.float(), target)
            if hasattr(net, "regularization_loss"):
                loss = loss + net.regularization_loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                ema.update_parameters(net)
            loss_sum += loss.detach()
            correct += (logits.argmax(1) == y).sum()
            if step % 20 == 0:
                n = (step + 1) * cfg.batch_size
                bar.set_postfix(loss=f"{loss_sum.item() / (step + 1):.3f}", acc=f"{correct.item() / n:.3f}")
        val_acc = _accuracy(judged(), x_val, y_val, amp)
        rec = {
            "epoch": epoch + 1,
            "loss": loss_sum.item() / steps_per_epoch,
            "train_acc": correct.item() / (steps_per_epoch * cfg.batch_size),
            "val_acc": float(val_acc),
            "lr": sched.get_last_lr()[0],
            "seconds": time.time() - t0,
        }
        history.append(rec)
        if val_acc > best_acc:
            best_acc = float(val_acc)
            _save_atomic(judged().state_dict(), out / "best.pt")
        state = {"model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "epoch": epoch + 1, "best_acc": best_acc, "history": history, "config": asdict(cfg)}  # fmt: skip
        if ema is not None:
            state["ema"] = ema.state_dict()
        _save_atomic(state, ckpt_path)
        msg = (f"epoch {epoch + 1}/{cfg.epochs} loss {rec['loss']:.4f} train {rec['train_acc']:.4f} "
               f"PublicTest {val_acc:.4f} (best {best_acc:.4f}) {rec['seconds']:.0f}s")  # fmt: skip
        log.info(msg)
        tqdm.write(msg)

    if not (out / "best.pt").exists():  # resumed without best.pt, and no epoch was left to run
        best_acc = _accuracy(judged(), x_val, y_val, amp)
        _save_atomic(judged().state_dict(), out / "best.pt")
    net.load_state_dict(torch.load(out / "best.pt", map_location=device, weights_only=True))
    accuracy = {"PublicTest": best_acc}
    if data.has_split("PrivateTest"):
        x_test, y_test = data.split("PrivateTest")
        if cfg.limit:
            x_test, y_test = x_test[: cfg.limit], y_test[: cfg.limit]
        accuracy["PrivateTest"] = _accuracy(net, x_test, y_test, amp)
    minutes = (time.time() - t_start) / 60
    weights = out / "model.safetensors"
    sha = save_weights(
        net, weights, net.cfg,
        name=cfg.arch, dataset=f"FER2013 ({Path(cfg.data).name})", accuracy=accuracy, command=command,
        git_commit=git_commit(), epochs=cfg.epochs, train_minutes=round(minutes, 1),
        train_device=torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
    )  # fmt: skip
    log.info("done in %.1f min: %s (sha256 %s) accuracy %s", minutes, weights, sha, accuracy)
    tqdm.write(f"wrote {weights} accuracy {json.dumps(accuracy)}")
    return weights
