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


def _cmd_analyze(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from worker.db import database_url, display_url, open_database
    from worker.export import plot_timeline, summarize, timeline_rows, write_csv, write_json
    from worker.pipeline import Analyzer, Settings, analyze_video

    settings = Settings(sample_fps=args.fps, start_s=args.start, end_s=args.end, model=args.model,
                        score_threshold=args.threshold, min_face=args.min_face)  # fmt: skip
    settings.validate()
    url = database_url(args.db)
    sessions = open_database(url)
    analyzer = Analyzer(args.model, args.device, args.threshold, args.min_face)
    done, all_rows, failed = [], [], 0
    for video in args.videos:
        bar = tqdm(desc=Path(video).name, unit="frame", dynamic_ncols=True, leave=False)

        def progress(n: int, total: int | None, bar: tqdm = bar) -> None:
            if total and bar.total != total:
                bar.total = total
            bar.update(n)

        job = analyze_video(video, settings, sessions, analyzer, batch_size=args.batch_size, on_progress=progress)
        bar.close()
        with sessions() as s:
            rows = timeline_rows(s, job.id)
        summary = summarize(job, rows)
        if job.status != "done":
            failed += 1
            print(f"{video}: FAILED (job {job.id}): {job.error}")
            continue
        done.append((job, rows))
        all_rows += rows
        top = sorted(summary["emotion_share"].items(), key=lambda kv: -kv[1])
        share = ", ".join(f"{e} {v:.0%}" for e, v in top if v >= 0.005) or "no faces"
        print(f"{video}: job {job.id} done in {job.timings['total']:.1f} s")
        print(f"  duration {job.duration_s or 0:.1f} s, {summary['frames_analyzed']} frames analysed "
              f"({summary['frames_with_faces']} with faces), {summary['faces_found']} faces")  # fmt: skip
        print(f"  emotions: {share}")
        if args.plot:
            out = Path(args.plot)
            if len(args.videos) > 1:
                out = out.with_name(f"{out.stem}-{Path(video).stem}{out.suffix}")
            plot_timeline(job, rows, out)
            print(f"  plot: {out}")
    if args.csv:
        write_csv(all_rows, args.csv)
        print(f"CSV: {args.csv}")
    if args.json:
        write_json(done, args.json)
        print(f"JSON: {args.json}")
    print(f"timelines stored in {display_url(url)}")
    return 1 if failed else 0


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

    a = sub.add_parser("analyze", help="analyse videos in this process (embedded default: SQLite)")
    a.add_argument("videos", nargs="+", metavar="VIDEO")
    a.add_argument("--fps", type=float, default=5.0, help="frames per second of video time to analyse (0 = all)")
    a.add_argument("--start", type=float, default=0.0, help="start of the time range, in seconds")
    a.add_argument("--end", type=float, default=None, help="end of the time range, in seconds")
    a.add_argument("--model", default="small", help="emotion model: shipped name or .safetensors path")
    a.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when present)")
    a.add_argument("--batch-size", type=int, default=16, help="frames per batch")
    a.add_argument("--threshold", type=float, default=0.9, help="face detection score threshold")
    a.add_argument("--min-face", type=int, default=40, help="smallest face to find, in pixels")
    a.add_argument("--db", help="SQLAlchemy database URL (default: FERVID_DATABASE_URL, else a SQLite file)")
    a.add_argument("--csv", metavar="FILE", help="write the timeline rows of all videos as CSV")
    a.add_argument("--json", metavar="FILE", help="write the jobs and their rows as JSON")
    a.add_argument("--plot", metavar="PNG", help="plot each video's emotion probabilities over time")
    a.set_defaults(func=_cmd_analyze)

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
