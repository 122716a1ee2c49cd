"""The `fervid` command: one entry point, a subcommand per job. Each subcommand calls plain functions."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from model.errors import FervidError


def _cmd_train(args: argparse.Namespace) -> int:
    from training.train import TrainConfig, train

    cfg = TrainConfig(
        arch=args.arch, data=args.data, out=args.out, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, weight_decay=args.weight_decay, label_smoothing=args.label_smoothing, seed=args.seed,
        device=args.device, amp=args.amp, limit=args.limit,
    )  # fmt: skip
    train(cfg, resume=args.resume)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from model.loader import load_model
    from training.evaluate import evaluate, plot_confusion

    clf = load_model(args.model, device=_device(args.device))
    tta = ("flip", "tencrop") if args.tta == "all" else (() if args.tta == "none" else (args.tta,))
    report = evaluate(clf, args.data, args.split, tta=tta, batch_size=args.batch_size)
    if args.confusion:
        plot_confusion(report, args.confusion)
    if args.json:
        print(json.dumps(report))
        return 0
    r = report
    print(f"{r['model']} on {r['split']} of {r['data']}: n={r['n']} accuracy {r['accuracy']:.4f}")
    for mode, acc in report.get("tta_accuracy", {}).items():
        print(f"  with TTA {mode}: {acc:.4f}")
    print(f"  {'class':<10}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}")
    for c, m in report["per_class"].items():
        print(f"  {c:<10}{m['precision']:>10.3f}{m['recall']:>10.3f}{m['f1']:>10.3f}{m['support']:>10}")
    if args.confusion:
        print(f"  confusion matrix: {args.confusion}")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    import json

    from model.loader import list_models

    rows = list_models()
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'name':<8}{'params':>10}  {'input':<9}{'PublicTest':>11}{'PrivateTest':>12}  weights")
    for r in rows:
        size = "x".join(str(s) for s in r["input_size"])
        acc = r["accuracy"]
        public, private = (f"{acc[k]:.4f}" if k in acc else "-" for k in ("PublicTest", "PrivateTest"))
        where = f"{r['weights']} (sha256 {r['sha256'][:12]})" if r["weights"] else "none shipped (train it)"
        print(f"{r['name']:<8}{r['parameters']:>10,}  {size:<9}{public:>11}{private:>12}  {where}")
    return 0


def _device(name: str) -> str:
    from training.train import resolve_device

    return str(resolve_device(name))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fervid", description="Batch video emotion analytics.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train an emotion model on FER2013")
    t.add_argument("--arch", required=True, help="architecture: seed or small")
    t.add_argument("--data", required=True, help="fer2013 .npz / .npz.xz, Kaggle fer2013.csv, or image folder")
    t.add_argument("--out", required=True, help="run folder: checkpoints, log, exported weights")
    t.add_argument("--epochs", type=int, default=60)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=0.05, help="peak learning rate of the one-cycle schedule")
    t.add_argument("--weight-decay", type=float, default=5e-4)
    t.add_argument("--label-smoothing", type=float, default=0.1)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    t.add_argument("--amp", choices=["auto", "on", "off"], default="auto", help="bf16 autocast")
    t.add_argument("--limit", type=int, default=0, help="use only the first N images of each split")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="evaluate a model on a FER2013 split")
    e.add_argument("--model", default="small", help="shipped model name or a .safetensors path")
    e.add_argument("--data", required=True, help="fer2013 .npz / .npz.xz, Kaggle fer2013.csv, or image folder")
    e.add_argument("--split", default="PrivateTest", choices=["Training", "PublicTest", "PrivateTest"])
    e.add_argument("--tta", default="none", choices=["none", "flip", "tencrop", "all"],
                   help="also report accuracy with test-time augmentation")  # fmt: skip
    e.add_argument("--confusion", metavar="PNG", help="write the row-normalised confusion matrix here")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    e.set_defaults(func=_cmd_eval)

    m = sub.add_parser("models", help="list the emotion models and their shipped weights")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=_cmd_models)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FervidError as e:
        print(f"fervid: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fervid: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
