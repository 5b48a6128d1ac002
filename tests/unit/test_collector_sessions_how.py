"""`warden sessions list/show` answer "how": which process, from where, as which database role,
to which database, over TLS or not, brokered or not, and how the session ended.

The events come from the real emitters: Postgres sessions from the sans-IO
enforcer.postgres.session.PostgresSession (a TLS pass-through login, and a brokered login run
by enforcer.postgres.broker.BrokeredLogin with a real service token, as
enforcer/postgres/proxy.py drives them); a plain HTTP session from enforcer.http.proxy.serve_http
on loopback; the session.start of an intercepted TLS HTTP session from the HTTP enforcer's own
field builders; process records from agent.procinfo (this test process). They are sealed and
signed like an agent's batches (collector.simulate) and ingested by a real collector on SQLite
and, when installed, PostgreSQL; the API and the `warden` CLI are asserted.
"""
from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import pwd
import socket
import threading
import time
import warnings

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from rich.console import Console
from sqlalchemy import (BigInteger, Column, Index, Integer, MetaData, String, Table, Text, func, insert, select,
                        text)

warnings.filterwarnings("ignore", category=DeprecationWarning)

import httpx  # noqa: E402
import uvicorn  # noqa: E402

from agent import procinfo  # noqa: E402
from collector import cli as collector_cli  # noqa: E402
from collector import client_cli  # noqa: E402
from collector.config import CollectorConfig  # noqa: E402
from collector.ingest import set_ingest_workers  # noqa: E402
from collector.simulate import SimulatedAgent  # noqa: E402
from collector.storage.engine import Store  # noqa: E402
from collector.storage.schema import (MIGRATIONS, agents, batches, event_tables, events,  # noqa: E402
                                      schema_migrations, sessions)
from enforcer.context import Attribution, ConnectionContext, TargetInfo  # noqa: E402
from enforcer.http.proxy import _client_tls_fields, _start_fields_of, serve_http  # noqa: E402
from enforcer.postgres import protocol as P  # noqa: E402
from enforcer.postgres import session as S  # noqa: E402
from enforcer.postgres.broker import BrokerConfig, PostgresBroker, SecretFile  # noqa: E402
from enforcer.postgres.session import PostgresSession  # noqa: E402
from enforcer.tokens import TokenVerifier  # noqa: E402
from tests.pg_harness import collector_pg_url_fixture, fresh_postgres_database  # noqa: E402
from tests.unit.test_collector_retention import Env  # noqa: E402
from tests.unit.test_pg_session import AUTH_DONE, STARTUP, Driver  # noqa: E402

T0 = 1_777_601_700 * 10**9          # 2026-05-01T02:15:00Z
ISSUER, AUDIENCE = "https://issuer.test", "customers-db"
IDLE_MESSAGE = "terminating connection due to idle timeout of 60 s (target option idle_timeout)"
ME = pwd.getpwuid(os.getuid()).pw_name


# --- recording what the enforcers emit -----------------------------------------------------

class Recorder:
    """The enforcers' event sink: (type, fields, session id) in emit order."""

    def __init__(self):
        self.events: list[tuple[str, dict, str | None]] = []

    def emit(self, event_type: str, fields: dict, session_id: str | None = None) -> None:
        self.events.append((event_type, dict(fields), session_id))


def this_process() -> procinfo.ProcessInfo:
    pid = os.getpid()
    return procinfo.describe(pid, pid, os.getuid(), os.getgid(), "python3", 0)


def agent_start_fields(protocol: str, target: str, orig_dst: str, client: str) -> dict:
    """The session.start fields agent/daemon.py prepares for the enforcers (session_start_fields)."""
    return {"identity": "billing", "target": target, "protocol": protocol, "orig_dst": orig_dst,
            "process": procinfo.as_record(this_process()), "client": client, "host": "app-1", "agent": "how-agent"}


