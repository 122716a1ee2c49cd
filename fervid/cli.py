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
