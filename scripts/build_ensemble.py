"""Choose an ensemble of shipped models on PublicTest and register it under a model name.

    python -m scripts.build_ensemble accurate small medium seed [--tta flip tencrop] [--data .../fer2013.npz]

Every subset of two or more of the candidates is scored on PublicTest with each TTA of --tta (the mean of the
members' probabilities over the views); the best subset and TTA are registered in model/weights/manifest.json
(fervid.model.weights.register_ensemble). PrivateTest is never looked at here: measure the registered ensemble
afterwards with `python -m scripts.measure_model NAME`.
"""

from __future__ import annotations

import argparse
import itertools
import os
from pathlib import Path

import numpy as np
import torch

from fervid.model import weights
from fervid.model.config import REFERENCE_PRECISION
from fervid.model.ensemble import ENSEMBLE_TTA
from fervid.model.loader import load_model
from fervid.training.data import load_fer2013

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FERVID_SHARED", ROOT.parent / "shared"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name", help="the ensemble's model name, e.g. accurate")
    p.add_argument("candidates", nargs="+", help="shipped model names it may hold")
    p.add_argument("--tta", nargs="+", choices=ENSEMBLE_TTA, default=["flip"],
                   help="the TTA modes to choose from (on a tie the one with fewer views: it is faster)")
    p.add_argument("--data", type=Path, default=SHARED / "data" / "fer2013" / "fer2013.npz")
    p.add_argument("--dry-run", action="store_true", help="print the scores; register nothing")
    args = p.parse_args()

    faces, labels = load_fer2013(args.data).split("PublicTest")
    faces_t = torch.from_numpy(faces)
    models = {name: load_model(name, precision=REFERENCE_PRECISION) for name in args.candidates}
    scores = []
    for tta in args.tta:
        probs = {name: clf.predict_proba(faces_t, tta=tta).numpy() for name, clf in models.items()}
        for name in args.candidates:
            print(f"{name:>24}  PublicTest {float((probs[name].argmax(1) == labels).mean()):.4f} ({tta} TTA)")
        for k in range(2, len(args.candidates) + 1):
            for subset in itertools.combinations(args.candidates, k):
                mean = np.mean([probs[m] for m in subset], axis=0)
                scores.append((float((mean.argmax(1) == labels).mean()), subset, tta))
    for acc, subset, tta in sorted(scores, reverse=True):
        print(f"{' + '.join(subset):>48}  {tta:>7}  PublicTest {acc:.4f}")
    # Ties: the larger subset (the steadier mean), then the TTA with fewer views (the faster).
    best_acc, best, best_tta = max(scores, key=lambda s: (s[0], len(s[1]), -ENSEMBLE_TTA.index(s[2])))
    print(f"chosen: {' + '.join(best)} with {best_tta} TTA ({best_acc:.4f} on PublicTest)")
    if not args.dry_run:
        sha = weights.register_ensemble(args.name, list(best), tta=best_tta)
        print(f"registered {args.name!r} (sha256 {sha[:12]}); measure it: python -m scripts.measure_model {args.name}")


if __name__ == "__main__":
    main()