def record_pg_tls() -> list[tuple[str, dict]]:
    """A pass-through login over TLS on both legs (SSLRequest, then upstream TLS as the proxy sets
    it), md5 authentication, a statement that succeeds and one the server refuses; the client
    then goes away."""
    session = PostgresSession(identity="billing", target="db", client_tls_available=True,
                              start_fields=agent_start_fields("postgres", "db", "127.0.0.5:5432", "127.0.1.3:45678"))
    d = Driver(session=session)
    d.client(P.build_ssl_request())
    assert (S.START_CLIENT_TLS, "sslrequest") in d.other
    d._run(session.client_tls_established())
    d.client(STARTUP)
    session.tls_upstream = True     # enforcer/postgres/proxy.py, once the upstream TLS handshake is done
    d.server(P.build_authentication_md5(b"salt"))
    d.client(P.build_password("md5" + "0" * 32))
    d.server(AUTH_DONE)
    d.client(P.build_query("SELECT * FROM customers WHERE id = 7"))
    d.server(P.build_command_complete("SELECT 1") + P.build_ready_for_query("I"))
    d.client(P.build_query("SELECT * FROM missing"))
    d.server(P.build_error_response("42P01", 'relation "missing" does not exist') + P.build_ready_for_query("I"))
    d._run(session.finish("client_closed"))
    return d.events


@pytest.fixture(scope="module")
def service_token(tmp_path_factory):
    """A JWKS file and a service token signed by its key: (jwks path, token)."""
    work = tmp_path_factory.mktemp("token")
    key = ed25519.Ed25519PrivateKey.generate()
    jwk = jwt.algorithms.OKPAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwk["kid"] = "ed-1"
    (work / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    now = int(time.time())
    token = jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "billing-svc", "iat": now, "exp": now + 600,
                        "jti": "tok-42"}, key, algorithm="EdDSA", headers={"kid": "ed-1"})
    secret = work / "secret"
    secret.write_text("app-rw-secret\n")
    secret.chmod(0o600)
    return str(work / "jwks.json"), token, str(secret)


def record_pg_brokered(service_token) -> list[tuple[str, dict]]:
    """A brokered login as enforcer/postgres/proxy.py _connect_upstream runs it: the client (user
    alice, over loopback without TLS) presents a service token, Warden logs in upstream as app_rw
    with md5, the session carries on from AuthenticationOk; it ends on the idle timeout."""
    jwks, token, secret = service_token
    broker = PostgresBroker(BrokerConfig(target="db", user="app_rw", password_file=secret, accept="token"),
                            verifier=TokenVerifier(ISSUER, AUDIENCE, jwks), secret=SecretFile(secret))
    session = PostgresSession(identity="billing", target="db",
                              start_fields=agent_start_fields("postgres", "db", "127.0.0.5:5432", "127.0.0.1:50123"))
    d = Driver(session=session)
    d.client(P.build_startup_message({"user": "alice", "database": "app", "application_name": "billing-worker"}))
    assert [kind for kind, _ in d.other] == [S.CONNECT_UPSTREAM]
    login = broker.login(session.startup_params, client_secure=True)
    login.begin()
    claims = login.check_password(login.feed_client(P.build_password(token)))
    assert claims["sub"] == "billing-svc"
    login.upstream_startup()
    assert login.feed_server(P.build_authentication_md5(b"salt"))
    login.feed_server(AUTH_DONE)
    assert login.done
    session.auth_method = f"brokered:{login.upstream_method}"
    session.start_fields.update(login.record_fields())
    d.server(login.server_bytes)
    d.client(P.build_query("SELECT * FROM customers"))
    d.server(P.build_command_complete("SELECT 3") + P.build_ready_for_query("I"))
    d._run(session.fatal("57P05", IDLE_MESSAGE, "idle_timeout"))
    return d.events


async def _upstream(reader, writer):
    try:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


async def _record_http_plain() -> list[tuple[str, dict]]:
    """One plain-HTTP session through serve_http on loopback."""
    recorder = Recorder()
    upstream = await asyncio.start_server(_upstream, "127.0.0.1", 0)
    port = upstream.sockets[0].getsockname()[1]

    async def enforce(reader, writer):
        client_ip, client_port = writer.get_extra_info("peername")[:2]
        attribution = Attribution(orig_ip="127.0.0.1", orig_port=port, family=socket.AF_INET, target_id=1,
                                  client_ip=client_ip, client_port=client_port, socket_cookie=1,
                                  connect_ns=time.monotonic_ns(), process=this_process())
        ctx = ConnectionContext("http-plain", "billing", {}, TargetInfo("api", "http", "127.0.0.1", port),
                                attribution, recorder)
        ctx.extra["session_start_fields"] = agent_start_fields("http", "api", f"127.0.0.1:{port}",
                                                               f"{client_ip}:{client_port}")
        await serve_http(reader, writer, ctx)

    proxy = await asyncio.start_server(enforce, "127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{proxy.sockets[0].getsockname()[1]}",
                                     headers={"Host": "api"}) as workload:
            assert (await workload.get("/status")).status_code == 200
        deadline = time.monotonic() + 5
        while not any(e[0] == "session.end" for e in recorder.events) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    finally:
        proxy.close()
        upstream.close()
    return [(event_type, fields) for event_type, fields, _ in recorder.events]


