"""The sans-IO ClientHello reader: real hellos from Python's ssl, then byte-level damage."""
from __future__ import annotations

import random
import ssl
import struct

import pytest

from enforcer.http.clienttls import name_allowed
from enforcer.http.tlshello import (ClientHello, ClientHelloReader, TlsHelloError, looks_like_tls,
                                    parse_client_hello)


def captured_hello(server_name: str | None, alpn: list[str] | None = None,
                   maximum: ssl.TLSVersion | None = None) -> bytes:
    """The first flight Python's ssl sends, taken from its outgoing memory BIO."""
    context = ssl.create_default_context()
    if server_name is None:
        context.check_hostname = False
    if alpn:
        context.set_alpn_protocols(alpn)
    if maximum is not None:
        context.maximum_version = maximum
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


def vec(length_size: int, data: bytes) -> bytes:
    return len(data).to_bytes(length_size, "big") + data


def ext(ext_type: int, data: bytes) -> bytes:
    return struct.pack("!H", ext_type) + vec(2, data)


def sni_ext(*names: bytes, name_type: int = 0) -> bytes:
    return ext(0, vec(2, b"".join(bytes([name_type]) + vec(2, n) for n in names)))


def hello_body(extensions: bytes | None, session_id: bytes = b"", suites: bytes = b"\x13\x01") -> bytes:
    body = b"\x03\x03" + bytes(32) + vec(1, session_id) + vec(2, suites) + vec(1, b"\x00")
    return body if extensions is None else body + vec(2, extensions)


def records(body: bytes, split: int | None = None) -> bytes:
    """The handshake message in one record, or in two cut at `split`."""
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    pieces = [message] if split is None else [message[:split], message[split:]]
    return b"".join(b"\x16\x03\x01" + vec(2, p) for p in pieces)


def read(data: bytes, **kw) -> ClientHello | None:
    return ClientHelloReader(**kw).feed(data)


# -- real hellos ------------------------------------------------------------------------

def test_python_hello_with_sni_and_alpn():
    data = captured_hello("API.Partner.example", ["h2", "http/1.1"])
    assert looks_like_tls(data)
    hello = read(data)
    assert hello.server_name == "api.partner.example"
    assert hello.alpn_protocols == ("h2", "http/1.1")
    assert 0x0304 in hello.versions
    assert hello.record_bytes == len(data)


def test_python_hello_without_sni_and_tls12_only():
    hello = read(captured_hello(None, maximum=ssl.TLSVersion.TLSv1_2))
    assert hello.server_name is None and hello.alpn_protocols == ()
    assert 0x0304 not in hello.versions


def test_every_prefix_needs_more_and_bytewise_feeding_matches():
    data = captured_hello("api.test", ["http/1.1"])
    for cut in range(len(data)):
        assert read(data[:cut]) is None
    reader = ClientHelloReader()
    results = [reader.feed(data[i:i + 1]) for i in range(len(data))]
    assert results[:-1] == [None] * (len(data) - 1)
    assert results[-1] == read(data)


def test_hello_split_across_records_and_followed_by_more_bytes():
    body = hello_body(sni_ext(b"api.test"))
    data = records(body, split=7)
    hello = read(data + b"\x17\x03\x03\x00\x01x")     # early data after the hello is left alone
    assert hello.server_name == "api.test" and hello.record_bytes == len(data)


def test_not_a_letter_of_http():
    assert not looks_like_tls(b"GET / HTTP/1.1\r\n") and not looks_like_tls(b"")


# -- record and handshake framing ---------------------------------------------------------

