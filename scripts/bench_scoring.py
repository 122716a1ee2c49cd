"""Seconds to score the 3,589 PrivateTest faces with flip TTA in float32, by faces per forward pass.

    python -m scripts.bench_scoring [--models small medium-distilled seed resnet-distilled-2] [--batches 512 ...]

What `fervid eval`, ensembles and distillation teachers spend their time on; it chose model.config.SCORING_BATCH.
Each row also says whether the probabilities equal those of the first batch size (the committed accuracies must
not move). Prints a Markdown table headed by the machine, the date and the command, ready for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

from fervid.model.config import REFERENCE_PRECISION
from fervid.model.device import cpu_features, cpu_name
from fervid.model.loader import load_model
from fervid.training.data import load_fer2013
from scripts import SHARED


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["small", "medium-distilled", "seed", "resnet-distilled-2"])
    p.add_argument("--batches", nargs="+", type=int, default=[512, 256, 128, 64, 32])
    p.add_argument("--data", type=Path, default=SHARED / "data" / "fer2013" / "fer2013.npz")
    args = p.parse_args()

    faces = torch.from_numpy(load_fer2013(args.data).split("PrivateTest")[0])
    features = ", ".join(k for k, v in cpu_features().items() if v) or "no AVX-512"
    print(f"{cpu_name()} ({features}), {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{datetime.date.today()}: python -m scripts.bench_scoring {' '.join(sys.argv[1:])}".rstrip())  # fmt: skip
    print(f"\n| model | {' | '.join(f'batch {b}' for b in args.batches)} |")
    print(f"|---|{'---:|' * len(args.batches)}")
    for name in args.models:
        clf = load_model(name, precision=REFERENCE_PRECISION)
        clf.predict_proba(faces[:256], tta="flip")  # warm-up: oneDNN builds its kernels once
        cells, ref = [], None
        for batch in args.batches:
            t0 = time.perf_counter()
            probs = clf.predict_proba(faces, batch_size=batch, tta="flip")
            dt = time.perf_counter() - t0
            ref = probs if ref is None else ref
            same = "same" if torch.equal(probs, ref) else f"max diff {(probs - ref).abs().max():.1e}"
            moved = int((probs.argmax(1) != ref.argmax(1)).sum())
            cells.append(f"{dt:.1f} s ({same}{f', {moved} top classes moved' if moved else ''})")
        print(f"| {name} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