def record_http_tls() -> list[tuple[str, dict]]:
    """The session.start of an HTTPS connection the HTTP enforcer intercepted (its start():
    the agent's fields plus _client_tls_fields), and a session.end as its _end() writes it."""
    ctx = ConnectionContext("http-tls", "billing", {}, TargetInfo("api", "http", "127.0.0.9", 443), None, None)
    ctx.extra["session_start_fields"] = agent_start_fields("http", "api", "127.0.0.9:443", "127.0.1.3:40001")
    start = dict(_start_fields_of(ctx), **_client_tls_fields(
        "intercept", {"sni": "api.example.com", "version": "TLSv1.3", "alpn": "http/1.1"}))
    end = {"reason": "client_closed", "duration_ns": 5_000_000, "requests": 1, "bytes_in": 120, "bytes_out": 900,
           "error": None}
    return [("session.start", start), ("session.end", end)]


@pytest.fixture(scope="module")
def recordings(service_token):
    return {"pg-tls": record_pg_tls(), "pg-brokered": record_pg_brokered(service_token),
            "http-plain": asyncio.run(asyncio.wait_for(_record_http_plain(), 30)), "http-tls": record_http_tls()}


def seal(agent: SimulatedAgent, sid: str, recorded: list, start_ns: int) -> list[dict]:
    return [agent.event(event_type, fields, sid, start_ns + n * 1_000_000)
            for n, (event_type, fields) in enumerate(recorded)]


# start times: pg-tls 02:15, pg-brokered 02:16, http-plain 02:17, http-tls 02:18
ORDER = ("pg-tls", "pg-brokered", "http-plain", "http-tls")


def ingest_all(env: Env, recordings: dict, agent_id: str = "how-agent") -> SimulatedAgent:
    agent = SimulatedAgent(agent_id, hostname="app-1")
    env.enroll(agent)
    for n, sid in enumerate(ORDER):
        env.ingest(agent, seal(agent, sid, recordings[sid], T0 + n * 60 * 10**9))
    return agent


# --- backends ------------------------------------------------------------------------------

pg_url = pytest.fixture(scope="module", name="pg_url")(collector_pg_url_fixture)


def _database_url(request, tmp_path, backend: str, name: str) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path}/{name}.db"
    safe = "".join(ch if ch.isalnum() else "_" for ch in f"how_{name}_{request.node.name}".lower())[:60]
    return fresh_postgres_database(request.getfixturevalue("pg_url"), safe)


BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def env(request, tmp_path, backend):
    env = Env(CollectorConfig(state_dir=str(tmp_path / "state"), db=_database_url(request, tmp_path, backend, "c"),
                              ingest_workers=0))
    yield env
    env.close()
    set_ingest_workers(None)


def api_sessions(env: Env, **params) -> dict[str, dict]:
    answer = env.client.get("/v1/sessions", params=params, headers=env.headers("auditor"))
    assert answer.status_code == 200, answer.text
    return {s["id"]: s for s in answer.json()["items"]}


HOW_KEYS = ("auth_user", "database", "client", "orig_dst", "tls_client", "tls_upstream", "credentials",
            "client_user", "end_reason", "end_error", "end_sqlstate")


def how(session: dict) -> dict:
    return {key: session[key] for key in HOW_KEYS}


