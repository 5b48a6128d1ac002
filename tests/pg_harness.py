"""A real PostgreSQL 15 server for tests: initdb + pg_ctl on a temp dir, run as `postgres`.

Usage:
    with PostgresServer() as pg:
        pg.dsn(user="alice", password="alice-pw")

or wrap the `postgres_server` fixture factory in a module-scoped fixture:
    pg = pytest.fixture(scope="module")(postgres_server)

Roles created (one per auth method, to test pass-through of each):
    alice / alice-pw  scram-sha-256
    bob   / bob-pw    md5
    carol             trust
    postgres          trust (superuser)
All roles are superusers so tests can create tables freely; database `app` is owned by alice.
"""
from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Optional

PG_BIN = os.environ.get("WARDEN_PG_BIN", "/usr/lib/postgresql/15/bin")

USERS = {
    "alice": ("alice-pw", "scram-sha-256"),
    "bob": ("bob-pw", "md5"),
    "carol": (None, "trust"),
}


def postgres_available() -> bool:
    return os.path.exists(os.path.join(PG_BIN, "initdb")) and _system_user_exists("postgres")


def _system_user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _pick_host() -> str:
    # 127.0.0.2 plays the "remote" database; fall back to 127.0.0.1 if it cannot be bound.
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.2", 0))
        return "127.0.0.2"
    except OSError:
        return "127.0.0.1"


