"""Timelines as files: `fervid analyze`'s CSV and JSON (with the job's metadata), and `fervid timeline`'s formats.

One column list (worker.store.query.TIMELINE_COLUMNS) and one precision (ROUNDING) serve every format.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO

import pandas as pd

from fervid.errors import FervidError
from fervid.worker.settings import TIMELINE_FORMATS
from fervid.worker.store.query import TIMELINE_COLUMNS
from fervid.worker.store.schema import EMOTIONS, Job

# `fervid analyze --csv/--json`: the timeline without its track ids (their columns as they were before tracks).
CSV_COLUMNS = [c for c in TIMELINE_COLUMNS if c != "track"]
ROUNDING = {"time_s": 4, "x1": 1, "y1": 1, "x2": 1, "y2": 1, "det_score": 4} | {e: 5 for e in EMOTIONS}


def export_frame(df: pd.DataFrame) -> pd.DataFrame:
    """The timeline in the CSV's columns and precision."""
    return df[CSV_COLUMNS].round(ROUNDING)


def job_metadata(job: Job) -> dict:
    keys = ["id", "path", "size_bytes", "sha256", "status", "error", "duration_s", "fps", "frame_count", "width",
            "height", "codec", "sample_fps", "start_s", "end_s", "model", "model_sha256", "detector",
            "frames_analyzed", "faces_found", "timings", "worker"]  # fmt: skip
    meta = {k: getattr(job, k) for k in keys}
    for k in ("created_at", "started_at", "finished_at"):
        v = getattr(job, k)
        meta[k] = v.isoformat() if v else None
    return meta


def write_csv(df: pd.DataFrame, path: str | Path) -> None:
    export_frame(df).to_csv(path, index=False)


def write_json(jobs: list[tuple[Job, pd.DataFrame]], path: str | Path) -> None:
    doc = {"jobs": [{**job_metadata(job), "rows": json.loads(export_frame(df).to_json(orient="records"))}
                    for job, df in jobs]}  # fmt: skip
    Path(path).write_text(json.dumps(doc, indent=1))


def write_text(text: str, out: str | Path | TextIO) -> None:
    """`text` into the file named `out`, or onto the stream `out` (standard output)."""
    if isinstance(out, str | Path):
        Path(out).write_text(text)
    else:
        out.write(text)


def write_timeline(df: pd.DataFrame, out: str | Path | TextIO, fmt: str = "csv") -> int:
    """A timeline (all its columns, the export's precision) in one of TIMELINE_FORMATS, into the file named `out`
    or onto a text stream (parquet: files only). Returns the number of rows written."""
    if fmt not in TIMELINE_FORMATS:
        raise FervidError(f"unknown format {fmt!r} ({', '.join(TIMELINE_FORMATS)})")
    df = df.round(ROUNDING)
    if fmt == "parquet":
        if not isinstance(out, str | Path):
            raise FervidError("--format parquet needs --out FILE")
        df.to_parquet(out, index=False)
    elif fmt == "csv":
        df.to_csv(out, index=False)
    elif fmt == "json":
        write_text(df.to_json(orient="records"), out)
    else:  # a table for people: empty cells where a frame has no face
        write_text(df.astype(object).where(df.notna(), "").to_string(index=False) + "\n", out)
    return len(df)


def iter_csv(pages: Iterable[pd.DataFrame]) -> Iterator[bytes]:
    """A timeline given page by page (worker.store.query.iter_face_pages) as CSV bytes, one chunk per page: a
    download of any length in the memory of one page."""
    header = True
    for df in pages:
        yield df.round(ROUNDING).to_csv(index=False, header=header).encode()
        header = False
    if header:
        yield (",".join(TIMELINE_COLUMNS) + "\n").encode()


class _Chunks(io.RawIOBase):
    """A write-only file that keeps what was written until taken: pyarrow writes parquet into it, and each row
    group's bytes are handed on as soon as it is written."""

    def __init__(self) -> None:
        self._buf, self._pos = bytearray(), 0

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:
        self._buf += b
        self._pos += len(b)
        return len(b)

    def tell(self) -> int:
        return self._pos

    def take(self) -> bytes:
        out, self._buf = bytes(self._buf), bytearray()
        return out


def iter_parquet(pages: Iterable[pd.DataFrame]) -> Iterator[bytes]:
    """A timeline given page by page as a parquet file's bytes, one row group per page."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ints = {"job", "frame", "face", "track"}
    schema = pa.schema([(c, pa.int64() if c in ints else pa.string() if c == "emotion" else pa.float64())
                        for c in TIMELINE_COLUMNS])  # fmt: skip
    sink = _Chunks()
    with pq.ParquetWriter(sink, schema) as writer:
        for df in pages:
            writer.write_table(pa.Table.from_pandas(df.round(ROUNDING), schema=schema, preserve_index=False))
            yield sink.take()
    yield sink.take()