EXPECTED_HOW = {
    "pg-tls": {"auth_user": "alice", "database": "app", "client": "127.0.1.3:45678", "orig_dst": "127.0.0.5:5432",
               "tls_client": True, "tls_upstream": True, "credentials": None, "client_user": None,
               "end_reason": "client_closed", "end_error": None, "end_sqlstate": "42P01"},
    "pg-brokered": {"auth_user": "app_rw", "database": "app", "client": "127.0.0.1:50123",
                    "orig_dst": "127.0.0.5:5432", "tls_client": False, "tls_upstream": False,
                    "credentials": "brokered", "client_user": "alice", "end_reason": "idle_timeout",
                    "end_error": IDLE_MESSAGE, "end_sqlstate": "57P05"},
    "http-tls": {"auth_user": None, "database": None, "client": "127.0.1.3:40001", "orig_dst": "127.0.0.9:443",
                 "tls_client": True, "tls_upstream": None, "credentials": None, "client_user": None,
                 "end_reason": "client_closed", "end_error": None, "end_sqlstate": None},
}


# --- the index and the API -----------------------------------------------------------------

def test_sessions_say_how_they_connected_and_ended(env, recordings):
    ingest_all(env, recordings)
    found = api_sessions(env)
    assert list(found) == list(reversed(ORDER))          # newest first
    for sid, expected in EXPECTED_HOW.items():
        assert how(found[sid]) == expected, sid
    plain = found["http-plain"]
    client = next(f for t, f in recordings["http-plain"] if t == "session.start")["client"]
    # no TLS fields on the HTTP enforcer's session.start: the client spoke plain HTTP
    assert how(plain) == {"auth_user": None, "database": None, "client": client, "orig_dst": plain["orig_dst"],
                          "tls_client": False, "tls_upstream": None, "credentials": None, "client_user": None,
                          "end_reason": plain["end_reason"], "end_error": None, "end_sqlstate": None}
    assert plain["orig_dst"].startswith("127.0.0.1:") and plain["end_reason"]
    assert plain["request_count"] == 1
    # the process that opened each session, as agent/procinfo describes it
    for session in found.values():
        assert session["process"]["pid"] == os.getpid() and session["process"]["user"] == ME
    # the same in the session's own answer
    one = env.client.get("/v1/sessions/pg-brokered", headers=env.headers("auditor")).json()
    assert how(one) == EXPECTED_HOW["pg-brokered"]


def test_session_detail_carries_the_start_and_end_fields(env, recordings):
    ingest_all(env, recordings)
    auditor = env.headers("auditor")
    brokered = env.client.get("/v1/sessions/pg-brokered", headers=auditor).json()
    start = brokered["start_fields"]
    assert start["auth_method"] == "brokered:md5" and start["presented"] == "token"
    assert start["upstream_auth"] == "md5" and start["application_name"] == "billing-worker"
    assert start["token"]["sub"] == "billing-svc" and start["token"]["jti"] == "tok-42"
    assert brokered["end_fields"]["reason"] == "idle_timeout" and brokered["end_fields"]["sqlstate"] == "57P05"
    tls = env.client.get("/v1/sessions/http-tls", headers=auditor).json()
    assert tls["start_fields"]["x_sni"] == "api.example.com" and tls["start_fields"]["x_tls_version"] == "TLSv1.3"
    assert tls["end_fields"]["bytes_out"] == 900
    # the list stays compact: no event fields in it
    assert "start_fields" not in api_sessions(env)["pg-brokered"]


def test_sessions_filter_on_the_database_role(env, recordings):
    ingest_all(env, recordings)
    assert list(api_sessions(env, user="app_rw")) == ["pg-brokered"]
    assert list(api_sessions(env, user="alice")) == ["pg-tls"]   # brokered: alice is the client's name only
    assert api_sessions(env, user="nobody") == {}
    assert list(api_sessions(env, user="app_rw", identity="billing", since="2026-05-01T02:00:00Z")) == ["pg-brokered"]


def test_how_columns_are_filled_when_start_or_end_come_in_a_later_batch(env, recordings):
    agent = SimulatedAgent("late-agent", hostname="app-2")
    env.enroll(agent)
    # a long session: its end arrives batches after its start
    sealed = seal(agent, "pg-tls", recordings["pg-tls"], T0)
    env.ingest(agent, sealed[:-1])
    assert api_sessions(env)["pg-tls"]["end_reason"] is None
    env.ingest(agent, sealed[-1:])
    assert how(api_sessions(env)["pg-tls"]) == EXPECTED_HOW["pg-tls"]
    # a session.start sealed after its session's other events (stored after them)
    recorded = recordings["pg-brokered"]
    start = [r for r in recorded if r[0] == "session.start"]
    rest = [r for r in recorded if r[0] != "session.start"]
    env.ingest(agent, seal(agent, "pg-brokered", rest, T0 + 10**9))
    assert api_sessions(env)["pg-brokered"]["auth_user"] is None
    env.ingest(agent, seal(agent, "pg-brokered", start, T0 + 10**9 - 1))
    assert how(api_sessions(env)["pg-brokered"]) == EXPECTED_HOW["pg-brokered"]


