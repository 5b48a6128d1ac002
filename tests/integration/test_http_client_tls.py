"""Workloads that speak HTTPS to a governed host: target option client_tls.

Real clients (curl, httpx, Python's ssl) talk TLS to serve_http on 127.0.0.1; the upstream is
the TLS uvicorn of test_http_proxy on 127.0.0.3, whose certificate (api.test) comes from a test
CA. `intercept` presents leaves from an agent LocalCA in a temp dir (clients trust its ca.crt);
`sni` relays the client's TLS untouched, so clients verify the upstream's own certificate.
Host names resolve to loopback with curl --resolve, or by connecting to 127.0.0.1 with an
explicit SNI (httpx's sni_hostname extension, ssl's server_hostname).
"""
from __future__ import annotations

import json
import socket
import ssl

import httpx
import pytest

from enforcer.context import UpstreamTLS
from enforcer.policy.engine import PolicyEngine
from enforcer.tls import LocalCA
from tests.integration import test_http_proxy
from tests.integration.test_http_proxy import _CardMasker, Enforcer, _curl
from tests.waiting import wait_for

tls_upstream = test_http_proxy.tls_upstream      # the module-scoped fixture: uvicorn with TLS on 127.0.0.3


@pytest.fixture(scope="module")
def enforcer():
    e = Enforcer()
    yield e
    e.close()


@pytest.fixture(scope="module")
def local_ca(tmp_path_factory):
    return LocalCA.load_or_create(str(tmp_path_factory.mktemp("agent-ca")), common_name="warden test agent CA")


def _intercept(enforcer, tls_upstream, local_ca, server_name=None, policy=None, masking=None, **options):
    port, ca_file = tls_upstream
    enforcer.configure(port, host="127.0.0.3", tls=UpstreamTLS("verify-full", ca_file, server_name),
                       options={"client_tls": "intercept", **options}, extra={"local_ca": local_ca},
                       policy=policy, masking=masking)


def _resolve(enforcer, name="api.test") -> str:
    return f"{name}:{enforcer.port}:127.0.0.1"


def _session_end(enforcer) -> dict:
    """session.end of the latest session (sessions are numbered sess1, sess2, ... by the harness)."""
    sid = f"sess{enforcer.sessions}"
    assert wait_for(lambda: enforcer.sink.of_session("session.end", sid), timeout=10)
    return enforcer.sink.of_session("session.end", sid)[0]


def _client_context(cafile: str, alpn=None, check_hostname=True) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=cafile)
    context.check_hostname = check_hostname
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


