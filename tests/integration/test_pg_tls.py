"""TLS on both legs through serve_postgres, against a real PostgreSQL 15 with ssl=on.

The server certificate is signed by a test CA; the enforcer presents leaves from the agent's
LocalCA (a second CA). Clients: psycopg (libpq) with sslmode disable | prefer | require | verify-full.
"""
import os
import pwd
import shutil
import tempfile
import time

import pytest

from enforcer.context import UpstreamTLS
from enforcer.tls import LocalCA
from tests.pg_harness import EnforcerThread, PostgresServer, postgres_available

pytestmark = [pytest.mark.postgres,
              pytest.mark.skipif(not postgres_available(), reason="PostgreSQL 15 binaries or the postgres user missing")]

psycopg = pytest.importorskip("psycopg")


@pytest.fixture(scope="module")
def cas():
    base = tempfile.mkdtemp(prefix="warden-tls-")
    try:
        yield {"test": LocalCA.load_or_create(os.path.join(base, "test-ca"), "Warden test upstream CA"),
               "agent": LocalCA.load_or_create(os.path.join(base, "agent"), "Warden test agent CA"),
               "base": base}
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def pg(cas):
    server = PostgresServer()
    # the server key must belong to the server's OS user and be 0600, in a directory it can enter
    certdir = os.path.join(cas["base"], "server")
    os.makedirs(certdir)
    os.chmod(cas["base"], 0o755)
    os.chmod(certdir, 0o755)
    chain, key = cas["test"].issue(["db.test"], [server.host])
    cert_path, key_path = os.path.join(certdir, "server.crt"), os.path.join(certdir, "server.key")
    with open(cert_path, "wb") as f:
        f.write(chain)
    with open(key_path, "wb") as f:
        f.write(key)
    os.chmod(key_path, 0o600)
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(key_path, pw.pw_uid, pw.pw_gid)
    server.ssl_cert, server.ssl_key = cert_path, key_path
    with server:
        yield server


def enforcer_for(pg, cas, tls, server_ssl=True):
    ctx = cas["agent"].server_context_for(["db.test"], ["127.0.0.1"]) if server_ssl else None
    return EnforcerThread((pg.host, pg.port), tls=tls, server_ssl_context=ctx)


@pytest.fixture(scope="module")
def verified(pg, cas):
    with enforcer_for(pg, cas, UpstreamTLS("verify-full", cas["test"].cert_path)) as enf:
        yield enf


def upstream_ssl(conn) -> bool:
    return conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()[0]


def last_start(enf):
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        starts = enf.sink.of_type("session.start")
        if starts:
            return starts[-1]
        time.sleep(0.02)
    raise AssertionError("no session.start")


