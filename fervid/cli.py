"""The `fervid` command: one entry point, a subcommand per job. Each subcommand calls plain functions."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from fervid.errors import FervidError
from fervid.model.config import DEFAULT_MODEL, PRECISIONS, REFERENCE_PRECISION, SCORING_BATCH, TTA_MODES
from fervid.worker.settings import SMOOTH_METHODS, TIMELINE_FORMATS, Options, QueuePolicy, default


def _cmd_train(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from fervid.training.config import TrainConfig
    from fervid.training.train import train

    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    train(cfg, resume=args.resume)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from fervid.model.loader import load_model
    from fervid.training.evaluate import evaluate, plot_confusion

    clf = load_model(args.model, device=_device(args.device), precision=args.precision)
    tta = TTA_MODES[1:] if "all" in args.tta else tuple(dict.fromkeys(m for m in args.tta if m != "none"))
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
    if "ferplus_majority" in report and report["ferplus_majority"]["n"]:
        fp = report["ferplus_majority"]
        tta = "".join(f", {m} {a:.4f}" for m, a in fp.get("tta_accuracy", {}).items())
        print(f"  against the FER+ majority labels (n={fp['n']}): accuracy {fp['accuracy']:.4f}{tta}")
    print(f"  {'class':<10}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}")
    for c, m in report["per_class"].items():
        print(f"  {c:<10}{m['precision']:>10.3f}{m['recall']:>10.3f}{m['f1']:>10.3f}{m['support']:>10}")
    if args.confusion:
        print(f"  confusion matrix: {args.confusion}")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    import json

    from fervid.model.loader import list_models

    rows = list_models()
    if args.json:
        print(json.dumps(rows))
        return 0

    def acc(block: dict | None) -> str:
        if not block or block.get("accuracy") is None:
            return "-"
        tta = "/".join(f"{block[m]:.4f}" for m in ("flip", "tencrop") if block.get(m) is not None)
        return f"{block['accuracy']:.4f}" + (f" ({tta})" if tta else "")

    def measured_on(ev: dict) -> str:
        if not ev:
            return "-"
        load = f", load {ev['load_avg_1min']:.1f}" if ev.get("load_avg_1min") is not None else ""
        return f"{ev['cpu']}, {ev['threads']} threads, {ev['date']}{load}"

    table = []
    for r in rows:
        ev = r["eval"] or {}
        public = ev.get("PublicTest") or {"accuracy": r["accuracy"].get("PublicTest")}
        private = ev.get("PrivateTest") or {"accuracy": r["accuracy"].get("PrivateTest")}
        rate = ev.get("faces_per_s", {}).get("batch_32")
        precision = ev.get("precision", "fp32")
        fast = ev.get(precision) if precision != "fp32" else None  # its single-crop PrivateTest in that arithmetic
        where = f"{r['weights']} (sha256 {r['sha256'][:12]})" if r["weights"] else "none shipped (train it)"
        table.append([("* " if r["default"] else "  ") + r["name"], f"{r['parameters']:,}",
                      "x".join(str(s) for s in r["input_size"]), acc(public), acc(private),
                      acc(ev.get("ferplus_majority_PrivateTest")), "-" if rate is None else f"{rate:,} {precision}",
                      f"{fast['PrivateTest']:.4f}" if fast else "-", measured_on(ev), where])  # fmt: skip
    head = ["  name", "params", "input", "PublicTest (+flip/+tencrop)", "PrivateTest (+flip/+tencrop)",
            "FER+ PrivateTest (+flip/+tencrop)", "faces/s @32", "bf16 PrivateTest", "measured on",
            "weights"]  # fmt: skip
    widths = [max(len(str(c)) for c in col) for col in zip(head, *table, strict=True)]
    right = {1, 6}
    for line in [head, *table]:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))]
        print("  ".join(cells).rstrip())
    print("* the default model. Accuracies and faces/s were measured on the shipped weights by "
          "`python -m scripts.measure_model NAME`; accuracies in float32; faces/s in the arithmetic the pipeline "
          "runs on that CPU (bf16 where it is native), whose single-crop PrivateTest is the bf16 column; FER+ = "
          "PrivateTest rows whose FER+ votes have one most-voted of the 7 emotions; load = the 1-minute load "
          "average while faces/s were timed.")  # fmt: skip
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from fervid.worker import render
    from fervid.worker.pipeline.frames_to_rows import Analyzer
    from fervid.worker.queue.jobs import analyze_video
    from fervid.worker.store import query
    from fervid.worker.store.db import database_url, display_url, open_database
    from fervid.worker.store.export import write_csv, write_json
    from fervid.worker.store.schema import Status

    settings = _settings(args)
    url = database_url(args.db)
    sessions = open_database(url)
    analyzer = Analyzer(args.model, args.device, args.precision)
    done, failed = [], 0
    for video in args.videos:
        bar = tqdm(desc=Path(video).name, unit="frame", dynamic_ncols=True, leave=False)

        def progress(n: int, total: int | None, bar: tqdm = bar) -> None:
            if total and bar.total != total:
                bar.total = total
            bar.update(n)

        try:
            job = analyze_video(video, settings, sessions, analyzer, batch_size=args.batch_size, on_progress=progress)
        except FervidError as e:  # no job could be recorded (a missing file)
            bar.close()
            failed += 1
            print(f"{video}: FAILED: {e}")
            continue
        bar.close()
        if job.status != Status.DONE:
            failed += 1
            print(f"{video}: FAILED (job {job.id}): {job.error}")
            continue
        df = query.timeline(job.id, db=sessions)
        done.append((job, df))
        summ = query.summary(job.id, db=sessions)
        whole = summ["video"]
        top = sorted(whole["dominant_share"].items(), key=lambda kv: -kv[1]) if whole else []
        share = ", ".join(f"{e} {v:.0%}" for e, v in top if v >= 0.005) or "no faces"
        print(f"{video}: job {job.id} done in {job.timings.get('wall', job.timings['total']):.1f} s")
        print(f"  duration {job.duration_s or 0:.1f} s, {summ['frames_analyzed']} frames analysed "
              f"({summ['frames_with_faces']} with faces), {whole['faces'] if whole else 0} faces, "
              f"{len(summ['tracks'])} tracks")  # fmt: skip
        print(f"  emotions: {share}")
        if args.plot:
            out = Path(args.plot)
            if len(args.videos) > 1:
                out = out.with_name(f"{out.stem}-{Path(video).stem}{out.suffix}")
            render.plot(df, out, title=f"job {job.id}: {Path(video).name}")
            print(f"  plot: {out}")
    if args.csv and done:
        import pandas as pd

        write_csv(pd.concat([df for _, df in done]), args.csv)
        print(f"CSV: {args.csv}")
    if args.json and done:
        write_json(done, args.json)
        print(f"JSON: {args.json}")
    print(f"timelines stored in {display_url(url)}")
    return 1 if failed else 0


def _note(result: object) -> None:
    """The partial-result note of a timeline or summary, on stderr (stdout may be the data itself)."""
    from fervid.worker.store.query import partial_note

    note = partial_note(result)
    if note:
        print(f"note: {note}", file=sys.stderr)


def _cmd_timeline(args: argparse.Namespace) -> int:
    from fervid.worker.store import query
    from fervid.worker.store.export import write_timeline

    df = query.timeline(args.job, track=args.track, start_s=args.start, end_s=args.end, smooth_s=args.smooth,
                        smooth_method=args.smooth_method, db=args.db)  # fmt: skip
    _note(df)
    n = write_timeline(df, args.out or sys.stdout, args.format)
    if args.out:
        print(f"{n} rows written to {args.out}", file=sys.stderr)
    return 0


def _cmd_summary(args: argparse.Namespace) -> int:
    import json

    from fervid.worker.store import query
    from fervid.worker.store.export import write_text

    summ = query.summary(args.job, db=args.db, window_s=args.window)
    _note(summ)
    out = args.out or sys.stdout
    if args.format == "json":
        write_text(json.dumps(summ, indent=1) + "\n", out)
        return 0
    lines = [f"job {summ['job']}: {summ['path']} ({summ['status']}), {summ['frames_analyzed']} frames analysed"]
    if summ["video"] is None:
        lines.append("  no faces found")
    for name, d in [("whole video", summ["video"])] + [(f"track {t}", d) for t, d in summ["tracks"].items()]:
        if d is None:
            continue
        shares = ", ".join(f"{e} {v:.0%}" for e, v in sorted(d["dominant_share"].items(), key=lambda kv: -kv[1])
                           if v >= 0.005)  # fmt: skip
        lines.append(f"{name}: {d['first_s']:.1f}-{d['last_s']:.1f} s, {d['time_on_screen_s']:.1f} s on screen, "
                     f"{d['faces']} faces; dominant: {d['dominant']}")  # fmt: skip
        lines.append(f"  share of time: {shares}")
        lines.append("  mean: " + ", ".join(f"{e} {v:.2f}" for e, v in d["mean"].items()))
        lines.append("  peaks: " + ", ".join(f"{e} {p['probability']:.2f} at {_mmss(p['time_s'])}"
                                             for e, p in d["peaks"].items()))  # fmt: skip
        if d["strongest_rise"]:
            e, r = max(d["strongest_rise"].items(), key=lambda kv: kv[1]["change"])
            lines.append(f"  strongest change: {e} +{r['change']:.2f} at {_mmss(r['time_s'])}")
        lines.append("  by window: " + "; ".join(f"{_mmss(w['from_s'])}-{_mmss(w['to_s'])} {w['dominant']}"
                                                 for w in d["windows"]))  # fmt: skip
    write_text("\n".join(lines) + "\n", out)
    return 0


def _mmss(seconds: float) -> str:
    return f"{int(seconds // 60):02d}:{seconds % 60:04.1f}"


def _cmd_plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fervid.worker import render
    from fervid.worker.store import query

    if not args.out and not args.annotate_video:
        raise FervidError("give --out FILE.png and/or --annotate-video OUT.mp4")
    df = query.timeline(args.job, track=args.track, smooth_s=args.smooth, db=args.db)
    _note(df)
    if args.out:
        render.plot(df, args.out, title=f"job {args.job}: {Path(df.attrs['path']).name}")
        print(f"plot: {args.out}")
    if args.annotate_video:
        n = render.annotate_video(args.job, Path(args.annotate_video), db=args.db)
        print(f"annotated video: {args.annotate_video} ({n} frames)")
    return 0


def _settings(args: argparse.Namespace):  # noqa: ANN202
    from fervid.worker.settings import Settings

    settings = Settings(sample_fps=args.fps, start_s=args.start, end_s=args.end, model=args.model,
                        score_threshold=args.threshold, min_face=args.min_face, max_faces=args.max_faces)  # fmt: skip
    settings.validate()
    return settings


def _cmd_submit(args: argparse.Namespace) -> int:
    from fervid.worker.queue.client import SubmitResult, submit_videos, watch_jobs
    from fervid.worker.store.db import sessions_for
    from fervid.worker.store.schema import Status

    submissions = submit_videos(args.videos, _settings(args), db=args.db, priority=args.priority,
                                segment_s=args.segment, force=args.force)  # fmt: skip
    ids, failed, unsent = [], 0, 0
    for sub in submissions:
        n = sub.segments
        if sub.result == SubmitResult.REFUSED:
            failed += 1
            print(f"{sub.path}: refused: {sub.error}")
        elif sub.result == SubmitResult.DUPLICATE:
            print(f"{sub.path}: already submitted as job {sub.job_id} ({sub.status}); --force to redo it")
        elif sub.result == SubmitResult.QUEUED:
            print(f"{sub.path}: job {sub.job_id} queued ({n} segment{'s' * (n > 1)})")
        else:
            unsent += 1
            print(f"{sub.path}: job {sub.job_id} recorded but not yet queued: the queue (FERVID_BROKER_URL) is "
                  f"unreachable ({sub.error}); a running `fervid worker` sends it when Redis is back")
        if sub.recorded:
            ids.append(sub.job_id)
    if args.wait and ids:
        from tqdm import tqdm

        bars = {}
        for rows in watch_jobs(sessions_for(args.db), ids):
            for i, r in enumerate(rows):
                if r["job"] not in bars:
                    bars[r["job"]] = tqdm(total=max(r["segments"], 1), desc=f"job {r['job']}", position=i,
                                          unit="seg", dynamic_ncols=True)  # fmt: skip
                b = bars[r["job"]]
                b.n = r["segments_done"] if r["state"] != Status.DONE else b.total
                b.set_postfix(state=r["state"], frames=r["frames"], refresh=False)
                b.refresh()
        for b in bars.values():
            b.close()
        for r in rows:
            print(f"job {r['job']}: {r['state']}" + (f": {r['error']}" if r["error"] else ""))
        failed += sum(r["state"] == Status.FAILED for r in rows)
    return 1 if failed or unsent else 0


def _cmd_status(args: argparse.Namespace) -> int:
    import json

    from fervid.worker.queue.jobs import job_status
    from fervid.worker.store.db import open_database

    with open_database(args.db)() as s:
        rows = job_status(s, args.jobs or None, limit=args.limit)
    if args.json:
        print(json.dumps(rows))
        return 0
    head = f"{'job':>5}  {'state':<8}{'segments':>9}{'frames':>8}{'faces':>7}  {'worker':<24}{'gpu':<5}{'s':>7}  video"
    print(head)
    for r in rows:
        secs = f"{r['seconds']:.1f}" if r["seconds"] else "-"
        worker, gpu = (r["worker"] or "-")[:23], r["gpu"] or "-"
        print(f"{r['job']:>5}  {r['state']:<8}{r['segments_done']:>4}/{r['segments']:<4}{r['frames']:>8}"
              f"{r['faces']:>7}  {worker:<24}{gpu:<5}{secs:>7}  {r['path']}")  # fmt: skip
        if r["error"]:
            print(f"{'':>7}error: {r['error']}")
    return 0


def _cmd_requeue(args: argparse.Namespace) -> int:
    from fervid.worker.queue.client import requeue
    from fervid.worker.store.db import open_database

    sent = 0
    for job_id, n in requeue(open_database(args.db), args.jobs or None):
        sent += 1
        print(f"job {job_id}: {n} unfinished segment{'s' * (n > 1)} queued again")
    if not sent:
        print("no queued or running job has unfinished segments")
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    import os

    from fervid.worker.queue.supervisor import run

    if args.precision:
        os.environ["FERVID_PRECISION"] = args.precision  # the worker processes inherit it
    _check_precision_env()
    return run(args.gpus, args.concurrency, args.loglevel)


def _check_precision_env() -> None:
    """FERVID_PRECISION, which the processes that run jobs read: a bad value fails the command, not every job."""
    import os

    value = os.environ.get("FERVID_PRECISION")
    if value is not None and value not in PRECISIONS:
        raise FervidError(f"FERVID_PRECISION={value!r} is not one of {', '.join(PRECISIONS)}")


def _cmd_serve(args: argparse.Namespace) -> int:
    import os
    import secrets

    import uvicorn

    from fervid.server.app import create_app
    from fervid.server.auth import check_listen
    from fervid.worker.settings import ServerSettings

    settings = ServerSettings.from_env()
    _check_precision_env()
    check_listen(args.host, settings.api_tokens)
    if args.workers < 1:
        raise FervidError(f"--workers must be at least 1, got {args.workers}")
    if args.workers == 1:
        app = create_app(settings, db=args.db)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
        return 0
    if not os.environ.get("FERVID_BROKER_URL"):
        raise FervidError("--workers above 1 needs the queue (FERVID_BROKER_URL): without it, jobs run inside the "
                          "server's one process")  # fmt: skip
    from fervid.worker.store.db import open_database

    # An unreachable or unmigratable database: one error here, not one per worker process.
    open_database(args.db).kw["bind"].dispose()
    # The workers are new processes that build the application from the environment: the database goes there,
    # and one cursor key, so that a page cursor signed by one worker is read by any other.
    if args.db:
        os.environ["FERVID_DATABASE_URL"] = args.db
    if not settings.cursor_secret:
        os.environ["FERVID_CURSOR_SECRET"] = secrets.token_hex(32)
    import contextlib
    import socket

    from uvicorn.supervisors import Multiprocess

    config = uvicorn.Config("fervid.server.app:app_from_env", factory=True, workers=args.workers, host=args.host,
                            port=args.port, log_level=args.log_level)  # fmt: skip
    sock = config.bind_socket()
    # uvicorn binds this socket with proto 0, and asyncio sets TCP_NODELAY only on connections whose proto is TCP
    # (uvicorn #3149): every keep-alive response after a connection's first then waited ~40 ms for the client's
    # delayed ACK. Linux gives each accepted connection the listening socket's TCP_NODELAY.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with contextlib.suppress(KeyboardInterrupt):
        Multiprocess(config, sockets=[sock]).run()
    return 0


def _device(name: str) -> str:
    from fervid.model.device import resolve_device

    return str(resolve_device(name))


def _job_options(p: argparse.ArgumentParser) -> None:
    """The analysis settings, with the defaults of worker.settings.Settings."""
    p.add_argument("--fps", type=float, default=default("sample_fps"),
                   help="frames per second of video time to analyse (0 = every frame; default %(default)s)")
    p.add_argument("--start", type=float, default=default("start_s"), help="start of the time range, in seconds")
    p.add_argument("--end", type=float, default=default("end_s"), help="end of the time range, in seconds")
    p.add_argument("--model", default=default("model"),
                   help="emotion model: shipped name, .safetensors path, or a+b+c averaged (default %(default)s)")
    p.add_argument("--threshold", type=float, default=default("score_threshold"),
                   help="face detection score threshold (default %(default)s)")
    p.add_argument("--min-face", type=int, default=default("min_face"),
                   help="smallest face to find, in pixels (default %(default)s)")
    p.add_argument("--max-faces", type=int, default=default("max_faces"),
                   help="most faces kept per frame, the largest (default %(default)s)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fervid", description="Batch video emotion analytics.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train an emotion model on FER2013")
    from fervid.training.config import default as train_default

    t.add_argument("--arch", required=True, help="architecture (`fervid models` lists them)")
    t.add_argument("--data", required=True, help="fer2013 .npz / .npz.xz, Kaggle fer2013.csv, or image folder")
    t.add_argument("--out", required=True, help="run folder: checkpoints, log, exported weights")
    t.add_argument("--epochs", type=int, default=train_default("epochs"))
    t.add_argument("--batch-size", type=int, default=train_default("batch_size"))
    t.add_argument("--lr", type=float, default=train_default("lr"), help="peak learning rate of the one-cycle schedule")
    t.add_argument("--weight-decay", type=float, default=train_default("weight_decay"))
    t.add_argument("--label-smoothing", type=float, default=train_default("label_smoothing"))
    t.add_argument("--soft-targets", type=float, default=train_default("soft_targets"), metavar="W",
                   help="weight of the FER+ crowd's vote distribution in the target (npz data; 0 = off)")
    t.add_argument("--distill", type=float, default=train_default("distill"), metavar="W",
                   help="weight of the --teacher model's class probabilities in the target (0 = off)")
    t.add_argument("--teacher", default=train_default("teacher"), metavar="MODEL",
                   help="the model to distil: a shipped name (an ensemble too), a .safetensors path, or a+b+c averaged")
    t.add_argument("--init", default=train_default("init"), metavar="MODEL",
                   help="fine-tune: start from this model's weights (a shipped name or .safetensors path of --arch)")
    t.add_argument("--mixup", type=float, default=train_default("mixup"), metavar="ALPHA",
                   help="MixUp: blend pairs of faces and their targets, weight ~ Beta(ALPHA, ALPHA) (0 = off)")
    t.add_argument("--cutmix", type=float, default=train_default("cutmix"), metavar="ALPHA",
                   help="CutMix: paste a box of another face, targets mixed by its area (0 = off; with --mixup, "
                        "one of the two per batch)")
    t.add_argument("--ema", type=float, default=train_default("ema"), metavar="DECAY",
                   help="evaluate and export an exponential moving average of the weights (e.g. 0.999; 0 = off)")
    t.add_argument("--seed", type=int, default=train_default("seed"))
    t.add_argument("--device", default=train_default("device"), help="cpu, cuda, cuda:N or auto")
    t.add_argument("--amp", choices=["auto", "on", "off"], default=train_default("amp"),
                   help="bf16 autocast (auto: where the hardware has native bf16)")
    t.add_argument("--limit", type=int, default=train_default("limit"),
                   help="use only the first N images of each split")  # fmt: skip
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="evaluate a model on a FER2013 split")
    e.add_argument("--model", default=DEFAULT_MODEL,
                   help="shipped model name, .safetensors path, or a+b+c averaged (default %(default)s)")  # fmt: skip
    e.add_argument("--data", required=True, help="fer2013 .npz / .npz.xz, Kaggle fer2013.csv, or image folder")
    e.add_argument("--split", default="PrivateTest", choices=["Training", "PublicTest", "PrivateTest"])
    e.add_argument("--tta", nargs="+", default=["none"], choices=[*TTA_MODES, "all"],
                   help="also report accuracy with these test-time augmentations (views shared by several are "
                        "computed once)")  # fmt: skip
    e.add_argument("--confusion", metavar="PNG", help="write the row-normalised confusion matrix here")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--batch-size", type=int, default=SCORING_BATCH)
    e.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    e.add_argument("--precision", default=REFERENCE_PRECISION, choices=PRECISIONS,
                   help="fp32 (default: the same figures on every machine), bf16, or auto as analyze runs")  # fmt: skip
    e.set_defaults(func=_cmd_eval)

    a = sub.add_parser("analyze", help="analyse videos in this process (embedded default: SQLite)")
    a.add_argument("videos", nargs="+", metavar="VIDEO")
    _job_options(a)
    a.add_argument("--device", default=default("device", Options), help="cpu, cuda, cuda:N or auto (CUDA when present)")
    a.add_argument("--batch-size", type=int, default=default("batch_size", Options), help="frames per batch")
    a.add_argument("--precision", default=default("precision", Options), choices=PRECISIONS,
                   help="the emotion model's arithmetic (auto: bf16 where the CPU or GPU has it natively)")
    a.add_argument("--db", help="SQLAlchemy database URL (default: FERVID_DATABASE_URL, else a SQLite file)")
    a.add_argument("--csv", metavar="FILE", help="write the timeline rows of all videos as CSV")
    a.add_argument("--json", metavar="FILE", help="write the jobs and their rows as JSON")
    a.add_argument("--plot", metavar="PNG", help="plot each video's emotion probabilities over time")
    a.set_defaults(func=_cmd_analyze)

    sb = sub.add_parser("submit", help="queue videos for the workers (Redis + the database)")
    sb.add_argument("videos", nargs="+", metavar="VIDEO|GLOB|@LIST")
    _job_options(sb)
    sb.add_argument("--priority", type=int, default=default("priority", Options), choices=range(10), metavar="0-9",
                    help="9 runs first")  # fmt: skip
    sb.add_argument("--segment", type=float, default=None,
                    help=f"seconds of video per task (default {default('segment_s', QueuePolicy):g}, "
                    "FERVID_SEGMENT_S)")  # fmt: skip
    sb.add_argument("--force", action="store_true", help="redo a video already submitted with these settings")
    sb.add_argument("--wait", action="store_true", help="show progress until the jobs end")
    sb.add_argument("--db")
    sb.set_defaults(func=_cmd_submit)

    st = sub.add_parser("status", help="table of jobs: state, progress, worker, timings, error")
    st.add_argument("jobs", nargs="*", type=int, metavar="JOB")
    st.add_argument("--limit", type=int, default=default("status_limit", Options))
    st.add_argument("--json", action="store_true")
    st.add_argument("--db")
    st.set_defaults(func=_cmd_status)

    rq = sub.add_parser("requeue", help="queue the unfinished segments of queued/running jobs again "
                        "(after Redis lost its data); segments are idempotent, so duplicates are harmless")  # fmt: skip
    rq.add_argument("jobs", nargs="*", type=int, metavar="JOB")
    rq.add_argument("--db")
    rq.set_defaults(func=_cmd_requeue)

    wk = sub.add_parser("worker", help="start Celery workers: one per GPU, or CPU workers")
    wk.add_argument("--gpus", help="all, none, or a list like 0,1 (default: every GPU PyTorch sees)")
    wk.add_argument("--concurrency", type=int, default=default("concurrency", Options),
                    help="CPU worker processes when there is no GPU")  # fmt: skip
    wk.add_argument("--loglevel", default=default("loglevel", Options))
    wk.add_argument("--precision", choices=PRECISIONS,
                    help="the emotion model's arithmetic "
                    f"(default FERVID_PRECISION, else {default('precision', Options)})")  # fmt: skip
    wk.set_defaults(func=_cmd_worker)

    sv = sub.add_parser("serve", help="the HTTP API and its web page (FastAPI on uvicorn); jobs run in-process "
                        "unless FERVID_BROKER_URL names the queue")  # fmt: skip
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (not loopback: FERVID_API_TOKENS needed)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--db", help="SQLAlchemy database URL (default: FERVID_DATABASE_URL, else the SQLite file)")
    sv.add_argument("--workers", type=int, default=1,
                    help="server processes (each serves on one core; above 1 needs FERVID_BROKER_URL)")
    sv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    sv.set_defaults(func=_cmd_serve)

    tl = sub.add_parser("timeline", help="a job's per-frame emotion timeline, per track")
    tl.add_argument("job", type=int)
    tl.add_argument("--track", type=int, help="only this track (person)")
    tl.add_argument("--from", dest="start", type=float, metavar="S", help="from this time (seconds)")
    tl.add_argument("--to", dest="end", type=float, metavar="S", help="up to this time (seconds)")
    tl.add_argument("--smooth", type=float, metavar="SECONDS", help="smooth probabilities over this much time")
    tl.add_argument("--smooth-method", choices=SMOOTH_METHODS, default=default("smooth_method", Options),
                    help="centred moving average, or exponential with --smooth as half-life")  # fmt: skip
    tl.add_argument("--format", choices=TIMELINE_FORMATS, default="table")
    tl.add_argument("--out", metavar="FILE")
    tl.add_argument("--db", help="SQLAlchemy database URL (default: FERVID_DATABASE_URL, else the SQLite file)")
    tl.set_defaults(func=_cmd_timeline)

    su = sub.add_parser("summary", help="per track and whole-video emotion summary of a job")
    su.add_argument("job", type=int)
    su.add_argument("--format", choices=["table", "json"], default="table")
    su.add_argument("--window", type=float, default=default("window_s", Options),
                    help="seconds per window of the dominant-emotion list")  # fmt: skip
    su.add_argument("--out", metavar="FILE")
    su.add_argument("--db")
    su.set_defaults(func=_cmd_summary)

    pl = sub.add_parser("plot", help="plot a job's emotions over time; optionally annotate its video")
    pl.add_argument("job", type=int)
    pl.add_argument("--out", metavar="PNG")
    pl.add_argument("--track", type=int)
    pl.add_argument("--smooth", type=float, metavar="SECONDS")
    pl.add_argument("--annotate-video", metavar="MP4", help="write the video with boxes, track ids and labels")
    pl.add_argument("--db")
    pl.set_defaults(func=_cmd_plot)

    m = sub.add_parser("models", help="list the emotion models, the default (*), their shipped weights and measured "
                       "accuracy and speed")  # fmt: skip
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=_cmd_models)
    return p


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reading end is closed (poll reports an error on its writing end)."""
    import select

    if not hasattr(select, "poll"):
        return True
    poller = select.poll()
    poller.register(sys.stdout.fileno(), select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = args.func(args)
        sys.stdout.flush()  # inside the try: a reader gone (`| head`) fails here, not as a traceback at exit
        return rc
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise  # another pipe or socket broke: a real error, not a reader that had enough
        # Stop quietly as Unix tools do, with their status (128 + SIGPIPE); stdout goes to /dev/null so that
        # Python's own flush at exit finds nothing left to write.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except FervidError as e:
        print(f"fervid: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fervid: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