@pytest.mark.parametrize("data, message", [
    (b"\x17\x03\x03\x00\x05hello", "content type 23"),
    (b"\x16\x02\x00\x00\x05hello", "record version"),
    (b"\x16\x03\x05\x00\x05hello", "record version"),
    (b"\x16\x03\x01\x00\x00", "empty handshake record"),
    (b"\x16\x03\x01\x40\x01", "exceeds 16384"),
    (b"\x16\x03\x01\xff\xff", "exceeds 16384"),
    (b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", "not a ClientHello"),
])
def test_bad_records(data, message):
    with pytest.raises(TlsHelloError, match=message):
        read(data)


def test_oversize_handshake_length_refused_before_buffering_it():
    with pytest.raises(TlsHelloError, match="exceeds 65536"):
        read(b"\x16\x03\x01\x00\x04\x01\xff\xff\xff")
    body = hello_body(sni_ext(b"a" * 60))
    with pytest.raises(TlsHelloError, match="exceeds 64"):
        read(records(body), max_hello=64)


def test_bytes_after_the_hello_inside_its_records():
    body = hello_body(None)
    message = b"\x01" + len(body).to_bytes(3, "big") + body + b"\x14\x00\x00\x00"
    with pytest.raises(TlsHelloError, match="after the ClientHello"):
        read(b"\x16\x03\x01" + vec(2, message))


# -- ClientHello body ---------------------------------------------------------------------

def test_tls12_hello_without_extensions():
    assert parse_client_hello(hello_body(None)) == ClientHello(None, (), (0x0303,), 0)


def test_multiple_host_names_refused():
    with pytest.raises(TlsHelloError, match="more than one host name"):
        parse_client_hello(hello_body(sni_ext(b"a.test", b"b.test")))


@pytest.mark.parametrize("extensions, message", [
    (sni_ext(b"a.test", name_type=1), "unknown server name type"),
    (ext(0, b""), "truncated server name list length"),
    (ext(0, vec(2, b"")), "server name list length 0"),
    (ext(0, b"\x00\x0c\x00\x00\x06a.test"), "runs past"),           # list longer than the extension
    (ext(0, vec(2, b"\x00\x00\x09a.test")), "runs past"),           # name longer than the list
    (ext(0, vec(2, b"\x00" + vec(2, b"a.test")) + b"x"), "unexpected bytes"),
    (sni_ext(b"a.test") + sni_ext(b"b.test"), "appears twice"),
    (sni_ext(b"a.test") + b"\x00\x10\xff\xff", "runs past"),        # extension length overruns
    (sni_ext(b"a.test") + b"\x00", "truncated extension type"),
    (sni_ext(b"127.0.0.1"), "IP address"),
    (sni_ext(b"api.test."), "invalid server name"),
    (sni_ext(b"a..test"), "invalid server name"),
    (sni_ext(b"a" * 64 + b".test"), "invalid server name"),
    (sni_ext((b"a" * 60 + b".") * 5 + b"test"), "longer than 253"),
    (sni_ext(b"caf\xc3\xa9.test"), "not ASCII"),
    (sni_ext(b"a test"), "invalid server name"),
    (ext(16, vec(2, b"\x00\x00")), "ALPN protocol length 0"),
    (ext(43, vec(1, b"\x03")), "out of range"),
    (ext(43, vec(1, b"\x03\x04\x03")), "odd supported versions"),
])
def test_bad_extensions(extensions, message):
    with pytest.raises(TlsHelloError, match=message):
        parse_client_hello(hello_body(extensions))


@pytest.mark.parametrize("body, message", [
    (b"\x02\x00" + bytes(34), "unknown client version"),
    (b"\x03\x03" + bytes(20), "truncated random"),
    (hello_body(None, session_id=bytes(33)), "session id length 33"),
    (hello_body(None, suites=b"\x13\x01\x13"), "odd cipher suites"),
    (hello_body(None, suites=b""), "cipher suites length 0"),
    (b"\x03\x03" + bytes(32) + b"\x00" + vec(2, b"\x13\x01") + b"\x00", "compression methods length 0"),
    (hello_body(b"") + b"\x00", "unexpected bytes after the extensions"),
    (hello_body(None) + b"\x00", "truncated extensions length"),
])
def test_bad_bodies(body, message):
    with pytest.raises(TlsHelloError, match=message):
        parse_client_hello(body)


def test_host_name_is_lower_cased_and_may_hold_underscores():
    hello = parse_client_hello(hello_body(sni_ext(b"Svc_A.Internal.EXAMPLE")))
    assert hello.server_name == "svc_a.internal.example"


def test_random_damage_never_escapes_as_another_exception():
    """Flipped, dropped and inserted bytes: a hello, a need for more, or TlsHelloError."""
    rng = random.Random(8)
    samples = [captured_hello("api.test", ["h2", "http/1.1"]), records(hello_body(sni_ext(b"x.test")), split=3)]
    outcomes = {"hello": 0, "more": 0, "error": 0}
    for _ in range(4000):
        data = bytearray(rng.choice(samples))
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(data))
            action = rng.random()
            if action < 0.6:
                data[at] = rng.randrange(256)
            elif action < 0.8:
                del data[at]
            else:
                data.insert(at, rng.randrange(256))
        try:
            result = read(bytes(data))
        except TlsHelloError:
            outcomes["error"] += 1
            continue
        outcomes["hello" if result is not None else "more"] += 1
    assert outcomes["error"] > 1000 and outcomes["hello"] > 100


def test_client_tls_names_patterns():
    assert name_allowed("api.test", ["api.test"])
    assert name_allowed("a.partner.example", ["*.partner.example"])
    assert not name_allowed("partner.example", ["*.partner.example"])
    assert not name_allowed("a.b.partner.example", ["*.partner.example"])
    assert not name_allowed("api.test.evil", ["api.test"])
