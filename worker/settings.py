"""Every setting of a job, of the queue and of the commands, with its default, defined once.

`Settings` is what a job analyses with (stored on the job; part of what makes two jobs "the same"). `Options` are
the other choices of a run or a query (device, batch size, priority, summary windows...), which never change what a
job is. `QueuePolicy` is how the queue keeps jobs alive through faults; each field can be overridden by an
environment variable named FERVID_<FIELD> (e.g. FERVID_LEASE_S=120). The library's functions and the CLI's
options (through `default`) take their defaults from here. This module stays light (no pandas, no torch): every
`fervid` command reads it while it builds its parser.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, fields

from fervid.errors import FervidError
from fervid.model.config import DEFAULT_MODEL, DEFAULT_PRECISION

# RetinaFace's smallest anchors are 16 px; a face of `min_face` pixels must still be ~20 px at the detector's
# input, so frames are shrunk by 20 / min_face before detection (never enlarged).
DETECT_MIN_PX = 20.0


@dataclass(frozen=True)
class Settings:
    sample_fps: float = 5.0  # frames per second of video time (0 = every frame)
    start_s: float = 0.0
    end_s: float | None = None
    model: str = DEFAULT_MODEL  # a shipped model name, or the absolute path of a .safetensors file
    score_threshold: float = 0.9
    # Faces smaller than the classifier's 48x48 input carry little expression detail; 48 px faces also let the
    # detector run at 0.42x, where it is ~2x faster than at 0.5x on a CPU (BENCHMARKS.md).
    min_face: int = 48
    # A crowd shot must not turn one frame into thousands of rows: the largest faces are kept.
    max_faces: int = 64

    def validate(self) -> None:
        if not math.isfinite(self.sample_fps) or self.sample_fps < 0 or self.sample_fps > 1000:
            raise FervidError(f"--fps must be 0 (every frame) or a positive number up to 1000, got {self.sample_fps}")
        if not math.isfinite(self.start_s) or self.start_s < 0:
            raise FervidError(f"--start must be a finite number of seconds >= 0, got {self.start_s}")
        if self.end_s is not None and (not math.isfinite(self.end_s) or self.end_s <= self.start_s):
            raise FervidError(f"--end must be a finite number of seconds after --start, got {self.end_s}")
        if not math.isfinite(self.score_threshold) or not 0 < self.score_threshold < 1:
            raise FervidError(f"--threshold must be between 0 and 1, got {self.score_threshold}")
        if self.min_face < 1 or self.min_face > 4096:
            raise FervidError(f"--min-face must be 1 to 4096 pixels, got {self.min_face}")
        if not 1 <= self.max_faces <= 1000:
            raise FervidError(f"--max-faces must be 1 to 1000, got {self.max_faces}")

    @property
    def detect_scale(self) -> float:
        return min(1.0, DETECT_MIN_PX / self.min_face)


@dataclass(frozen=True)
class Options:
    """Choices of a run or a query that are not part of what a job is: changing them never makes another job."""

    device: str = "auto"  # cpu, cuda, cuda:N, or auto: CUDA where present
    precision: str = DEFAULT_PRECISION  # the emotion model's arithmetic: auto (bf16 where native), fp32 or bf16
    batch_size: int = 16  # frames per batch through the models
    priority: int = 0  # of a submitted job, 0-9: higher runs first
    concurrency: int = 1  # CPU worker processes of `fervid worker` where there is no GPU
    loglevel: str = "INFO"
    status_limit: int = 50  # the newest jobs `fervid status` lists
    smooth_method: str = "mean"  # one of SMOOTH_METHODS
    window_s: float = 5.0  # seconds per window of a summary's dominant-emotion list


# The choices of queries and exports, here rather than beside their code (pandas) so that a parser can offer them.
SMOOTH_METHODS = ("mean", "ema")  # centred moving average; exponential average with the smoothing time as half-life
TIMELINE_FORMATS = ("table", "csv", "json", "parquet")


def default(field_name: str, of: type = Settings) -> object:
    """The default of a field of `of` (Settings, Options or QueuePolicy), for argparse."""
    return next(f.default for f in fields(of) if f.name == field_name)


@dataclass(frozen=True)
class QueuePolicy:
    # A running segment holds a lease that its process renews every heartbeat_s; a lease not renewed for lease_s
    # means the worker died, and the sweeper (every sweep_s) queues the segment again: within
    # lease_s + sweep_s (75 s by default) of a death, well inside the 2 minutes promised in the README.
    lease_s: float = 60.0
    heartbeat_s: float = 10.0
    sweep_s: float = 15.0
    # A segment whose worker died this many times (out of memory, a decoder crash) fails its job.
    max_deaths: int = 3
    # Transient database errors (connection lost or refused, timeouts) are retried with backoff for this long.
    db_retry_s: float = 600.0
    db_retry_max_delay_s: float = 30.0
    # PostgreSQL: how fast a dropped network or a stuck statement becomes an error (then retried).
    db_connect_timeout_s: int = 10
    db_statement_timeout_s: int = 300
    # PostgreSQL: a segment's rows are written by a thread beside the compute; this many batches may wait for it
    # before the frame loop does (backpressure from a slow database).
    write_queue: int = 8
    segment_s: float = 60.0  # video seconds per task
    max_segments: int = 10_000  # per job: a header claiming a billion frames must not become a million tasks
    segment_time_limit_s: int = 3600  # one segment's compute; Celery kills a task that runs longer
    # A message queued this long without being seen in Redis is queued again (a submit killed before enqueueing).
    enqueue_grace_s: float = 30.0

    @classmethod
    def from_env(cls) -> QueuePolicy:
        values = {}
        for f in fields(cls):
            raw = os.environ.get(f"FERVID_{f.name.upper()}")
            if raw is None:
                continue
            kind = int if isinstance(f.default, int) else float
            try:
                value = kind(raw)
            except ValueError:
                raise FervidError(f"FERVID_{f.name.upper()}={raw!r} is not a number") from None
            if not math.isfinite(value) or value <= 0:
                raise FervidError(f"FERVID_{f.name.upper()} must be a positive number, got {raw!r}")
            values[f.name] = value
        return dataclasses.replace(cls(), **values)


def validate_segment_s(segment_s: float) -> None:
    if not math.isfinite(segment_s) or segment_s < 1:
        raise FervidError(f"--segment must be a finite number of seconds >= 1, got {segment_s}")


@dataclass(frozen=True)
class ServerSettings:
    """`fervid serve`'s settings, each from an environment variable FERVID_<FIELD> (e.g. FERVID_MAX_UPLOAD_BYTES).
    Secrets (api_tokens, webhook_secret, cursor_secret) are read here and never logged."""

    api_tokens: tuple[str, ...] = ()  # FERVID_API_TOKENS, comma-separated; none: only loopback may listen
    upload_dir: str = ""  # "": FERVID_HOME/uploads; uploaded videos are streamed here (it is a media root)
    max_upload_bytes: int = 2 * 1024**3
    webhook_secret: str = ""  # callbacks are signed with HMAC-SHA256 under it; none: callback_url is refused
    webhook_attempts: int = 6  # deliveries tried per ended job, at webhook_backoff_s * 2**n apart
    webhook_backoff_s: float = 2.0
    webhook_timeout_s: float = 10.0
    webhook_poll_s: float = 1.0  # how often ended jobs with a callback are looked for (any worker may end them)
    # Cursors are signed so that a client cannot forge one; "": a random key per `fervid serve` (shared by its
    # --workers processes; cursors then do not survive a restart, nor travel between several servers: set it).
    cursor_secret: str = ""
    max_page: int = 1000  # face rows per page
    embedded_threads: int = 1  # segments run at once in-process when no broker is configured

    @classmethod
    def from_env(cls) -> ServerSettings:
        values: dict = {}
        for f in fields(cls):
            raw = os.environ.get(f"FERVID_{f.name.upper()}")
            if raw is None:
                continue
            if f.name == "api_tokens":
                values[f.name] = tuple(t.strip() for t in raw.split(",") if t.strip())
            elif isinstance(f.default, str):
                values[f.name] = raw
            else:
                kind = int if isinstance(f.default, int) else float
                try:
                    values[f.name] = kind(raw)
                except ValueError:
                    raise FervidError(f"FERVID_{f.name.upper()}={raw!r} is not a number") from None
                if not math.isfinite(values[f.name]) or values[f.name] <= 0:
                    raise FervidError(f"FERVID_{f.name.upper()} must be a positive number, got {raw!r}")
        return dataclasses.replace(cls(), **values)
