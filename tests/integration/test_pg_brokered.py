"""Brokered Postgres credentials end to end: psql presents a service token (or any password), the agent's
broker logs in upstream to a real PostgreSQL 15 with the secret it holds, and psql never sees that secret.

The front end here is a minimal asyncio driver (startup packet -> broker -> byte relay); in the product
the same BrokeredLogin is driven from enforcer/postgres/proxy.py in front of the full session.
"""
import asyncio
import json
import os
import subprocess
import threading
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from enforcer.postgres import protocol as P
from enforcer.postgres.broker import (BrokerConfig, BrokerFailure, ConfigError, PostgresBroker, brokered_startup,
                                      is_loopback_peer)
from tests.pg_harness import PG_BIN, PostgresServer, postgres_available

pytestmark = [pytest.mark.postgres,
              pytest.mark.skipif(not postgres_available(), reason="PostgreSQL 15 binaries or the postgres user missing")]

ISS = "https://issuer.test"
AUD = "customers-db"
PSQL = os.path.join(PG_BIN, "psql")


@pytest.fixture(scope="module")
def pg():
    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="module")
def signing_key():
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def jwks(tmp_path, signing_key):
    jwk = jwt.algorithms.ECAlgorithm.to_jwk(signing_key.public_key(), as_dict=True)
    jwk["kid"] = "k1"
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk]}))
    return str(path)


def make_token(key, **over) -> str:
    now = int(time.time())
    c = {"iss": ISS, "aud": AUD, "sub": "etl-job", "iat": now - 5, "exp": now + 300}
    c.update(over)
    return jwt.encode(c, key, algorithm="ES256", headers={"kid": "k1"})


def secret_file(tmp_path, value: str, mode: int = 0o600, name: str = "secret") -> str:
    path = tmp_path / name
    path.write_text(value + "\n")
    os.chmod(path, mode)
    return str(path)


def credentials(user: str, password_file: str, jwks: str, accept: str = "token") -> dict:
    c = {"mode": "brokered", "user": user, "password_file": password_file, "accept": accept}
    if accept == "token":
        c["token"] = {"issuer": ISS, "audience": AUD, "jwks": jwks}
    return c


class _TapWriter:
    """Client writer that keeps a copy of every byte sent to the client."""

    def __init__(self, writer, tap: bytearray):
        self._w = writer
        self._tap = tap

    def write(self, data):
        self._tap += data
        self._w.write(data)

    async def drain(self):
        await self._w.drain()

    def get_extra_info(self, name, default=None):
        return self._w.get_extra_info(name, default)


