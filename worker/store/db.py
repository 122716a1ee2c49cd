"""Database connection: the embedded SQLite file by default, PostgreSQL (or any SQLAlchemy URL) by setting.

The URL comes from `--db`, else FERVID_DATABASE_URL, else a SQLite file in FERVID_HOME (~/.local/share/fervid).
Credentials in URLs are never printed: use `display_url`.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy import exc as sa_exc
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import sessionmaker

from fervid.errors import FervidError
from fervid.worker.settings import QueuePolicy

log = logging.getLogger("fervid.db")
T = TypeVar("T")

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def fervid_home() -> Path:
    return Path(os.environ.get("FERVID_HOME", Path.home() / ".local" / "share" / "fervid"))


def database_url(url: str | None = None) -> str:
    url = url or os.environ.get("FERVID_DATABASE_URL")
    if url:
        return url
    home = fervid_home()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'fervid.db'}"


def display_url(url: str) -> str:
    """The URL with its password hidden, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable database URL>"


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # noqa: ANN001
    cur = dbapi_conn.cursor()
    # WAL lets readers (fervid status, queries) work while a job writes; busy_timeout waits out writers.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(url: str | None = None, policy: QueuePolicy | None = None) -> Engine:
    url = database_url(url)
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise FervidError("the database URL is not a valid SQLAlchemy URL") from None
    kwargs: dict = {"pool_pre_ping": True}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database:
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    else:
        kwargs.update(pool_size=5, max_overflow=5)
        if parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() == "psycopg":
            kwargs["connect_args"] = _pg_connect_args(policy or QueuePolicy.from_env())
    try:
        engine = create_engine(url, **kwargs)
    except Exception as e:  # a missing driver, a bad option
        raise FervidError(f"cannot use database {display_url(url)}: {type(e).__name__}: {e}") from None
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    if engine.dialect.driver == "psycopg":
        event.listen(engine, "before_cursor_execute", _binary_rows)
    return engine


# A statement with this execution option gets its rows in PostgreSQL's binary format: numbers arrive as numbers
# instead of text for the driver to parse, much of the time it takes to read a page of face rows. Only for
# statements whose columns are numbers and text (the JSON columns' loaders expect text).
BINARY_ROWS = "fervid_binary_rows"


def _binary_rows(_conn, cursor, _statement, _params, context, _executemany) -> None:  # noqa: ANN001
    if context is not None and context.execution_options.get(BINARY_ROWS):
        from psycopg.pq import Format

        cursor.format = Format.BINARY


def _pg_connect_args(policy: QueuePolicy) -> dict:
    """A database that vanishes (a cut network, a dead server) must be an error within seconds, not a hang:
    the retry policy then waits it out. TCP keepalives find a silent peer; tcp_user_timeout bounds unacknowledged
    writes; the statement timeout bounds a stuck statement."""
    ms = policy.db_statement_timeout_s * 1000
    return {
        "connect_timeout": policy.db_connect_timeout_s,
        "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
        "tcp_user_timeout": 30_000,
        "options": f"-c statement_timeout={ms} -c idle_in_transaction_session_timeout={ms}",
    }  # fmt: skip


def is_transient(exc: BaseException) -> bool:
    """A database that is briefly away (worth waiting for), as opposed to a query that can never succeed
    (IntegrityError, DataError, ProgrammingError: fail at once, with the real message)."""
    if isinstance(exc, sa_exc.DisconnectionError | sa_exc.TimeoutError):
        return True
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        if isinstance(exc.orig, sqlite3.OperationalError):  # "no such table" is not going to heal
            msg = str(exc.orig).lower()
            return any(w in msg for w in ("locked", "busy", "disk i/o", "unable to open"))
        return isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError)
    return isinstance(exc, ConnectionError | TimeoutError)


class DatabaseUnavailable(FervidError):
    """The database stayed unreachable for the whole retry policy."""


def retry_delays(policy: QueuePolicy) -> Iterator[float]:
    """Seconds to wait before each retry: 0.5, 1, 2, ... up to db_retry_max_delay_s, until together they cover
    db_retry_s of outage."""
    total, delay = 0.0, 0.5
    while total < policy.db_retry_s:
        d = min(delay, policy.db_retry_max_delay_s, policy.db_retry_s - total)
        yield d
        total += d
        delay *= 2


def with_db_retry(fn: Callable[[], T], policy: QueuePolicy, what: str) -> T:
    """Run `fn` (a whole transaction), again after transient database errors, with backoff, for up to
    policy.db_retry_s. Permanent errors propagate at once."""
    delays = retry_delays(policy)
    started = time.monotonic()
    while True:
        try:
            return fn()
        except Exception as e:
            if not is_transient(e):
                raise
            delay = next(delays, None)
            reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0][:200] if str(e).strip() else type(e)
            if delay is None:
                raise DatabaseUnavailable(
                    f"database unreachable for {time.monotonic() - started:.0f} s while {what}: {reason}"
                ) from e
            log.warning("database error while %s (%s); retrying in %.1f s", what, reason, delay)
            time.sleep(delay * random.uniform(0.8, 1.0))


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision (idempotent; safe to run at every start)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    except OperationalError as e:
        reason = str(e.orig).strip().splitlines()[0] if str(e.orig).strip() else type(e.orig).__name__
        raise DatabaseUnavailable(f"database {display_url(str(engine.url))} is unreachable: {reason}") from None


def open_database_waiting(policy: QueuePolicy, url: str | None = None) -> sessionmaker:
    """open_database for workers: a database that is not up yet (a restart, a deploy) is waited for, with the
    retry policy's backoff, instead of failing the message at hand."""
    delays = retry_delays(policy)
    while True:
        try:
            return open_database(url)
        except DatabaseUnavailable as e:
            delay = next(delays, None)
            if delay is None:
                raise
            log.warning("%s; retrying in %.1f s", e, delay)
            time.sleep(delay)


def open_database(url: str | None = None) -> sessionmaker:
    """A session factory on a migrated database."""
    engine = make_engine(url)
    migrate(engine)
    return sessionmaker(engine, expire_on_commit=False)


def autocommit_sessions(sessions: sessionmaker) -> sessionmaker:
    """Sessions on the same engine and pool whose statements commit each by itself: for short reads that need no
    transaction, they save a BEGIN and a ROLLBACK round trip to the database each."""
    return sessionmaker(sessions.kw["bind"].execution_options(isolation_level="AUTOCOMMIT"), expire_on_commit=False)


@functools.lru_cache(maxsize=8)
def _open_cached(url: str) -> sessionmaker:
    return open_database(url)


def sessions_for(db: str | sessionmaker | None) -> sessionmaker:
    """A session factory for what a caller names (a URL, None for the default, or a factory it already has). URLs
    are opened (and migrated) once per process, so that repeated notebook calls are quick."""
    return db if isinstance(db, sessionmaker) else _open_cached(database_url(db))
