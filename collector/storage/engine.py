"""Open the database (SQLite with WAL, or PostgreSQL through psycopg 3) and migrate it."""
from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import sqlite3
import threading
import time
from itertools import chain
from pathlib import Path
from typing import Iterator

from sqlalchemy import (BigInteger, Boolean, Connection, Engine, Integer, LargeBinary, create_engine, event,
                        select, text)
from sqlalchemy.engine import make_url

from collector.storage.schema import MIGRATIONS, metadata, schema_migrations

_MIGRATION_LOCK_KEY = 0x77617264  # "ward": PostgreSQL advisory lock id for migrations
# Bound parameters per statement: 32766 since SQLite 3.32, 999 before.
_SQLITE_MAX_VARIABLES = 32766 if sqlite3.sqlite_version_info >= (3, 32, 0) else 999
_SQLITE_ROWS_PER_INSERT = 500


@functools.lru_cache(maxsize=64)
def _copy_types(table_name: str, columns: tuple[str, ...]) -> list[str]:
    """PostgreSQL type names of columns, for a binary COPY."""
    table = metadata.tables[table_name]
    names = []
    for column in columns:
        kind = table.c[column].type
        if isinstance(kind, BigInteger):
            names.append("int8")
        elif isinstance(kind, Integer):
            names.append("int4")
        elif isinstance(kind, Boolean):
            names.append("bool")
        elif isinstance(kind, LargeBinary):
            names.append("bytea")
        else:
            names.append("text")  # String and Text columns (varchar accepts text's binary form)
    return names


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
        # ...and writer processes (ingest workers, a second collector on the same file) queue
        # on an flock of a file beside the database, for the same reason.
        self._writer_lock_path = self._sqlite_lock_path()
        self._writer_lock_fd: int | None = None
        self._writer_depth = 0
        # agent_id -> (public key, hostname) as last read; ingest re-reads the row in its
        # write transaction, so a stale entry costs a second check, never a wrong answer.
        self.agent_identities: dict[str, tuple[bytes, str | None]] = {}
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
            # FULL: under WAL, NORMAL does not sync the WAL at commit, so a power loss can
            # roll back a batch the agent was already told is stored (and then deleted from
            # its spool). FULL syncs the WAL on every commit: one fsync per batch.
            cursor.execute("PRAGMA synchronous=FULL")
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

    def _sqlite_lock_path(self) -> str | None:
        if not self.is_sqlite:
            return None
        database = make_url(self.url).database
        if not database or database == ":memory:" or database.startswith("file:"):
            return None
        return database + ".writer-lock"

    @contextlib.contextmanager
    def _process_writer_lock(self) -> Iterator[None]:
        # Called with self._sqlite_writer held; reentrant like it.
        if self._writer_lock_path is None:
            yield
            return
        if self._writer_depth == 0:
            if self._writer_lock_fd is None:
                self._writer_lock_fd = _open_writer_lock(self._writer_lock_path)
            _flock_within(self._writer_lock_fd, _WRITER_LOCK_TIMEOUT_S, self._writer_lock_path)
        self._writer_depth += 1
        try:
            yield
        finally:
            self._writer_depth -= 1
            if self._writer_depth == 0:
                fcntl.flock(self._writer_lock_fd, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        if self._sqlite_writer is None:
            with self.engine.connect() as connection:
                connection = connection.execution_options(warden_write=True)
                with connection.begin():
                    yield connection
            return
        with self._sqlite_writer, self._process_writer_lock():
            with self.engine.connect() as connection:
                connection = connection.execution_options(warden_write=True)
                with connection.begin():
                    yield connection

    def bulk_insert(self, connection: Connection, table_name: str, columns: tuple[str, ...], rows: list) -> None:
        """Insert positional rows inside the caller's transaction, with no per-row
        SQLAlchemy work: COPY on PostgreSQL; multi-row INSERTs on SQLite."""
        if not rows:
            return
        names = ", ".join(columns)
        cursor = connection.connection.dbapi_connection.cursor()
        try:
            if self.is_sqlite:
                # One statement per chunk rather than executemany: pysqlite releases and
                # re-takes the GIL around every step, so executemany under concurrent
                # ingest threads waits for the GIL once per row.
                per_chunk = max(1, min(_SQLITE_ROWS_PER_INSERT, _SQLITE_MAX_VARIABLES // len(columns)))
                row_marks = "(" + ", ".join("?" * len(columns)) + ")"
                for start in range(0, len(rows), per_chunk):
                    chunk = rows[start:start + per_chunk]
                    cursor.execute(f"INSERT INTO {table_name} ({names}) VALUES "
                                   + ", ".join([row_marks] * len(chunk)), list(chain.from_iterable(chunk)))
            else:
                # Binary COPY: no text formatting here nor parsing in the server.
                with cursor.copy(f"COPY {table_name} ({names}) FROM STDIN (FORMAT BINARY)") as copy:
                    copy.set_types(_copy_types(table_name, columns))
                    write_row = copy.write_row
                    for row in rows:
                        write_row(row)
        finally:
            cursor.close()

    def sessions_by_sid(self, connection: Connection, sids: list[str]) -> dict[str, tuple]:
        """sid -> (identity, target) of the stored sessions among sids."""
        if not sids:
            return {}
        if not self.is_sqlite:
            # One array parameter: the plan is a primary-key probe per sid whatever the
            # list's length (a long IN list was planned as a sequential scan).
            rows = connection.exec_driver_sql(
                "SELECT s.sid, s.identity, s.target FROM unnest(%s::text[]) AS k(sid) "
                "JOIN sessions s ON s.sid = k.sid", (sids,))
            return {sid: (identity, target) for sid, identity, target in rows}
        found = {}
        for start in range(0, len(sids), 500):
            chunk = sids[start:start + 500]
            rows = connection.exec_driver_sql(
                f"SELECT sid, identity, target FROM sessions WHERE sid IN ({', '.join('?' * len(chunk))})",
                tuple(chunk))
            found.update((sid, (identity, target)) for sid, identity, target in rows)
        return found

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
        with self._sqlite_writer or contextlib.nullcontext():
            if self._writer_lock_fd is not None and self._writer_depth == 0:
                os.close(self._writer_lock_fd)
                self._writer_lock_fd = None


__all__ = ["Store", "normalize_url", "DatabaseURLError"]


# as long as SQLite's own busy timeout: a writer stuck in another process fails this ingest
# (the agent retries) instead of blocking every worker for good
_WRITER_LOCK_TIMEOUT_S = 30.0


def _flock_within(fd: int, timeout_s: float, path: str) -> None:
    deadline = time.monotonic() + timeout_s
    delay = 0.0002
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"another collector process has held the SQLite writer lock {path} for "
                                   f"{timeout_s:g} s; if none is running, check for a stuck one") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.002)


def _open_writer_lock(path: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except PermissionError as exc:
        try:
            owner = os.stat(path).st_uid
            whose = f"it belongs to uid {owner}, this process runs as uid {os.geteuid()}"
        except OSError:
            whose = f"its directory is not writable by uid {os.geteuid()}"
        raise PermissionError(
            f"cannot open the SQLite writer lock {path} ({exc.strerror}): {whose}. The database files must "
            f"belong to the user the collector runs as (packaged: chown -R warden-collector: "
            f"/var/lib/warden-collector)") from None
