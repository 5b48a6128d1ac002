"""Open the database (SQLite with WAL, or PostgreSQL through psycopg 3) and migrate it."""
from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Iterator

from sqlalchemy import Connection, Engine, create_engine, event, select, text
from sqlalchemy.engine import make_url

from collector.storage.schema import MIGRATIONS, schema_migrations

_MIGRATION_LOCK_KEY = 0x77617264  # "ward": PostgreSQL advisory lock id for migrations


class DatabaseURLError(ValueError):
    pass


def normalize_url(url: str) -> str:
    """Accept postgresql:// and postgres:// and use the psycopg 3 driver."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://"):]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    if not url.startswith(("sqlite:///", "postgresql+psycopg://")):
        raise DatabaseURLError(
            f"unsupported database URL {url!r}: use sqlite:///PATH or postgresql://USER@HOST:PORT/DB")
    return url


class Store:
    """The engine plus the two ways to use it: read() and write() transactions."""

    def __init__(self, url: str):
        self.url = normalize_url(url)
        self.is_sqlite = self.url.startswith("sqlite")
        # SQLite allows one writer; its busy handler sleeps up to 100 ms between retries, so
        # writer threads of this process queue on a lock instead and start the moment it frees.
        self._sqlite_writer = threading.RLock() if self.is_sqlite else None
        self.engine = self._make_engine()

    def _make_engine(self) -> Engine:
        if not self.is_sqlite:
            return create_engine(self.url, pool_pre_ping=True, pool_size=5, max_overflow=5)
        database = make_url(self.url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(self.url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection, _record):
            # We issue BEGIN ourselves (pysqlite's implicit transactions defer locks).
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            # 32 MiB page cache: index inserts into a large store stay off the disk.
            cursor.execute("PRAGMA cache_size=-32768")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(connection):
            # Writers take the lock up front so two writers never deadlock on upgrade.
            if connection.get_execution_options().get("warden_write"):
                connection.exec_driver_sql("BEGIN IMMEDIATE")
            else:
                connection.exec_driver_sql("BEGIN")

        return engine

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        with self.engine.connect() as connection:
            with connection.begin():
                yield connection

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        with self._sqlite_writer or contextlib.nullcontext():
            with self.engine.connect() as connection:
                connection = connection.execution_options(warden_write=True)
                with connection.begin():
                    yield connection

    def bulk_insert(self, connection: Connection, table_name: str, columns: tuple[str, ...], rows: list) -> None:
        """Insert positional rows in one round trip, inside the caller's transaction:
        COPY on PostgreSQL, one prepared executemany on SQLite (no per-row SQLAlchemy work)."""
        if not rows:
            return
        names = ", ".join(columns)
        cursor = connection.connection.dbapi_connection.cursor()
        try:
            if self.is_sqlite:
                marks = ", ".join("?" * len(columns))
                cursor.executemany(f"INSERT INTO {table_name} ({names}) VALUES ({marks})", rows)
            else:
                with cursor.copy(f"COPY {table_name} ({names}) FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(row)
        finally:
            cursor.close()

    def migrate(self) -> list[int]:
        """Apply pending migrations; safe when several collectors start at once."""
        applied_now = []
        with self.write() as connection:
            if not self.is_sqlite:
                connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK_KEY})
            schema_migrations.create(connection, checkfirst=True)
            done = set(connection.execute(select(schema_migrations.c.version)).scalars())
            for version, name, step in MIGRATIONS:
                if version in done:
                    continue
                step(connection)
                connection.execute(schema_migrations.insert().values(
                    version=version, name=name, applied_ns=time.time_ns()))
                applied_now.append(version)
        return applied_now

    def schema_version(self) -> int:
        with self.read() as connection:
            versions = list(connection.execute(select(schema_migrations.c.version)).scalars())
        return max(versions, default=0)

    def dispose(self) -> None:
        self.engine.dispose()


__all__ = ["Store", "normalize_url", "DatabaseURLError"]