@pytest.mark.parametrize("sslmode,client_tls", [("disable", False), ("prefer", True), ("require", True)])
def test_client_sslmodes_with_verified_upstream(verified, pg, sslmode, client_tls):
    with psycopg.connect(verified.dsn(pg, user="bob", sslmode=sslmode), autocommit=True) as conn:
        assert upstream_ssl(conn) is True
        assert bool(conn.pgconn.ssl_in_use) is client_tls
        start = last_start(verified)
        assert (start["tls_client"], start["tls_upstream"]) == (client_tls, True)
        # which protocol and cipher protected each leg, as negotiated
        upstream = start["tls"]["upstream"]
        assert upstream["version"] == conn.execute(
            "SELECT version FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()[0]
        assert upstream["cipher"] and (upstream["mode"], upstream["server_name"]) == ("verify-full", pg.host)
        if client_tls:
            assert start["tls"]["client"]["version"] in ("TLSv1.2", "TLSv1.3") and start["tls"]["client"]["cipher"]
        else:
            assert "client" not in start["tls"]


def test_client_verify_full_against_the_agent_ca(verified, pg, cas):
    dsn = verified.dsn(pg, user="bob", sslmode="verify-full", sslrootcert=cas["agent"].cert_path)
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.pgconn.ssl_in_use
    # the test CA did not sign the enforcer's leaf: a verifying client refuses it
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        psycopg.connect(verified.dsn(pg, user="bob", sslmode="verify-full", sslrootcert=cas["test"].cert_path))


def test_client_verify_full_fails_when_the_san_does_not_match(pg, cas):
    ctx = cas["agent"].server_context_for(["other.test"], ["127.0.0.9"])
    with EnforcerThread((pg.host, pg.port), tls=UpstreamTLS("require"), server_ssl_context=ctx) as enf:
        with pytest.raises(psycopg.OperationalError, match="does not match|certificate"):
            psycopg.connect(enf.dsn(pg, user="bob", sslmode="verify-full", sslrootcert=cas["agent"].cert_path))
        with psycopg.connect(enf.dsn(pg, user="bob", sslmode="verify-ca", sslrootcert=cas["agent"].cert_path)) as conn:
            assert upstream_ssl(conn) is True


def test_upstream_with_a_wrong_ca_fails_naming_the_ca_file(pg, cas):
    wrong = cas["agent"].cert_path
    with enforcer_for(pg, cas, UpstreamTLS("verify-full", wrong), server_ssl=False) as enf:
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(enf.dsn(pg, sslmode="disable"))
    message = str(info.value)
    assert f"could not verify the TLS certificate of upstream testdb ({pg.host}) against CA file {wrong}" in message
    assert "tls.ca_file" in message


def test_upstream_ca_file_missing_is_named(pg, cas):
    missing = os.path.join(cas["base"], "no-such-bundle.pem")
    with enforcer_for(pg, cas, UpstreamTLS("verify-full", missing), server_ssl=False) as enf:
        with pytest.raises(psycopg.OperationalError, match="no-such-bundle.pem"):
            psycopg.connect(enf.dsn(pg, sslmode="disable"))


def test_upstream_verify_full_checks_the_hostname(pg, cas):
    tls = UpstreamTLS("verify-full", cas["test"].cert_path, server_name="wrong.test")
    with enforcer_for(pg, cas, tls, server_ssl=False) as enf:
        with pytest.raises(psycopg.OperationalError, match="wrong.test"):
            psycopg.connect(enf.dsn(pg, sslmode="disable"))
    ok = UpstreamTLS("verify-full", cas["test"].cert_path, server_name="db.test")
    with enforcer_for(pg, cas, ok, server_ssl=False) as enf:
        with psycopg.connect(enf.dsn(pg, sslmode="disable")) as conn:
            assert upstream_ssl(conn) is True


def test_client_tls_refused_when_the_target_offers_none(pg, cas):
    with enforcer_for(pg, cas, UpstreamTLS("require"), server_ssl=False) as enf:
        with pytest.raises(psycopg.OperationalError, match="SSL"):
            psycopg.connect(enf.dsn(pg, user="bob", sslmode="require"))
        with psycopg.connect(enf.dsn(pg, user="bob", sslmode="prefer")) as conn:
            assert not conn.pgconn.ssl_in_use and upstream_ssl(conn) is True


def test_scram_through_client_tls_needs_channel_binding_disabled(verified, pg):
    """SCRAM pass-through over TLS on both legs: libpq's default (channel_binding=prefer) sends the
    'y' flag once the server's -PLUS mechanism is hidden; Warden names the fix."""
    with pytest.raises(psycopg.OperationalError, match="channel_binding=disable"):
        psycopg.connect(verified.dsn(pg, sslmode="require"))
    with psycopg.connect(verified.dsn(pg, sslmode="require", channel_binding="disable")) as conn:
        assert conn.pgconn.ssl_in_use and upstream_ssl(conn) is True
    with psycopg.connect(verified.dsn(pg, sslmode="disable")) as conn:      # plain client leg: flag 'n'
        assert upstream_ssl(conn) is True
