"""Workload processes for the reliability scenarios. They run *inside* the test cgroup (so
their connects are governed) and report one JSON line per attempt on stdout.

    python -m tests.reliability.workload sessions  DSN TAG [--count N] [--stop-file F] [--payload BYTES]
    python -m tests.reliability.workload victim    DSN
    python -m tests.reliability.workload hold      DSN N
    python -m tests.reliability.workload stall     HOST PORT N

`sessions`: one short session after another (connect, one SELECT, close), each with
application_name TAG-i so the server log shows which attempts reached the database.
`victim`: one session that waits inside a statement while the database restarts.
`hold`: N concurrent sessions (asyncpg), all open at once until stdin closes.
`stall`: N raw TCP connections that never send a byte; reports what each one received.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time


def say(**fields) -> None:
    print(json.dumps(fields), flush=True)


def _classify(exc: Exception) -> dict:
    text = str(exc)
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate is None:
        diag = getattr(exc, "diag", None)
        sqlstate = getattr(diag, "sqlstate", None) if diag is not None else None
    if sqlstate is None:
        # psycopg reports server FATALs during connect only as text: find the SQLSTATE code we know
        for code in ("53100", "57P01", "57P05", "08P01", "42501"):
            if code in text:
                sqlstate = code
    return {"error": text.strip()[:400], "sqlstate": sqlstate, "spool_full": "record spool is full" in text,
            "refused": "Connection refused" in text or "ECONNREFUSED" in text}


def run_sessions(dsn: str, tag: str, count: int, stop_file: str | None, payload: int) -> None:
    import psycopg
    i = 0
    filler = os.urandom(payload // 2).hex() if payload else ""
    while count <= 0 or i < count:
        if stop_file and os.path.exists(stop_file):
            break
        i += 1
        started = time.monotonic()
        try:
            with psycopg.connect(dsn, connect_timeout=10, application_name=f"{tag}-{i}") as conn:
                sql = f"SELECT {i}, length('{filler}')" if filler else f"SELECT {i}"
                value = conn.execute(sql).fetchone()[0]
            say(i=i, ok=value == i, t=round(time.monotonic() - started, 4), ts1=time.time())
        except Exception as exc:  # every failure is reported, the loop goes on
            say(i=i, ok=False, t=round(time.monotonic() - started, 4), ts1=time.time(), **_classify(exc))
            time.sleep(0.05)


def run_probe(host: str, port: int, user: str) -> None:
    """A bare StartupMessage (no SSLRequest): report the first answer's type and error fields."""
    from enforcer.postgres import protocol as P
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(P.build_startup_message({"user": user, "database": "app"}))
        data = b""
        while len(data) < 5 or len(data) < 1 + int.from_bytes(data[1:5], "big"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    if data[:1] == b"E" and len(data) >= 5:
        fields = P.parse_error_fields(data[5:1 + int.from_bytes(data[1:5], "big")])
        say(kind="E", sqlstate=fields.get("C"), message=fields.get("M"), severity=fields.get("S"))
    else:
        say(kind=data[:1].decode("latin-1"), sqlstate=None, message=None)


def run_victim(dsn: str) -> None:
    import psycopg
    conn = psycopg.connect(dsn, connect_timeout=10, autocommit=True, application_name="restart-victim")
    conn.execute("SELECT 1")
    say(phase="connected")
    try:
        conn.execute("SELECT pg_sleep(120)")
        say(phase="done", ok=True)
    except Exception as exc:
        say(phase="done", ok=False, **_classify(exc))
    finally:
        try:
            conn.close()
        except Exception:
            pass


async def _hold(dsn_kwargs: dict, n: int) -> None:
    import asyncpg
    gate = asyncio.Semaphore(50)          # pace connection setup, not the number held

    async def one(i: int):
        async with gate:
            try:
                conn = await asyncpg.connect(timeout=60, **dsn_kwargs)
                value = await conn.fetchval("SELECT $1::int", i)
                return conn if value == i else None
            except Exception as exc:
                return exc

    results = await asyncio.gather(*(one(i) for i in range(n)))
    conns = [r for r in results if r is not None and not isinstance(r, Exception)]
    errors = [str(r)[:200] for r in results if isinstance(r, Exception)]
    say(phase="ready", opened=len(conns), errors=len(errors), first_error=errors[0] if errors else None)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    # every held session still works after the measurement
    checks = await asyncio.gather(*(c.fetchval("SELECT 1") for c in conns), return_exceptions=True)
    served = sum(1 for v in checks if v == 1)
    await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
    say(phase="done", served=served)


def run_stall(host: str, port: int, n: int, wait_s: float) -> None:
    socks = []
    refused = 0
    for _ in range(n):
        s = socket.socket()
        s.settimeout(10)
        try:
            s.connect((host, port))
            socks.append(s)
        except OSError:
            refused += 1
            s.close()
    say(phase="ready", open=len(socks), refused=refused)
    sys.stdin.readline()          # the runner measures memory while they stall, then lets go
    deadline = time.monotonic() + wait_s
    closed, with_error, messages = 0, 0, set()
    for s in socks:
        data = b""
        try:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    closed += 1
                    break
                data += chunk
        except OSError:
            pass
        if data[:1] == b"E":
            with_error += 1
            body = data[5:]
            for part in body.split(b"\0"):
                if part[:1] == b"M":
                    messages.add(part[1:].decode("utf-8", "replace"))
        s.close()
    say(phase="done", closed=closed, error_responses=with_error, messages=sorted(messages))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("sessions")
    p.add_argument("dsn")
    p.add_argument("tag")
    p.add_argument("--count", type=int, default=0)
    p.add_argument("--stop-file")
    p.add_argument("--payload", type=int, default=0)
    p = sub.add_parser("probe")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("user")
    p = sub.add_parser("victim")
    p.add_argument("dsn")
    p = sub.add_parser("hold")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("user")
    p.add_argument("n", type=int)
    p = sub.add_parser("stall")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("n", type=int)
    p.add_argument("--wait", type=float, default=30)
    args = parser.parse_args(argv)
    if args.mode == "sessions":
        run_sessions(args.dsn, args.tag, args.count, args.stop_file, args.payload)
    elif args.mode == "probe":
        run_probe(args.host, args.port, args.user)
    elif args.mode == "victim":
        run_victim(args.dsn)
    elif args.mode == "hold":
        asyncio.run(_hold({"host": args.host, "port": args.port, "user": args.user, "database": "app",
                           "ssl": False}, args.n))
    else:
        run_stall(args.host, args.port, args.n, args.wait)
    return 0


if __name__ == "__main__":
    sys.exit(main())