def test_long_startup_values_are_clipped_not_refused(env):
    """The workload chooses its startup parameters: one longer than the column must not make
    PostgreSQL refuse the batch (the agent would retry it forever)."""
    session = PostgresSession(identity="billing", target="db",
                              start_fields=agent_start_fields("postgres", "db", "127.0.0.5:5432", "127.0.1.3:1"))
    d = Driver(session=session)
    d.client(P.build_startup_message({"user": "u" * 300, "database": "d" * 1000}))
    d.server(AUTH_DONE)
    d._run(session.finish("client_closed"))
    agent = SimulatedAgent("long-agent")
    env.enroll(agent)
    env.ingest(agent, seal(agent, "pg-long", d.events, T0))
    stored = api_sessions(env)["pg-long"]
    assert len(stored["database"]) == 255 and stored["database"].startswith("d" * 254)
    assert len(stored["auth_user"]) == 255
    # the evidence keeps the value whole
    start = env.client.get("/v1/sessions/pg-long", headers=env.headers("auditor")).json()["start_fields"]
    assert start["database"] == "d" * 1000


# --- the CLI -------------------------------------------------------------------------------

@contextlib.contextmanager
def served(env: Env):
    """The collector app on a loopback port (uvicorn in a thread), for the `warden` CLI."""
    server = uvicorn.Server(uvicorn.Config(env.app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the collector did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


def warden(url: str, token: str, *args, monkeypatch, capsys) -> str:
    """Run `warden ARGS` in-process; its stdout (tables at a width that does not fold)."""
    console = Console(file=io.StringIO(), width=400, highlight=False, soft_wrap=False)
    monkeypatch.setattr(client_cli, "out", console)
    assert client_cli.main(["--collector", url, "--token", token, *args]) == 0
    return console.file.getvalue() + capsys.readouterr().out


def _token(env: Env) -> str:
    return env.headers("auditor")["Authorization"].split(" ", 1)[1]


def _row(output: str, label: str) -> str:
    """The text of a `sessions show` row (first column label)."""
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if len(cells) == 2 and cells[0] == label:
            return cells[1]
    raise AssertionError(f"no {label!r} row in:\n{output}")


def test_cli_sessions_show_answers_how(env, recordings, monkeypatch, capsys):
    ingest_all(env, recordings)
    uid = os.getuid()
    with served(env) as url:
        token = _token(env)
        brokered = warden(url, token, "sessions", "show", "pg-brokered", monkeypatch=monkeypatch, capsys=capsys)
        assert _row(brokered, "identity") == "billing → target db (postgres)"
        assert _row(brokered, "process").startswith(f"{procinfo.as_record(this_process())['exe']} "
                                                    f"pid={os.getpid()} user={ME} (uid {uid})")
        assert _row(brokered, "host") == "app-1 (agent how-agent)"
        assert _row(brokered, "from") == "127.0.0.1:50123 → 127.0.0.5:5432"
        assert _row(brokered, "database login") == ("role app_rw on database app (auth brokered:md5, "
                                                    "application billing-worker)")
        assert _row(brokered, "credentials") == ("brokered by Warden: the client logged in as alice with a token, "
                                                 "Warden as app_rw (md5); token sub=billing-svc "
                                                 f"iss={ISSUER} jti=tok-42")
        assert _row(brokered, "TLS") == "client no; upstream no"
        assert _row(brokered, "ended").startswith(f"idle_timeout, last SQLSTATE 57P05: {IDLE_MESSAGE} (bytes in ")
        assert _row(brokered, "activity") == (f"1 statement(s), 0 request(s), 0 denied, "
                                              f"{len(recordings['pg-brokered'])} event(s)")
        assert _row(brokered, "time").startswith("2026-05-01T02:16:00")

        tls = warden(url, token, "sessions", "show", "pg-tls", monkeypatch=monkeypatch, capsys=capsys)
        assert _row(tls, "database login") == "role alice on database app (auth md5, application t)"
        assert _row(tls, "credentials") == "the client's own (no brokered login recorded)"
        assert _row(tls, "TLS") == "client yes; upstream yes"
        assert _row(tls, "ended").startswith("client_closed, last SQLSTATE 42P01 (bytes in ")

        https = warden(url, token, "sessions", "show", "http-tls", monkeypatch=monkeypatch, capsys=capsys)
        assert _row(https, "TLS") == ("client yes (terminated by Warden, TLSv1.3, SNI api.example.com, "
                                      "ALPN http/1.1); upstream not recorded")
        assert _row(https, "from") == "127.0.1.3:40001 → 127.0.0.9:443"
        assert "database login" not in https and "credentials" not in https
        plain = warden(url, token, "sessions", "show", "http-plain", monkeypatch=monkeypatch, capsys=capsys)
        assert _row(plain, "TLS") == "client no; upstream not recorded"

        as_json = json.loads(warden(url, token, "sessions", "show", "pg-brokered", "--json",
                                    monkeypatch=monkeypatch, capsys=capsys))
        assert as_json == env.client.get("/v1/sessions/pg-brokered", headers=env.headers("auditor")).json()
        assert how(as_json) == EXPECTED_HOW["pg-brokered"] and as_json["start_fields"]["token"]["sub"] == "billing-svc"


def test_cli_sessions_list_shows_role_tls_and_end(env, recordings, monkeypatch, capsys):
    ingest_all(env, recordings)
    with served(env) as url:
        token = _token(env)
        table = warden(url, token, "sessions", "list", monkeypatch=monkeypatch, capsys=capsys)
        lines = [[c.strip() for c in line.replace("┃", "│").split("│")[1:-1]] for line in table.splitlines()
                 if line.replace("┃", "│").count("│") > 3]
        header = next(cells for cells in lines if "role@db" in cells)
        cell = {cells[0]: dict(zip(header, cells)) for cells in lines if cells[0] in ORDER}
        assert set(cell) == set(ORDER)
        assert cell["pg-brokered"]["role@db"] == "app_rw@app (brokered)"
        assert cell["pg-brokered"]["tls c/u"] == "plain/plain"
        assert cell["pg-brokered"]["end"].endswith(" idle_timeout")
        assert cell["pg-tls"]["role@db"] == "alice@app" and cell["pg-tls"]["tls c/u"] == "tls/tls"
        assert cell["http-tls"]["role@db"] == "" and cell["http-tls"]["tls c/u"] == "tls/?"
        assert cell["http-plain"]["tls c/u"] == "plain/?"

        only = json.loads(warden(url, token, "sessions", "list", "--user", "app_rw", "--json",
                                 monkeypatch=monkeypatch, capsys=capsys))
        assert [s["id"] for s in only] == ["pg-brokered"] and how(only[0]) == EXPECTED_HOW["pg-brokered"]
        by_user = warden(url, token, "sessions", "list", "--user", "alice", monkeypatch=monkeypatch, capsys=capsys)
        assert "pg-tls" in by_user and "pg-brokered" not in by_user and "1 session(s)" in by_user


# --- an existing database ------------------------------------------------------------------

# The sessions table as migrations 1-4 made it, before the "how" columns.
_old_metadata = MetaData()
OLD_SESSIONS = Table(
    "sessions", _old_metadata,
    Column("sid", String(200), primary_key=True),
    Column("agent_id", String(200), nullable=False),
    Column("host", String(255)),
    Column("identity", String(255)),
    Column("target", String(255)),
    Column("protocol", String(50)),
    Column("process", Text),
    Column("start_ns", BigInteger),
    Column("end_ns", BigInteger),
    Column("event_count", Integer, nullable=False, default=0),
    Column("statement_count", Integer, nullable=False, default=0),
    Column("request_count", Integer, nullable=False, default=0),
    Column("denied_count", Integer, nullable=False, default=0),
    Index("ix_sessions_start", "start_ns"),
    Index("ix_sessions_identity_start", "identity", "start_ns"),
    Index("ix_sessions_target_start", "target", "start_ns"),
)


def _old_database(url: str, source: Store) -> None:
    """A database at schema version 4 holding what an old collector stored: the source store's
    agents, batches, events and tables touched, and its sessions without the new columns."""
    old = Store(url)
    try:
        with old.write() as c, source.read() as s:
            schema_migrations.create(c)
            OLD_SESSIONS.create(c)
            for version, name, step in MIGRATIONS[:4]:
                step(c)      # migration 1 finds sessions there (checkfirst) and leaves it as it is
                c.execute(schema_migrations.insert().values(version=version, name=name, applied_ns=1))
            for table in (agents, batches, events, event_tables):
                rows = [dict(r._mapping) for r in s.execute(select(table))]
                if rows:
                    c.execute(insert(table), rows)
            old_columns = [sessions.c[column.name] for column in OLD_SESSIONS.c]
            c.execute(insert(OLD_SESSIONS), [dict(r._mapping) for r in s.execute(select(*old_columns))])
            if not old.is_sqlite:   # explicit ids were copied: move the sequence past them
                c.exec_driver_sql("SELECT setval(pg_get_serial_sequence('batches', 'id'), "
                                  "(SELECT max(id) FROM batches))")
        with old.read() as c:
            names = {row[0] for row in c.execute(select(OLD_SESSIONS)).fetchall()}
            assert names == set(ORDER)
    finally:
        old.dispose()


def test_an_existing_database_is_migrated_and_keeps_its_sessions(request, tmp_path, backend, recordings,
                                                                 monkeypatch, capsys):
    # what a collector of this version makes of the evidence...
    fresh = Env(CollectorConfig(state_dir=str(tmp_path / "fresh"), db=f"sqlite:///{tmp_path}/fresh.db",
                                ingest_workers=0))
    try:
        agent = ingest_all(fresh, recordings)
        expected = api_sessions(fresh)
        expected_detail = fresh.client.get("/v1/sessions/pg-brokered", headers=fresh.headers("auditor")).json()
        _old_database(url := _database_url(request, tmp_path, backend, "old"), fresh.store)
    finally:
        fresh.close()
        set_ingest_workers(None)

    # ...and an old collector's database holding the same, upgraded by `warden-collector migrate`
    config = tmp_path / "collector.yaml"
    config.write_text(f"db: {url}\nstate_dir: {tmp_path / 'state'}\n")
    assert collector_cli.main(["migrate", "--config", str(config)]) == 0
    latest = MIGRATIONS[-1][0]   # 5 and every migration after it
    assert f"schema version {latest} (applied now: {list(range(5, latest + 1))})" in capsys.readouterr().out
    store = Store(url)
    try:
        assert store.migrate() == [] and store.schema_version() == latest
        with store.read() as c:
            assert c.execute(select(func.count()).select_from(sessions)).scalar_one() == len(ORDER)
            if store.is_sqlite:
                indexes = set(c.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'index'").scalars())
            else:
                indexes = set(c.execute(text("SELECT indexname FROM pg_indexes WHERE tablename = 'sessions'"))
                              .scalars())
        assert {"ix_sessions_auth_user_start", "ix_sessions_start", "ix_sessions_identity_start"} <= indexes
    finally:
        store.dispose()

    migrated = Env(CollectorConfig(state_dir=str(tmp_path / "state"), db=url, ingest_workers=0))
    try:
        # the old rows are kept and now say how they connected and ended, exactly as if ingested today
        assert api_sessions(migrated) == expected
        assert how(api_sessions(migrated)["pg-brokered"]) == EXPECTED_HOW["pg-brokered"]
        assert list(api_sessions(migrated, user="app_rw")) == ["pg-brokered"]
        assert migrated.client.get("/v1/sessions/pg-brokered",
                                   headers=migrated.headers("auditor")).json() == expected_detail
        # the evidence is untouched and ingest goes on
        assert migrated.client.get("/v1/verify", headers=migrated.headers("auditor")).json()["ok"] is True
        migrated.ingest(agent, seal(agent, "pg-after", recordings["pg-tls"], T0 + 3600 * 10**9))
        after = api_sessions(migrated)
        assert len(after) == len(ORDER) + 1 and how(after["pg-after"]) == EXPECTED_HOW["pg-tls"]
    finally:
        migrated.close()
        set_ingest_workers(None)