class BrokerFront:
    """A loopback listener running brokered logins then relaying bytes, on its own loop in a thread."""

    def __init__(self, broker: PostgresBroker, upstream: tuple[str, int]):
        self.broker = broker
        self.upstream = upstream
        self.to_client = bytearray()
        self.outcomes: list = []          # ("ok", record_fields) | ("refused", BrokerFailure)
        self.upstream_opens = 0
        self.port = None
        self.loop = None
        self._server = None
        self._thread = None

    async def _read_startup(self, reader, writer):
        while True:
            head = await reader.readexactly(4)
            length = int.from_bytes(head, "big")
            pkt = P.parse_startup_packet(head + await reader.readexactly(length - 4))
            if pkt.kind in ("ssl", "gssenc"):
                writer.write(b"N")         # no TLS on this test front: loopback is what makes cleartext OK
                continue
            return pkt

    async def _open_upstream(self):
        self.upstream_opens += 1
        return await asyncio.open_connection(*self.upstream)

    async def _handle(self, reader, raw_writer):
        writer = _TapWriter(raw_writer, self.to_client)
        upstream_writer = None
        try:
            pkt = await self._read_startup(reader, raw_writer)     # the 1-byte TLS answer stays out of the tap
            login = self.broker.login(pkt.params, client_secure=is_loopback_peer(writer.get_extra_info("peername")))
            try:
                ureader, upstream_writer, server_bytes = await brokered_startup(
                    login, reader, writer, self._open_upstream, timeout=10)
            except BrokerFailure as failure:
                self.outcomes.append(("refused", failure))
                return
            self.outcomes.append(("ok", login.record_fields()))
            writer.write(server_bytes)

            async def pump(src, dst):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()

            done, pending = await asyncio.wait([asyncio.create_task(pump(reader, upstream_writer)),
                                                asyncio.create_task(pump(ureader, writer))],
                                               return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if upstream_writer is not None:
                upstream_writer.close()
            raw_writer.close()

    def __enter__(self):
        ready = threading.Event()

        async def main():
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            async with self._server:
                await self._server.serve_forever()

        def run():
            self.loop = asyncio.new_event_loop()
            try:
                self.loop.run_until_complete(main())
            except BaseException:
                pass
            finally:
                self.loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert ready.wait(10)
        return self

    def __exit__(self, *exc):
        def stop():
            for task in asyncio.all_tasks(self.loop):
                task.cancel()
        self.loop.call_soon_threadsafe(stop)
        self._thread.join(10)

    def psql(self, password: str, sql: str = "SELECT current_user", user: str = "workload"):
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PGPASSWORD": password, "PGCONNECT_TIMEOUT": "10",
               "PGSSLMODE": "prefer"}
        return self.run_client([PSQL, "-h", "127.0.0.1", "-p", str(self.port), "-U", user, "-d", "app",
                                "-w", "-qAt", "-v", "ON_ERROR_STOP=1", "-c", sql], env)

    def run_client(self, argv, env):
        """Run a client (one connection); return once the front has recorded that connection's outcome."""
        before = len(self.outcomes)
        r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
        deadline = time.monotonic() + 5
        while len(self.outcomes) <= before and time.monotonic() < deadline:
            time.sleep(0.01)
        return r


def test_token_login_runs_as_brokered_user(pg, tmp_path, jwks, signing_key):
    broker = PostgresBroker.from_credentials(credentials("alice", secret_file(tmp_path, "alice-pw"), jwks), "customers")
    with BrokerFront(broker, (pg.host, pg.port)) as front:
        r = front.psql(make_token(signing_key, sub="etl-job", team="data"),
                       "SELECT current_user, current_database()")
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "alice|app"
        kind, fields = front.outcomes[-1]
        assert kind == "ok"
        assert fields["brokered_user"] == "alice" and fields["client_user"] == "workload"
        assert fields["presented"] == "token" and fields["upstream_auth"] == "scram-sha-256"
        assert fields["token"]["sub"] == "etl-job" and fields["token"]["iss"] == ISS
        # a second login reuses the cached SCRAM key and still works
        assert front.psql(make_token(signing_key)).stdout.strip() == "alice"
        assert b"alice-pw" not in bytes(front.to_client)


def test_expired_token_gets_28p01_and_never_reaches_upstream(pg, tmp_path, jwks, signing_key):
    broker = PostgresBroker.from_credentials(credentials("alice", secret_file(tmp_path, "alice-pw"), jwks), "customers")
    with BrokerFront(broker, (pg.host, pg.port)) as front:
        r = front.psql(make_token(signing_key, exp=int(time.time()) - 3600))
        assert r.returncode != 0
        assert "invalid service token: token expired" in r.stderr
        kind, failure = front.outcomes[-1]
        assert kind == "refused" and failure.sqlstate == "28P01" and failure.reason == "token_refused:expired"
        assert front.upstream_opens == 0
        errors = [P.parse_error_fields(body) for t, body in P.split_messages(bytes(front.to_client))[0] if t == b"E"]
        assert errors and errors[-1]["C"] == "28P01" and errors[-1]["S"] == "FATAL"

        # a token from the wrong issuer and a plain password are refused the same way
        r = front.psql(make_token(signing_key, iss="https://evil.test"))
        assert "invalid service token: wrong issuer" in r.stderr
        r = front.psql("alice-pw")
        assert r.returncode != 0 and "invalid service token: malformed token" in r.stderr
        assert front.upstream_opens == 0
        assert b"alice-pw" not in bytes(front.to_client)


