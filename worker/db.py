"""Database connection: the embedded SQLite file by default, PostgreSQL (or any SQLAlchemy URL) by setting.

The URL comes from `--db`, else FERVID_DATABASE_URL, else a SQLite file in FERVID_HOME (~/.local/share/fervid).
Credentials in URLs are never printed: use `display_url`.
"""

from __future__ import annotations

import os
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import sessionmaker

from model.errors import FervidError

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


def make_engine(url: str | None = None) -> Engine:
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
    try:
        engine = create_engine(url, **kwargs)
    except Exception as e:  # a missing driver, a bad option
        raise FervidError(f"cannot use database {display_url(url)}: {type(e).__name__}: {e}") from None
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision (idempotent; safe to run at every start)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    except OperationalError as e:
        raise FervidError(f"database {display_url(str(engine.url))} is unreachable: {e.orig}") from None


def open_database(url: str | None = None) -> sessionmaker:
    """A session factory on a migrated database."""
    engine = make_engine(url)
    migrate(engine)
    return sessionmaker(engine, expire_on_commit=False)
