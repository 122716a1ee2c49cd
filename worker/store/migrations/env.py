"""Alembic environment: the same migrations for SQLite and PostgreSQL, run from code (worker.store.db.migrate)."""

from alembic import context

from fervid.worker.store.schema import Base

config = context.config


def run_migrations() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        from sqlalchemy import create_engine

        connection = create_engine(config.get_main_option("sqlalchemy.url")).connect()
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
    )
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