def test_accept_any_password_md5_upstream(pg, tmp_path):
    broker = PostgresBroker.from_credentials(credentials("bob", secret_file(tmp_path, "bob-pw"), "", "any"), "t")
    with BrokerFront(broker, (pg.host, pg.port)) as front:
        for pw in ("whatever", "x"):
            r = front.psql(pw)
            assert r.returncode == 0, r.stderr
            assert r.stdout.strip() == "bob"
        kind, fields = front.outcomes[-1]
        assert fields["presented"] == "password" and fields["upstream_auth"] == "md5" and "token" not in fields
        assert b"bob-pw" not in bytes(front.to_client)


def test_wrong_secret_then_rotated_secret(pg, tmp_path, jwks, signing_key):
    path = secret_file(tmp_path, "stale-password")
    broker = PostgresBroker.from_credentials(credentials("alice", path, jwks), "customers")
    with BrokerFront(broker, (pg.host, pg.port)) as front:
        r = front.psql(make_token(signing_key))
        assert r.returncode != 0
        assert "brokered login to target customers as 'alice' failed: password authentication failed" in r.stderr
        assert front.outcomes[-1][1].sqlstate == "28P01"
        # the secret file is re-read when it changes: no restart needed
        secret_file(tmp_path, "alice-pw")
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))
        r = front.psql(make_token(signing_key))
        assert r.returncode == 0, r.stderr
        assert b"stale-password" not in bytes(front.to_client) and b"alice-pw" not in bytes(front.to_client)


def test_secret_readable_by_others_is_refused(pg, tmp_path, jwks, signing_key):
    path = secret_file(tmp_path, "alice-pw", mode=0o644)
    broker = PostgresBroker.from_credentials(credentials("alice", path, jwks), "customers")
    assert any("chmod 600" in p for p in broker.check())
    with BrokerFront(broker, (pg.host, pg.port)) as front:
        r = front.psql(make_token(signing_key))
        assert r.returncode != 0 and f"chmod 600 {path}" in r.stderr
        assert b"alice-pw" not in bytes(front.to_client)


def test_role_switch_in_startup_options_refused(pg, tmp_path, jwks, signing_key):
    broker = PostgresBroker.from_credentials(credentials("alice", secret_file(tmp_path, "alice-pw"), jwks), "customers")
    with BrokerFront(broker, (pg.host, pg.port)) as front:
        env_opts = {"PGOPTIONS": "-c role=postgres"}
        r = front.run_client([PSQL, "-h", "127.0.0.1", "-p", str(front.port), "-U", "w", "-d", "app", "-w", "-qAt",
                              "-c", "SELECT current_user"],
                             {"PATH": os.environ.get("PATH", ""), "PGPASSWORD": make_token(signing_key), **env_opts})
        assert r.returncode != 0 and "role/session_authorization is not allowed" in r.stderr
        assert front.upstream_opens == 0


def test_config_validation(tmp_path):
    assert BrokerConfig.from_credentials({}, "t") is None
    assert BrokerConfig.from_credentials({"mode": "passthrough"}, "t") is None
    with pytest.raises(ConfigError, match="token"):
        BrokerConfig.from_credentials({"mode": "brokered", "user": "u", "password_file": "/etc/x"}, "t")
    with pytest.raises(ConfigError, match="password_file"):
        BrokerConfig.from_credentials({"mode": "brokered", "user": "u", "password_file": "rel", "accept": "any"}, "t")
    with pytest.raises(ConfigError, match="accept"):
        BrokerConfig.from_credentials({"mode": "brokered", "user": "u", "password_file": "/x", "accept": "some"}, "t")
    with pytest.raises(ConfigError, match="unknown keys"):
        BrokerConfig.from_credentials({"mode": "brokered", "user": "u", "password_file": "/x", "accept": "any",
                                       "pasword_file": "/y"}, "t")
    cfg = BrokerConfig.from_credentials(credentials("u", "/x", "/j.json"), "t")
    assert cfg.accept == "token" and cfg.token.jwks == "/j.json" and cfg.token.leeway_s == 30


