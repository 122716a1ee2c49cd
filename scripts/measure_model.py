"""Measure a shipped model and store its numbers in model/weights/manifest.json, where `fervid models` reads them.

    python -m scripts.measure_model small [--data ../shared/data/fer2013/fer2013.npz] [--seconds 3]

Measures, on the shipped weights (checksum verified): PublicTest and PrivateTest accuracy, plain and with flip and
ten-crop TTA (an ensemble: as it is, with its own TTA); accuracy against the FER+ majority labels of PrivateTest
(training.evaluate.ferplus_majority_labels); faces/s at batch 32 and batch 1 on this CPU
(scripts.bench_models.faces_per_second). Accuracies are in float32 (model.config.REFERENCE_PRECISION: the same on
every machine); where this CPU runs bf16 natively, single-crop accuracy in bf16 is measured too, and faces/s are
timed in the precision the pipeline runs in here ("precision"), with float32 beside them. Writes the manifest's
"eval" block (with the CPU, its features, thread count, torch version, load average and date) and refreshes
model/weights/NAME.SPLIT.json and NAME.SPLIT.confusion.png. Faces/s are only as good as the machine is idle: the
1-minute load average at timing is recorded beside them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path

import torch

from fervid.model import weights
from fervid.model.config import DEFAULT_PRECISION, REFERENCE_PRECISION
from fervid.model.device import cpu_features, cpu_name, resolve_precision
from fervid.model.loader import load_model
from fervid.training.evaluate import evaluate, plot_confusion
from scripts import ROOT, SHARED
from scripts.bench_models import command_line, faces_per_second

SPLITS = ("PublicTest", "PrivateTest")
TTA = ("flip", "tencrop")
BATCHES = (32, 1)


def _shown(path: Path) -> str:
    """The data path as the committed reports show it: relative to the repository when it can be."""
    return os.path.relpath(path.resolve(), ROOT)


def measure(name: str, data: Path, seconds: float, write_reports: bool = True) -> dict:
    ensemble = weights.shipped_ensemble(name) is not None
    if weights.shipped_weights(name) is None and not ensemble:
        raise SystemExit(f"{name!r} is not a shipped model (model/weights/manifest.json)")
    clf = load_model(name, device="cpu", precision=REFERENCE_PRECISION)
    tta = () if ensemble else TTA  # an ensemble brings its own TTA: its single crop already is its best
    cpu = torch.device("cpu")
    fast = resolve_precision(DEFAULT_PRECISION, cpu)
    t0 = time.perf_counter()
    measured: dict = {"weights_sha256": clf.sha256, "data": data.name, "data_sha256": weights.sha256_file(data)}
    if fast != REFERENCE_PRECISION:  # what the pipeline's arithmetic costs in accuracy, on the same faces
        clf.precision = fast
        measured[fast] = {}
        for split in SPLITS:
            report = evaluate(clf, data, split)
            measured[fast][split] = report["accuracy"]
            if split == "PrivateTest":
                measured[fast]["ferplus_majority_PrivateTest"] = report["ferplus_majority"]["accuracy"]
        clf.precision = REFERENCE_PRECISION
    for split in SPLITS:
        report = evaluate(clf, data, split, tta=tta)
        report["data"] = _shown(data)
        measured[split] = {"n": report["n"], "accuracy": report["accuracy"], **report.get("tta_accuracy", {})}
        if split == "PrivateTest":
            fp = report["ferplus_majority"]
            measured["ferplus_majority_PrivateTest"] = {"n": fp["n"], "accuracy": fp["accuracy"],
                                                        **fp.get("tta_accuracy", {})}  # fmt: skip
        if write_reports:
            (weights.WEIGHTS_DIR / f"{name}.{split}.json").write_text(json.dumps(report) + "\n")
            plot_confusion(report, weights.WEIGHTS_DIR / f"{name}.{split}.confusion.png")
    eval_s = time.perf_counter() - t0
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    measured["faces_per_s"] = {f"batch_{b}": round(faces_per_second(clf.net, b, cpu, seconds, fast)) for b in BATCHES}
    measured["precision"] = fast
    if fast != REFERENCE_PRECISION:
        measured["faces_per_s_" + REFERENCE_PRECISION] = {
            f"batch_{b}": round(faces_per_second(clf.net, b, cpu, seconds, REFERENCE_PRECISION)) for b in BATCHES
        }
    measured.update(
        cpu=cpu_name(), cpu_features=cpu_features(), threads=torch.get_num_threads(), torch=torch.__version__,
        load_avg_1min=None if load is None else round(load, 2),
        date=datetime.date.today().isoformat(), command=command_line(),
        seconds={"eval": round(eval_s, 1), "timing": round(time.perf_counter() - t0 - eval_s, 1)},
    )  # fmt: skip
    return measured


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name", help="a shipped model name (model/weights/manifest.json)")
    p.add_argument("--data", type=Path, default=SHARED / "data" / "fer2013" / "fer2013.npz",
                   help="the FER2013 .npz with FER+ votes (default ../shared/data/fer2013/fer2013.npz)")  # fmt: skip
    p.add_argument("--seconds", type=float, default=3.0, help="timing length per batch size")
    p.add_argument("--dry-run", action="store_true", help="print the numbers; write nothing")
    args = p.parse_args()
    t0 = time.perf_counter()
    measured = measure(args.name, args.data, args.seconds, write_reports=not args.dry_run)
    if not args.dry_run:
        weights.record_eval(args.name, measured)
    print(json.dumps(measured, indent=2))
    print(f"measured in {time.perf_counter() - t0:.0f} s" + ("" if args.dry_run else "; manifest updated"))


if __name__ == "__main__":
    main()
