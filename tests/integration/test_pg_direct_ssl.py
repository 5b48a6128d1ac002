"""PostgreSQL 17 direct SSL (sslnegotiation=direct) through serve_postgres, against a real PostgreSQL 15.

The client's first bytes are a TLS ClientHello (ALPN "postgresql") instead of an SSLRequest; the
enforcer terminates that TLS with a leaf from the agent's LocalCA and runs the normal startup
inside it. Clients: libpq from psycopg-binary (17+, which has sslnegotiation) and a hand-written
Python client speaking the v3 protocol over ssl.SSLSocket, so the ALPN offered can be chosen.
"""
import os
import shutil
import socket
import ssl
import struct
import tempfile
import time

import pytest

from enforcer.tls import LocalCA
from tests.pg_harness import EnforcerThread, cancel_a_long_query, postgres_server

pytestmark = [pytest.mark.postgres]

psycopg = pytest.importorskip("psycopg")

pg = pytest.fixture(scope="module")(postgres_server)


@pytest.fixture(scope="module")
def agent_ca():
    base = tempfile.mkdtemp(prefix="warden-direct-ssl-")
    try:
        yield LocalCA.load_or_create(os.path.join(base, "agent"), "Warden test agent CA")
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def enforcer(request, pg, agent_ca):
    if request.param == "uvloop":
        pytest.importorskip("uvloop")
    ctx = agent_ca.server_context_for(["db.test"], ["127.0.0.1"])
    with EnforcerThread((pg.host, pg.port), server_ssl_context=ctx,
                        use_uvloop=request.param == "uvloop") as enf:
        yield enf


@pytest.fixture(scope="module")
def refusing(pg):
    # no server_ssl_context: the target's client_tls is "refuse"
    with EnforcerThread((pg.host, pg.port), server_ssl_context=None) as enf:
        yield enf


def libpq_has_direct_ssl() -> bool:
    return psycopg.pq.version() >= 170000