def test_trust_upstream(pg, tmp_path):
    broker = PostgresBroker.from_credentials(credentials("carol", secret_file(tmp_path, "unused"), "", "any"), "t")
    with BrokerFront(broker, (pg.host, pg.port)) as front:
        r = front.psql("anything")
        assert r.returncode == 0 and r.stdout.strip() == "carol", r.stderr
        assert front.outcomes[-1][1]["upstream_auth"] == "trust"


# -- the sans-IO state machine fed with bytes (no server needed) ----------------------------------
def _login(tmp_path, accept="any", client_secure=True, params=None):
    broker = PostgresBroker.from_credentials(
        credentials("app_rw", secret_file(tmp_path, "s3cret"), "", accept), "customers")
    return broker.login(params or {"user": "w", "database": "app", "application_name": "etl"},
                        client_secure=client_secure)


def _through_client(login):
    assert login.begin() == P.build_authentication_cleartext()
    login.check_password(login.feed_client(P.build_password("pw")))


def test_sansio_refuses_insecure_client_leg(tmp_path):
    with pytest.raises(BrokerFailure) as e:
        _login(tmp_path, client_secure=False).begin()
    assert e.value.sqlstate == "28000" and "sslmode=require" in e.value.message


def test_sansio_client_messages(tmp_path):
    login = _login(tmp_path)
    login.begin()
    msg = P.build_password("pw")
    assert login.feed_client(msg[:3]) is None                  # partial: needs more bytes
    assert login.feed_client(msg[3:]) == b"pw"
    other = _login(tmp_path)
    other.begin()
    with pytest.raises(BrokerFailure, match="expected a password message"):
        other.feed_client(P.build_query("SELECT 1"))
    third = _login(tmp_path)
    third.begin()
    with pytest.raises(BrokerFailure, match="unexpected data after the password"):
        third.feed_client(P.build_password("pw") + P.build_query("SELECT 1"))


def test_sansio_upstream_startup_and_leftover(tmp_path):
    login = _login(tmp_path)
    _through_client(login)
    startup = P.parse_startup_packet(login.upstream_startup())
    assert startup.params == {"user": "app_rw", "database": "app", "application_name": "etl"}
    answer = login.feed_server(P.build_authentication_md5(b"salt"))
    assert P.split_messages(answer)[0][0][0] == b"p" and b"s3cret" not in answer
    tail = P.build_parameter_status("server_version", "15") + P.build_ready_for_query("I")
    assert login.feed_server(P.build_authentication_ok() + tail[:7]) == b""
    assert login.done and login.server_bytes == P.build_authentication_ok() + tail[:7]


def test_sansio_server_must_finish_scram(tmp_path):
    login = _login(tmp_path)
    _through_client(login)
    login.upstream_startup()
    first = login.feed_server(P.build_authentication_sasl(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]))
    mech, data = P.parse_sasl_initial_response(P.split_messages(first)[0][0][1])
    nonce = data.split(b",r=")[1].decode()
    login.feed_server(P.build_authentication_sasl_continue(
        f"r={nonce}server,s=c2FsdHNhbHQ=,i=4096".encode()))
    with pytest.raises(BrokerFailure, match="skipped the SCRAM final verification"):
        login.feed_server(P.build_authentication_ok())          # a server that never proved it knows the secret


def test_sansio_unsupported_upstream_method(tmp_path):
    login = _login(tmp_path)
    _through_client(login)
    login.upstream_startup()
    with pytest.raises(BrokerFailure, match="gss authentication"):
        login.feed_server(P.build_authentication(P.AUTH_GSS))