def _raw_get(sock, host: str) -> bytes:
    sock.sendall(f"GET /echo HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


# -- intercept ---------------------------------------------------------------------------

def test_intercept_curl_trusting_the_agent_ca(tls_upstream, enforcer, local_ca):
    _intercept(enforcer, tls_upstream, local_ca)
    base = f"https://api.test:{enforcer.port}"
    done = _curl("--cacert", local_ca.cert_path, "--resolve", _resolve(enforcer),
                 f"{base}/echo?a=1", "--next", "--cacert", local_ca.cert_path, "--resolve", _resolve(enforcer),
                 "--data-binary", "hello", f"{base}/echo")
    assert done.returncode == 0, done.stderr
    first, second = [json.loads(line) for line in done.stdout.replace(b"}{", b"}\n{").splitlines()]
    assert first["method"] == "GET" and first["query"] == "a=1"
    assert first["headers"]["host"] == f"api.test:{enforcer.port}"
    assert second["method"] == "POST" and second["body_len"] == 5
    end = _session_end(enforcer)
    assert end["requests"] == 2 and end["reason"] in ("client_closed", "closed")
    start = enforcer.sink.of("session.start")[0]
    assert start["tls_client"] is True and start["x_client_tls"] == "intercept" and start["x_sni"] == "api.test"
    assert start["x_tls_alpn"] == "http/1.1" and start["x_tls_version"] in ("TLSv1.2", "TLSv1.3")
    assert "h2" in start["x_tls_alpn_offered"]           # curl offered h2; only HTTP/1.1 is chosen
    requests = enforcer.sink.of("http.request")
    assert [(r["method"], r["scheme"], r["host"]) for r in requests] == [("GET", "https", "api.test"),
                                                                       ("POST", "https", "api.test")]


def test_intercept_curl_without_the_agent_ca_fails_verification(tls_upstream, enforcer, local_ca):
    port, ca_file = tls_upstream
    _intercept(enforcer, tls_upstream, local_ca)
    done = _curl("--cacert", ca_file, "--resolve", _resolve(enforcer), f"https://api.test:{enforcer.port}/echo")
    assert done.returncode == 60, done.stderr        # the upstream's CA does not vouch for Warden's leaf
    assert _session_end(enforcer)["reason"] == "tls_handshake_failed"


POLICY = """
@id("billing-read")
permit(principal == Service::"billing", action in Action::"http:read", resource in Target::"api");

@id("no-deletes")
forbid(principal, action == Action::"http:DELETE", resource);
"""


def test_intercept_httpx_with_policy_masking_and_brokered_credentials(tls_upstream, enforcer, local_ca,
                                                                       tmp_path):
    secret = tmp_path / "token"
    secret.write_text("upstream-secret\n")
    _intercept(enforcer, tls_upstream, local_ca, policy=PolicyEngine.from_text(POLICY), masking=_CardMasker(),
               credentials={"header": "Authorization", "scheme": "Bearer", "value_file": str(secret)})
    sni = {"sni_hostname": "api.test"}
    with httpx.Client(base_url=f"https://127.0.0.1:{enforcer.port}", headers={"Host": "api.test"},
                      verify=_client_context(local_ca.cert_path)) as client:
        echo = client.get("/echo", headers={"Authorization": "Bearer guess"}, extensions=sni)
        masked = client.get("/json", extensions=sni)
        denied = client.delete("/echo/1", extensions=sni)
    assert echo.status_code == 200 and echo.json()["headers"]["authorization"] == "Bearer upstream-secret"
    assert masked.json() == {"id": 7, "card": "****", "name": "Ada"}
    assert denied.status_code == 403 and denied.json()["policy"] == ["no-deletes"]
    assert _session_end(enforcer)["requests"] == 3                 # one TLS connection, kept alive
    assert [d["decision"] for d in enforcer.sink.of("http.request")] == ["allow", "allow", "deny"]
    assert enforcer.sink.of("http.request")[0]["headers"]["authorization"] == "[redacted]"
    assert "upstream-secret" not in json.dumps(enforcer.sink.events)


def test_intercept_without_sni_uses_the_target_name(tls_upstream, enforcer, local_ca):
    _intercept(enforcer, tls_upstream, local_ca, server_name="api.test")
    context = _client_context(local_ca.cert_path, check_hostname=False)
    with socket.create_connection(("127.0.0.1", enforcer.port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=None) as sock:     # no SNI at all
            names = [v for k, v in sock.getpeercert()["subjectAltName"] if k == "DNS"]
            answer = _raw_get(sock, "api.test")
    assert names == ["api.test"]
    assert answer.startswith(b"HTTP/1.1 200") and b'"method": "GET"' in answer
    assert enforcer.sink.of("session.start")[0]["x_sni"] is None
    # the same from the client_tls_hostname option when the target names no server
    _intercept(enforcer, tls_upstream, local_ca, client_tls_hostname="api.test")
    with socket.create_connection(("127.0.0.1", enforcer.port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=None) as sock:
            assert _raw_get(sock, "api.test").startswith(b"HTTP/1.1 200")
    # and, as the agent configures an http target (no server name: each request's Host names the
    # upstream), from the first exact name the target is about
    _intercept(enforcer, tls_upstream, local_ca, client_tls_names=["*.api.test", "api.test", "other.test"])
    with socket.create_connection(("127.0.0.1", enforcer.port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=None) as sock:
            assert [v for k, v in sock.getpeercert()["subjectAltName"] if k == "DNS"] == ["api.test"]
            assert _raw_get(sock, "api.test").startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("offered, selected", [(["h2", "http/1.1"], "http/1.1"), (["h2"], None), (None, None)])
def test_intercept_alpn_only_ever_selects_http11(tls_upstream, enforcer, local_ca, offered, selected):
    _intercept(enforcer, tls_upstream, local_ca)
    context = _client_context(local_ca.cert_path, alpn=offered)
    with socket.create_connection(("127.0.0.1", enforcer.port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="api.test") as sock:
            assert sock.selected_alpn_protocol() == selected
            assert _raw_get(sock, "api.test").startswith(b"HTTP/1.1 200")


def test_intercept_refuses_a_client_that_picks_another_alpn(tls_upstream, enforcer, local_ca):
    _intercept(enforcer, tls_upstream, local_ca)
    context = _client_context(local_ca.cert_path, alpn=["postgresql"])
    with socket.create_connection(("127.0.0.1", enforcer.port), timeout=10) as raw:
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            with context.wrap_socket(raw, server_hostname="api.test") as sock:
                _raw_get(sock, "api.test")
                raise ConnectionError("closed without an answer")
    end = _session_end(enforcer)
    assert end["reason"] == "tls_handshake_failed" and "postgresql" in end["error"]


def test_intercept_host_must_match_sni(tls_upstream, enforcer, local_ca):
    _intercept(enforcer, tls_upstream, local_ca)
    done = _curl("-i", "--cacert", local_ca.cert_path, "--resolve", _resolve(enforcer), "-H", "Host: other.test",
                 f"https://api.test:{enforcer.port}/echo")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(b"HTTP/1.1 421") and b"misdirected_request" in done.stdout


def test_intercept_only_for_listed_names(tls_upstream, enforcer, local_ca):
    _intercept(enforcer, tls_upstream, local_ca, client_tls_names=["*.partner.example"])
    done = _curl("--cacert", local_ca.cert_path, "--resolve", _resolve(enforcer),
                 f"https://api.test:{enforcer.port}/echo")
    assert done.returncode != 0
    end = _session_end(enforcer)
    assert end["reason"] == "client_tls_refused" and "client_tls_names" in end["error"]
    assert enforcer.sink.of("http.request")[0]["host"] == "api.test"


# -- sni -----------------------------------------------------------------------------------

SNI_POLICY = """
@id("billing-tls-api")
permit(principal == Service::"billing", action == Action::"http:CONNECT", resource in Endpoint::"api/api.test/");
"""


def test_sni_mode_decides_by_name_and_relays_the_tls_stream(tls_upstream, enforcer):
    port, ca_file = tls_upstream
    enforcer.configure(port, host="127.0.0.3", options={"client_tls": "sni"},
                       policy=PolicyEngine.from_text(SNI_POLICY))
    # end-to-end TLS: the client verifies the upstream's own certificate, with the upstream's CA
    done = _curl("--cacert", ca_file, "--resolve", _resolve(enforcer), f"https://api.test:{enforcer.port}/echo?x=1")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["query"] == "x=1"
    end = _session_end(enforcer)
    assert end["reason"] == "closed" and end["requests"] == 1
    assert end["bytes_in"] > 500 and end["bytes_out"] > 500
    assert [end["x_tunnel_bytes_up"], end["x_tunnel_bytes_down"]] == [end["bytes_in"], end["bytes_out"]]
    request = enforcer.sink.of("http.request")[0]
    assert request["method"] == "TLS" and request["host"] == "api.test" and request["x_sni"] == "api.test"
    decision = enforcer.sink.of("policy.decision")[0]
    assert decision["decision"] == "allow" and decision["action"] == "http:CONNECT"
    assert decision["policy_ids"] == ["billing-tls-api"]
    assert enforcer.sink.of("session.start")[0]["x_client_tls"] == "sni"


def test_an_sni_tunnel_cut_by_an_agent_stop_is_recorded_as_such(tls_upstream, enforcer):
    """A relayed TLS stream has no idle point the enforcer can see: when the agent's stop ends
    it (its drain ran out), the session says agent_stopping, not just "cancelled"."""
    import asyncio
    port, ca_file = tls_upstream
    stopping = asyncio.Event()
    enforcer.configure(port, host="127.0.0.3", options={"client_tls": "sni"},
                       policy=PolicyEngine.from_text(SNI_POLICY), extra={"agent_stopping": stopping})
    raw = socket.create_connection(("127.0.0.1", enforcer.port), timeout=10)
    with _client_context(ca_file).wrap_socket(raw, server_hostname="api.test") as tls:
        tls.sendall(b"GET /echo HTTP/1.1\r\nHost: api.test\r\n\r\n")
        assert tls.recv(65536).startswith(b"HTTP/1.1 200")         # the tunnel is up

        async def stop_and_cancel():
            stopping.set()
            for task in asyncio.all_tasks():
                if task.get_coro().__qualname__ == "Enforcer._handle":
                    task.cancel()
        asyncio.run_coroutine_threadsafe(stop_and_cancel(), enforcer.loop).result(5)
        end = _session_end(enforcer)
    assert end["reason"] == "agent_stopping" and end["x_tunnel_bytes_down"] > 0


def test_sni_mode_with_httpx_and_a_denied_name(tls_upstream, enforcer):
    port, ca_file = tls_upstream
    enforcer.configure(port, host="127.0.0.3", options={"client_tls": "sni"},
                       policy=PolicyEngine.from_text(SNI_POLICY))
    with httpx.Client(verify=_client_context(ca_file)) as client:
        answer = client.get(f"https://127.0.0.1:{enforcer.port}/echo", headers={"Host": "api.test"},
                            extensions={"sni_hostname": "api.test"})
    assert answer.status_code == 200 and answer.json()["path"] == "/echo"
    assert _session_end(enforcer)["reason"] == "closed"
    enforcer.configure(port, host="127.0.0.3", options={"client_tls": "sni"},
                       policy=PolicyEngine.from_text(SNI_POLICY))
    denied = _curl("-k", "--resolve", _resolve(enforcer, "other.test"), f"https://other.test:{enforcer.port}/echo")
    assert denied.returncode != 0
    end = _session_end(enforcer)
    assert end["reason"] == "denied" and end["bytes_out"] == 0 and "other.test" in end["error"]
    assert enforcer.sink.of("policy.decision")[0]["decision"] == "deny"


# -- refuse (the default) and malformed hellos -------------------------------------------

def test_tls_is_refused_by_default_without_an_answer(tls_upstream, enforcer):
    port, _ = tls_upstream
    enforcer.configure(port, host="127.0.0.3")
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname="api.partner.example")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    with socket.create_connection(("127.0.0.1", enforcer.port), timeout=10) as sock:
        sock.sendall(outgoing.read())
        assert sock.recv(4096) == b""
    end = _session_end(enforcer)
    assert end["reason"] == "client_tls_refused" and "api.partner.example" in end["error"]
    assert "client_tls: refuse" in end["error"]
    assert enforcer.sink.of("http.request")[0]["method"] == "TLS"


@pytest.mark.parametrize("data, reason", [
    (b"\x16\x03\x01\x40\x01", "client_tls_malformed"),
    (b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00", "client_tls_malformed"),
    (b"\x16\x03\x01\x00\x10\x01\x00\x00", "client_tls_malformed"),     # the client gives up mid-hello
])
def test_malformed_hello_is_closed(tls_upstream, enforcer, local_ca, data, reason):
    _intercept(enforcer, tls_upstream, local_ca)
    with socket.create_connection(("127.0.0.1", enforcer.port), timeout=10) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(4096) == b""
    end = _session_end(enforcer)
    assert end["reason"] == reason and "ClientHello" in end["error"]


def test_plain_http_still_served_next_to_intercept(tls_upstream, enforcer, local_ca):
    _intercept(enforcer, tls_upstream, local_ca)
    done = _curl(f"http://127.0.0.1:{enforcer.port}/echo", "-H", "Host: api.test")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["method"] == "GET"