def wait_for(sink, event_type, predicate=lambda f: True, timeout=5.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [f for f in sink.of_type(event_type) if predicate(f)]
        if found:
            return found[-1]
        time.sleep(0.02)
    raise AssertionError(f"no {event_type} event")


# -- a minimal v3 client over a TLS socket opened without SSLRequest ----------------------

def client_context(alpn):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    return context


def open_direct(enf, alpn=("postgresql",)) -> ssl.SSLSocket:
    raw = socket.create_connection((enf.host, enf.port), timeout=10)
    return client_context(list(alpn) if alpn is not None else None).wrap_socket(raw, server_hostname="db.test")


def startup_message(**params) -> bytes:
    body = struct.pack("!I", 3 << 16)
    for key, value in params.items():
        body += key.encode() + b"\0" + value.encode() + b"\0"
    body += b"\0"
    return struct.pack("!I", len(body) + 4) + body


def message(type_byte: bytes, body: bytes) -> bytes:
    return type_byte + struct.pack("!I", len(body) + 4) + body


def read_message(sock) -> tuple[bytes, bytes]:
    head = read_exactly(sock, 5)
    length = struct.unpack("!I", head[1:])[0]
    return head[:1], read_exactly(sock, length - 4)


def read_exactly(sock, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def read_until_ready(sock) -> list[tuple[bytes, bytes]]:
    messages = []
    while True:
        kind, body = read_message(sock)
        messages.append((kind, body))
        if kind == b"Z":
            return messages
        if kind == b"E" and b"SFATAL" in body:
            return messages


def error_fields(body: bytes) -> dict:
    fields = {}
    for part in body.split(b"\0"):
        if part:
            fields[part[:1].decode()] = part[1:].decode()
    return fields


def data_rows(messages) -> list[list[str]]:
    rows = []
    for kind, body in messages:
        if kind == b"D":
            count, pos, row = struct.unpack("!H", body[:2])[0], 2, []
            for _ in range(count):
                size = struct.unpack("!i", body[pos:pos + 4])[0]
                pos += 4
                row.append(body[pos:pos + size].decode())
                pos += size
            rows.append(row)
    return rows


# -- tests ------------------------------------------------------------------------------

def test_python_client_direct_ssl_query(enforcer):
    with open_direct(enforcer) as sock:
        assert sock.selected_alpn_protocol() == "postgresql"
        sock.sendall(startup_message(user="carol", database="postgres", application_name="direct-test"))
        startup = read_until_ready(sock)
        assert (b"R", struct.pack("!I", 0)) in startup          # AuthenticationOk (trust)
        assert startup[-1][0] == b"Z"
        sock.sendall(message(b"Q", b"SELECT 41 + 1, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()\0"))
        assert data_rows(read_until_ready(sock)) == [["42", "f"]]   # plaintext upstream leg
        # enough rows to pass through the post-startup hand-over with flow control
        sock.sendall(message(b"Q", b"SELECT repeat('x', 100) FROM generate_series(1, 20000)\0"))
        rows = data_rows(read_until_ready(sock))
        assert len(rows) == 20000 and rows[0] == ["x" * 100]
        sock.sendall(message(b"X", b""))
    start = wait_for(enforcer.sink, "session.start", lambda f: f.get("application_name") == "direct-test")
    assert start["tls_client"] is True
    assert (start["x_tls_negotiation"], start["x_tls_alpn"]) == ("direct", "postgresql")


def test_direct_ssl_without_alpn_is_refused(enforcer):
    with open_direct(enforcer, alpn=None) as sock:
        assert sock.selected_alpn_protocol() is None
        sock.sendall(startup_message(user="carol", database="postgres"))
        kind, body = read_message(sock)
        assert kind == b"E"
        fields = error_fields(body)
        assert fields["C"] == "08P01"
        assert "ALPN" in fields["M"] and "postgresql" in fields["M"]
    end = wait_for(enforcer.sink, "session.end", lambda f: f["reason"] == "direct_tls_without_alpn")
    assert end["sqlstate"] == "08P01"


def test_direct_ssl_with_another_alpn_is_refused(enforcer):
    # the agent's leaf contexts also list http/1.1 (for the HTTP enforcer); not served here
    with open_direct(enforcer, alpn=("http/1.1",)) as sock:
        assert sock.selected_alpn_protocol() == "http/1.1"
        kind, body = read_message(sock)
        assert kind == b"E" and "http/1.1" in error_fields(body)["M"]


def test_refuse_mode_closes_a_direct_ssl_client(refusing):
    raw = socket.create_connection((refusing.host, refusing.port), timeout=10)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        with client_context(["postgresql"]).wrap_socket(raw, server_hostname="db.test") as sock:
            sock.recv(1)
    raw.close()
    start = wait_for(refusing.sink, "session.start", lambda f: "x_client_tls_error" in f)
    assert "client TLS is not enabled" in start["x_client_tls_error"]
    end = wait_for(refusing.sink, "session.end", lambda f: f["reason"] == "client_tls_refused")
    assert end["sqlstate"] == "08P01"


def test_refuse_mode_still_serves_plaintext(refusing, pg):
    with psycopg.connect(refusing.dsn(pg, user="carol", dbname="postgres", sslmode="prefer")) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert not conn.pgconn.ssl_in_use


@pytest.mark.skipif(not libpq_has_direct_ssl(), reason="libpq < 17 has no sslnegotiation=direct")
def test_libpq_direct_ssl(enforcer, pg, agent_ca):
    dsn = enforcer.dsn(pg, user="alice", sslnegotiation="direct", sslmode="require",
                       application_name="libpq-direct")
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT current_user, 6 * 7").fetchone() == ("alice", 42)   # SCRAM passed through
        with conn.cursor() as cur:
            with cur.copy("COPY (SELECT generate_series(1, 1000)) TO STDOUT") as copy:
                assert sum(1 for _ in copy.rows()) == 1000
    start = wait_for(enforcer.sink, "session.start", lambda f: f.get("application_name") == "libpq-direct")
    assert start["tls_client"] is True and start["x_tls_negotiation"] == "direct"
    assert start["tls"]["client"]["version"] in ("TLSv1.2", "TLSv1.3") and start["tls"]["client"]["cipher"]
    # a verifying client accepts the agent CA's leaf over direct SSL too
    dsn = enforcer.dsn(pg, user="bob", sslnegotiation="direct", sslmode="verify-full",
                       sslrootcert=agent_ca.cert_path)
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.skipif(not libpq_has_direct_ssl(), reason="libpq < 17 has no sslnegotiation=direct")
def test_libpq_cancel_over_direct_ssl(enforcer, pg):
    enforcer.sink.clear()
    dsn = enforcer.dsn(pg, user="carol", dbname="postgres", sslnegotiation="direct", sslmode="require")
    with psycopg.connect(dsn) as conn:
        # libpq's new cancel API opens its cancel connection with the same direct SSL
        assert cancel_a_long_query(conn, 0.3) < 10
    wait_for(enforcer.sink, "session.end", lambda f: f["reason"] == "cancel_request")
    direct = [f for f in enforcer.sink.of_type("session.start") if f.get("x_tls_negotiation") == "direct"]
    assert len(direct) == 2                 # the session and its cancel connection


@pytest.mark.skipif(not libpq_has_direct_ssl(), reason="libpq < 17 has no sslnegotiation=direct")
def test_libpq_direct_ssl_against_refuse_mode_fails(refusing, pg):
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(refusing.dsn(pg, user="carol", dbname="postgres", sslnegotiation="direct",
                                     sslmode="require"), connect_timeout=5)


def test_failed_direct_handshake_is_recorded(pg, agent_ca):
    ctx = agent_ca.server_context_for(["db.test"], ["127.0.0.1"])
    with EnforcerThread((pg.host, pg.port), server_ssl_context=ctx, options={"startup_timeout": 0.5}) as enf:
        # a TLS record header whose body is no ClientHello: the handshake fails with an alert
        with socket.create_connection((enf.host, enf.port), timeout=5) as sock:
            sock.sendall(b"\x16\x03\x01\x00\x05hello")
            assert sock.recv(100)[:1] == b"\x15"           # a TLS alert, then the close
        first = wait_for(enf.sink, "session.start", lambda f: "x_client_tls_error" in f)
        assert "handshake with the client failed" in first["x_client_tls_error"]
        # half a ClientHello and silence: closed at startup_timeout
        with socket.create_connection((enf.host, enf.port), timeout=5) as sock:
            sock.sendall(b"\x16\x03\x01\x02\x00abc")
            assert sock.recv(100) == b""
        ends = [f for f in enf.sink.of_type("session.end") if f["reason"] == "tls_handshake_failed"]
        assert len(ends) == 2 and all(f["bytes_out"] == 0 for f in ends)
        assert any("startup timeout of 0.5 s" in f.get("x_client_tls_error", "") for f in enf.sink.of_type("session.start"))
