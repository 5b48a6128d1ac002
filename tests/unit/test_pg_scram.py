"""SCRAM-SHA-256 client: RFC 7677's test vector, refusals, SASLprep, and logins against a real PostgreSQL 15."""
import base64
import hashlib
import hmac
import socket

import pytest

from enforcer.postgres import protocol as P
from enforcer.postgres.scram import (MECHANISM, SASLprepError, ScramClient, ScramError, prepare_password,
                                     saslprep)
from tests.pg_harness import PostgresServer, postgres_available

# RFC 7677 section 3
RFC_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
RFC_CLIENT_FINAL = (b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def rfc_client(**kw) -> ScramClient:
    return ScramClient("user", "pencil", nonce=RFC_NONCE, **kw)


def test_rfc7677_vector():
    c = rfc_client()
    assert c.client_first() == RFC_CLIENT_FIRST
    assert c.handle_server_first(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    c.verify_server_final(RFC_SERVER_FINAL)
    assert c.done


def test_wrong_server_signature_is_refused():
    c = rfc_client()
    c.client_first()
    c.handle_server_first(RFC_SERVER_FIRST)
    forged = b"v=" + base64.b64encode(b"\0" * 32)
    with pytest.raises(ScramError, match="server signature is wrong"):
        c.verify_server_final(forged)
    assert not c.done


def test_server_error_in_final_message():
    c = rfc_client()
    c.client_first()
    c.handle_server_first(RFC_SERVER_FIRST)
    with pytest.raises(ScramError, match="server refused: invalid-proof"):
        c.verify_server_final(b"e=invalid-proof")


@pytest.mark.parametrize("server_first, match", [
    (b"r=someoneelse123,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", "does not extend"),
    (b"r=rOprNGfwEbeRWgbNEkqO,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", "does not extend"),   # no server part
    (b"r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=1", "iteration count 1 outside"),
    (b"r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=50000000", "outside the accepted range"),
    (b"r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=-5", "invalid iteration count"),
    (b"r=rOprNGfwEbeRWgbNEkqOxyz,s=!!notbase64!!,i=4096", "salt is not valid base64"),
    (b"r=rOprNGfwEbeRWgbNEkqOxyz,s=,i=4096", "empty salt"),
    (b"m=ext,r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", "extension"),
    (b"s=W22ZaJ0SNY7soEsUEjb6gQ==,r=rOprNGfwEbeRWgbNEkqOxyz,i=4096", "expected r=,s=,i="),
    (b"garbage", "malformed"),
    (b"\xff\xfe", "not valid UTF-8"),
])
def test_bad_server_first_is_refused(server_first, match):
    c = rfc_client()
    c.client_first()
    with pytest.raises(ScramError, match=match):
        c.handle_server_first(server_first)


def test_steps_out_of_order():
    c = rfc_client()
    with pytest.raises(ScramError):
        c.handle_server_first(RFC_SERVER_FIRST)
    with pytest.raises(ScramError):
        c.verify_server_final(RFC_SERVER_FINAL)


def test_nonce_is_random_and_username_escaped():
    a, b = ScramClient("a=b,c", "x"), ScramClient("a=b,c", "x")
    fa, fb = a.client_first(), b.client_first()
    assert fa != fb
    assert fa.startswith(b"n,,n=a=3Db=2Cc,r=")
    nonce = fa.split(b",r=", 1)[1]
    assert len(nonce) >= 24 and b"," not in nonce


def test_salted_password_cache_gives_same_proof_and_skips_pbkdf2():
    cache: dict = {}
    first = rfc_client(cache=cache)
    first.client_first()
    assert first.handle_server_first(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    assert len(cache) == 1
    (key, value), = cache.items()
    assert b"pencil" not in repr(key).encode()        # keyed by a digest, not the password
    # a poisoned cache entry proves the second client used the cache instead of recomputing
    cache[key] = b"\x01" * 32
    second = rfc_client(cache=cache)
    second.client_first()
    assert second.handle_server_first(RFC_SERVER_FIRST) != RFC_CLIENT_FINAL
    cache[key] = value
    third = rfc_client(cache=cache)
    third.client_first()
    assert third.handle_server_first(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL


# -- SASLprep: RFC 4013 section 3 examples -------------------------------------------------
@pytest.mark.parametrize("given, expected", [
    ("I\u00adX", "IX"),          # soft hyphen mapped to nothing
    ("user", "user"),
    ("USER", "USER"),
    ("\u00aa", "a"),             # NFKC
    ("\u2168", "IX"),            # NFKC
    ("a\u00a0b", "a b"),         # non-ASCII space mapped to SPACE
    ("\u0627\u0628", "\u0627\u0628"),   # right-to-left only is fine
])
def test_saslprep_examples(given, expected):
    assert saslprep(given) == expected


@pytest.mark.parametrize("given", ["\u0007", "a\u0000b", "\u0627\u0031", "\ue000", "a\U000e0001"])
def test_saslprep_prohibited(given):
    with pytest.raises(SASLprepError):
        saslprep(given)


def test_prepare_password_falls_back_to_raw_bytes_like_postgres():
    assert prepare_password("I\u00adX") == b"IX"
    assert prepare_password("bell\u0007") == b"bell\x07"            # prohibited: raw
    assert prepare_password(b"\xff\xfelatin") == b"\xff\xfelatin"   # not UTF-8: raw


# -- against a real PostgreSQL 15 ------------------------------------------------------------
pg_only = pytest.mark.skipif(not postgres_available(), reason="PostgreSQL 15 binaries or the postgres user missing")


@pytest.fixture(scope="module")
def pg():
    if not postgres_available():
        pytest.skip("PostgreSQL 15 binaries or the postgres user missing")
    with PostgresServer() as server:
        # a password SASLprep changes: PostgreSQL stores the key of its prepared form "IX-IX"
        server.psql_local("SET password_encryption = 'scram-sha-256'; "
                          "CREATE ROLE dora LOGIN PASSWORD E'I\\u00adX-\\u2168'")
        yield server


class _Conn:
    def __init__(self, host, port):
        self.sock = socket.create_connection((host, port), timeout=10)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def message(self) -> tuple[bytes, bytes]:
        while True:
            msgs, rest = P.split_messages(self.buf)
            if msgs:
                t, body = msgs[0]
                self.buf = self.buf[5 + len(body):]
                return t, body
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed")
            self.buf += chunk

    def close(self):
        self.sock.close()


def scram_login(pg, user: str, password, client: ScramClient | None = None) -> tuple[bytes, dict]:
    """Run a SCRAM login with ScramClient; returns the final message type ('Z' logged in, 'E' refused) and fields."""
    conn = _Conn(pg.host, pg.port)
    try:
        conn.send(P.build_startup_message({"user": user, "database": "app"}))
        t, body = conn.message()
        req = P.parse_authentication(body)
        assert t == b"R" and req.code == P.AUTH_SASL and MECHANISM in req.mechanisms
        c = client or ScramClient(user, password)
        conn.send(P.build_sasl_initial_response(MECHANISM, c.client_first()))
        t, body = conn.message()
        if t == b"E":
            return t, P.parse_error_fields(body)
        req = P.parse_authentication(body)
        assert req.code == P.AUTH_SASL_CONTINUE
        conn.send(P.build_sasl_response(c.handle_server_first(req.data)))
        t, body = conn.message()
        if t == b"E":
            return t, P.parse_error_fields(body)
        req = P.parse_authentication(body)
        assert req.code == P.AUTH_SASL_FINAL
        c.verify_server_final(req.data)
        t, body = conn.message()
        assert t == b"R" and P.parse_authentication(body).code == P.AUTH_OK
        while t != b"Z":
            t, body = conn.message()
        return t, {"done": c.done}
    finally:
        conn.close()


@pg_only
def test_real_postgres_login(pg):
    t, info = scram_login(pg, "alice", "alice-pw")
    assert t == b"Z" and info["done"]


@pg_only
def test_real_postgres_wrong_password(pg):
    t, fields = scram_login(pg, "alice", "not-the-password")
    assert t == b"E" and fields["C"] == "28P01"


@pg_only
def test_real_postgres_saslprep_interop(pg):
    # the password as set, and its SASLprep'd equivalent, both log in
    assert scram_login(pg, "dora", "I\u00adX-\u2168")[0] == b"Z"
    assert scram_login(pg, "dora", "IX-IX")[0] == b"Z"
    assert scram_login(pg, "dora", "IX-I")[0] == b"E"


def test_rfc_vector_matches_definition():
    # independent recomputation of the proof from RFC 5802's formulas: guards the vector constants above
    salt = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
    salted = hashlib.pbkdf2_hmac("sha256", b"pencil", salt, 4096)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    auth = RFC_CLIENT_FIRST[3:] + b"," + RFC_SERVER_FIRST + b"," + RFC_CLIENT_FINAL.rsplit(b",p=", 1)[0]
    sig = hmac.new(hashlib.sha256(client_key).digest(), auth, hashlib.sha256).digest()
    proof = bytes(a ^ b for a, b in zip(client_key, sig))
    assert base64.b64encode(proof) == RFC_CLIENT_FINAL.rsplit(b",p=", 1)[1]