class PostgresServer:
    """Context manager owning one temporary PostgreSQL cluster and its postmaster process."""

    def __init__(self, host: Optional[str] = None, port: Optional[int] = None,
                 ssl_cert: Optional[str] = None, ssl_key: Optional[str] = None,
                 extra_conf: Optional[dict] = None):
        self.host = host or _pick_host()
        self.port = port or free_port(self.host)
        self.ssl_cert = ssl_cert
        self.ssl_key = ssl_key
        self.extra_conf = extra_conf or {}
        self.base: Optional[str] = None
        self.datadir: Optional[str] = None
        self.pid: Optional[int] = None
        self._as_root = os.geteuid() == 0

    # -- helpers -------------------------------------------------------------------
    def _cmd(self, *args: str) -> list[str]:
        if self._as_root:
            return ["runuser", "-u", "postgres", "--", *args]
        return list(args)

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(self._cmd(*args), check=True, capture_output=True, text=True,
                              timeout=timeout, cwd="/")

    def bin(self, name: str) -> str:
        return os.path.join(PG_BIN, name)

    def dsn(self, user: str = "alice", password: Optional[str] = None, dbname: str = "app",
            host: Optional[str] = None, port: Optional[int] = None, **kw) -> str:
        if password is None and user in USERS:
            password = USERS[user][0]
        parts = [f"host={host or self.host}", f"port={port or self.port}", f"user={user}", f"dbname={dbname}"]
        if password:
            parts.append(f"password={password}")
        parts += [f"{k}={v}" for k, v in kw.items()]
        return " ".join(parts)

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> "PostgresServer":
        self.base = tempfile.mkdtemp(prefix="warden-pg-")
        os.chmod(self.base, 0o755)
        self.datadir = os.path.join(self.base, "data")
        if self._as_root:
            pw = pwd.getpwnam("postgres")
            os.chown(self.base, pw.pw_uid, pw.pw_gid)
        try:
            self._init_cluster()
            self._run(self.bin("pg_ctl"), "-D", self.datadir, "-l", os.path.join(self.base, "log"),
                      "-w", "-t", "60", "start")
            with open(os.path.join(self.datadir, "postmaster.pid")) as f:
                self.pid = int(f.readline())
            self._create_roles()
        except BaseException:
            self.stop()
            raise
        return self

    def _init_cluster(self) -> None:
        pwfile = os.path.join(self.base, "pw")
        with open(pwfile, "w") as f:
            f.write("postgres-pw\n")
        if self._as_root:
            pw = pwd.getpwnam("postgres")
            os.chown(pwfile, pw.pw_uid, pw.pw_gid)
        self._run(self.bin("initdb"), "-D", self.datadir, "-U", "postgres", "--pwfile", pwfile,
                  "-A", "trust", "-E", "UTF8", "--locale", "C", "--no-sync")
        conf = {
            "listen_addresses": f"'{self.host}'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.base}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "60",
            "shared_buffers": "32MB",
            "password_encryption": "'scram-sha-256'",
            "logging_collector": "off",
        }
        if self.ssl_cert:
            conf.update({"ssl": "on", "ssl_cert_file": f"'{self.ssl_cert}'", "ssl_key_file": f"'{self.ssl_key}'"})
        conf.update(self.extra_conf)
        with open(os.path.join(self.datadir, "postgresql.conf"), "a") as f:
            for k, v in conf.items():
                f.write(f"{k} = {v}\n")
        # First matching line wins: one auth method per role; local socket stays trust for setup.
        hba = ["local all all trust"]
        for user, (_pw, method) in USERS.items():
            hba.append(f"host all {user} 127.0.0.0/8 {method}")
        hba.append("host all postgres 127.0.0.0/8 trust")
        hba.append("host all all 127.0.0.0/8 scram-sha-256")
        with open(os.path.join(self.datadir, "pg_hba.conf"), "w") as f:
            f.write("\n".join(hba) + "\n")

    def psql_local(self, sql: str, dbname: str = "postgres") -> str:
        out = self._run(self.bin("psql"), "-h", self.base, "-p", str(self.port), "-U", "postgres",
                        "-d", dbname, "-v", "ON_ERROR_STOP=1", "-qAt", "-c", sql)
        return out.stdout

    def create_table(self, name: str, columns: str, owner: str = "alice") -> None:
        """A table in the app database that `owner` (a test role) owns: its sessions may read,
        write and alter it like their own."""
        self.psql_local(f"CREATE TABLE {name} ({columns}); ALTER TABLE {name} OWNER TO {owner}", dbname="app")

    def _create_roles(self) -> None:
        # password_encryption is per session: set it before each CREATE ROLE so md5 roles get md5 hashes
        stmts = []
        for user, (pw, method) in USERS.items():
            enc = "md5" if method == "md5" else "scram-sha-256"
            password = f" PASSWORD '{pw}'" if pw else ""
            stmts.append(f"SET password_encryption = '{enc}'; CREATE ROLE {user} LOGIN SUPERUSER{password};")
        self.psql_local(" ".join(stmts))
        self.psql_local("CREATE DATABASE app OWNER alice")

    def stop(self) -> None:
        if self.datadir and os.path.exists(os.path.join(self.datadir, "postmaster.pid")):
            try:
                self._run(self.bin("pg_ctl"), "-D", self.datadir, "-m", "immediate", "-w", "-t", "30", "stop")
            except (subprocess.SubprocessError, OSError):
                if self.pid:
                    try:
                        os.kill(self.pid, 9)
                    except ProcessLookupError:
                        pass
        if self.pid:
            # wait (bounded) for the postmaster we started to be gone before removing its files
            for _ in range(100):
                try:
                    os.kill(self.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
            self.pid = None
        if self.base:
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = None

    def __enter__(self) -> "PostgresServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def postgres_server():
    """Generator usable as a pytest fixture body: `pg = pytest.fixture(scope="module")(postgres_server)`."""
    import pytest

    if not postgres_available():
        pytest.skip(f"PostgreSQL binaries not found in {PG_BIN} (install postgresql-15) or no `postgres` user")
    with PostgresServer() as pg:
        yield pg


# ---------------------------------------------------------------------------------------
# Running Warden's Postgres enforcer in front of a test server
# ---------------------------------------------------------------------------------------
class ListSink:
    """EventSink keeping events in memory: [(event_type, fields, session_id)]."""

    def __init__(self):
        import threading
        self.events: list = []
        self._lock = threading.Lock()

    def emit(self, event_type, fields, session_id=None):
        with self._lock:
            self.events.append((event_type, fields, session_id))

    def of_type(self, event_type, session_id=None):
        with self._lock:
            return [f for t, f, s in self.events if t == event_type and (session_id is None or s == session_id)]

    def sessions(self):
        with self._lock:
            return list(dict.fromkeys(s for _t, _f, s in self.events))

    def clear(self):
        with self._lock:
            self.events.clear()


class EnforcerThread:
    """A loopback listener on 127.0.0.1 running `serve_postgres` for every accepted connection,
    on its own event loop in a background thread (so blocking clients can be used from tests).

    `context_factory(n)` returns the ConnectionContext for the n-th connection; by default one is
    built from `upstream` (host, port) with identity "test-svc" and the given policy/masking.
    """

    def __init__(self, upstream: tuple[str, int], sink: Optional[ListSink] = None, policy=None, masking=None,
                 approvals=None, options: Optional[dict] = None, tls=None, server_ssl_context=None,
                 identity: str = "test-svc", target_name: str = "testdb", use_uvloop: bool = False,
                 function_by_oid=None, stopping=None):
        self.upstream = upstream
        self.stopping = stopping        # the agent's "stopping" asyncio.Event, set with stop_sessions()
        self.function_by_oid = function_by_oid    # the target catalog's, as the agent hands it over
        self.sink = sink or ListSink()
        self.policy = policy
        self.masking = masking
        self.approvals = approvals
        self.options = options or {}
        self.tls = tls
        self.server_ssl_context = server_ssl_context
        self.identity = identity
        self.target_name = target_name
        self.use_uvloop = use_uvloop
        self.host = "127.0.0.1"
        self.port: Optional[int] = None
        self.loop = None
        self._thread = None
        self._server = None
        self._count = 0

    def make_context(self):
        from enforcer.context import ConnectionContext, TargetInfo, UpstreamTLS

        self._count += 1
        target = TargetInfo(name=self.target_name, protocol="postgres", upstream_host=self.upstream[0],
                            upstream_port=self.upstream[1], tls=self.tls or UpstreamTLS(),
                            options=dict(self.options))
        return ConnectionContext(session_id=f"s{self._count}", identity=self.identity,
                                 identity_attrs={"unit": "test.service"}, target=target, attribution=None,
                                 sink=self.sink, policy=self.policy, masking=self.masking,
                                 approvals=self.approvals,
                                 extra={"server_ssl_context": self.server_ssl_context,
                                        "pg_function_by_oid": self.function_by_oid,
                                        "agent_stopping": self.stopping})

    def start(self) -> "EnforcerThread":
        import asyncio
        import threading

        from enforcer.postgres.proxy import serve_postgres

        ready = threading.Event()

        async def handle(reader, writer):
            await serve_postgres(reader, writer, self.make_context())

        async def main():
            self._server = await asyncio.start_server(handle, self.host, 0)
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            async with self._server:
                await self._server.serve_forever()

        def run():
            if self.use_uvloop:
                import uvloop
                self.loop = uvloop.new_event_loop()
            else:
                self.loop = asyncio.new_event_loop()
            try:
                self.loop.run_until_complete(main())
            except BaseException:
                pass
            finally:
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
                self.loop.close()

        self._thread = threading.Thread(target=run, name="warden-pg-enforcer", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("enforcer listener did not start")
        return self

    def stop(self) -> None:
        if self.loop is not None and self._server is not None:
            def shutdown():
                for task in [t for t in __import__("asyncio").all_tasks(self.loop)]:
                    task.cancel()
            self.loop.call_soon_threadsafe(shutdown)
        if self._thread is not None:
            self._thread.join(10)

    def dsn(self, pg: PostgresServer, user: str = "alice", **kw) -> str:
        return pg.dsn(user=user, host=self.host, port=self.port, **kw)

    def __enter__(self) -> "EnforcerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def cancel_a_long_query(conn, after_s: float) -> float:
    """Run pg_sleep(20) on a psycopg connection, cancel it after `after_s` with libpq's
    non-blocking cancel and return the seconds until the client got QueryCanceled.

    cancel_safe(), not the blocking conn.cancel(): that one holds the GIL inside libpq, which
    would deadlock with an enforcer running in the same process (not an issue in real use)."""
    import threading

    import psycopg
    timer = threading.Timer(after_s, conn.cancel_safe)
    timer.start()
    started = time.monotonic()
    try:
        conn.execute("SELECT pg_sleep(20)")
    except psycopg.errors.QueryCanceled:
        return time.monotonic() - started
    finally:
        timer.join()
    raise AssertionError("pg_sleep(20) was not cancelled")


def collector_pg_url_fixture():
    """Body of the `pg_url` fixture the collector tests share: a PostgreSQL server with an empty
    `warden` database for the module, or a skip with the reason."""
    import pytest
    if not postgres_available():
        pytest.skip("PostgreSQL server binaries or the postgres user missing")
    with PostgresServer() as pg:
        pg.psql_local("CREATE DATABASE warden")
        yield f"postgresql://postgres@{pg.host}:{pg.port}/warden"


def fresh_postgres_database(base_url: str, name: str) -> str:
    """A new, empty database `name` on the server of `base_url` (dropped first if it exists)."""
    from collector.storage.engine import Store
    admin = Store(base_url)
    try:
        with admin.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}")
            c.exec_driver_sql(f"CREATE DATABASE {name}")
    finally:
        admin.dispose()
    return base_url.rsplit("/", 1)[0] + f"/{name}"
