"""serve_http between real clients (curl, httpx, raw sockets) and a real server (uvicorn).

The upstream is this module's ASGI app under uvicorn in a subprocess on 127.0.0.2 (and with
TLS on 127.0.0.3); the enforcer runs serve_http on a loopback listener in a thread, with a
ConnectionContext built here (no BPF: the agent adds that path).
"""
from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from enforcer.context import ConnectionContext, TargetInfo, UpstreamTLS
from enforcer.http.proxy import serve_http
from enforcer.masking import MaskingRefused

ROOT = Path(__file__).resolve().parents[2]
CARD = "4111 1111 1111 1111"

# -- the upstream app ----------------------------------------------------------------------

_seen_paths: list[str] = []


async def app(scope, receive, send):
    """echo, json, gzip-json, big (streamed), seen (paths this process served)."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    path = scope["path"]
    _seen_paths.append(f"{scope['method']} {path}")
    body = bytearray()
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break

    async def reply(status, payload: bytes, content_type=b"application/json", extra=()):
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", content_type), (b"content-length", str(len(payload)).encode()),
                                *extra]})
        await send({"type": "http.response.body", "body": payload})

    if path == "/big":
        size = int(dict(p.split("=") for p in scope["query_string"].decode().split("&"))["n"])
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/octet-stream")]})
        block = bytes(range(256)) * 256
        sent = 0
        while sent < size:
            piece = block[: min(len(block), size - sent)]
            sent += len(piece)
            await send({"type": "http.response.body", "body": piece, "more_body": sent < size})
        return
    if path == "/json":
        await reply(200, json.dumps({"id": 7, "card": CARD, "name": "Ada"}).encode())
        return
    if path == "/gzip-json":
        await reply(200, gzip.compress(json.dumps({"card": CARD}).encode()),
                    extra=[(b"content-encoding", b"gzip")])
        return
    if path == "/seen":
        await reply(200, json.dumps(_seen_paths).encode())
        return
    headers = {}
    for name, value in scope["headers"]:
        headers.setdefault(name.decode("latin-1"), value.decode("latin-1"))
    await reply(200, json.dumps({"method": scope["method"], "path": path,
                                 "query": scope["query_string"].decode(), "headers": headers,
                                 "body_len": len(body), "body_sha256": hashlib.sha256(body).hexdigest(),
                                 "http_version": scope["http_version"]}).encode())


# -- harness ---------------------------------------------------------------------------------

def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _wait_port(host: str, port: int, proc: subprocess.Popen, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"uvicorn exited with {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"uvicorn did not listen on {host}:{port}")


def _uvicorn(host: str, port: int, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "tests.integration.test_http_proxy:app",
                             "--host", host, "--port", str(port), "--log-level", "warning",
                             "--http", "h11", *extra], cwd=ROOT)
    try:
        _wait_port(host, port, proc)
    except Exception:
        proc.kill()
        proc.wait()
        raise
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def upstream():
    port = _free_port("127.0.0.2")
    proc = _uvicorn("127.0.0.2", port)
    yield port
    _stop(proc)


@pytest.fixture(scope="module")
def tls_upstream(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    subprocess.run(["openssl", "req", "-x509", *ec, "-keyout", d / "ca.key", "-out", d / "ca.pem",
                    "-subj", "/CN=warden-test-ca", "-days", "1"], check=True, capture_output=True)
    subprocess.run(["openssl", "req", *ec, "-keyout", d / "srv.key", "-out", d / "srv.csr",
                    "-subj", "/CN=api.test"], check=True, capture_output=True)
    (d / "ext.cnf").write_text("subjectAltName=DNS:api.test\n")
    subprocess.run(["openssl", "x509", "-req", "-in", d / "srv.csr", "-CA", d / "ca.pem", "-CAkey", d / "ca.key",
                    "-CAcreateserial", "-out", d / "srv.pem", "-days", "1", "-extfile", d / "ext.cnf"],
                   check=True, capture_output=True)
    port = _free_port("127.0.0.3")
    proc = _uvicorn("127.0.0.3", port, "--ssl-keyfile", str(d / "srv.key"), "--ssl-certfile", str(d / "srv.pem"))
    yield port, str(d / "ca.pem")
    _stop(proc)


class Sink:
    def __init__(self):
        self.events: list[tuple[str, dict]] = []
        self.session_of: list = []
        self.lock = threading.Lock()

    def emit(self, event_type, fields, session_id=None):
        with self.lock:
            self.events.append((event_type, dict(fields)))
            self.session_of.append(session_id)

    def clear(self):
        with self.lock:
            self.events.clear()
            self.session_of.clear()

    def of_session(self, event_type, session_id):
        """Events of one session only: a previous test's session may still be ending."""
        with self.lock:
            return [f for (t, f), sid in zip(self.events, self.session_of) if t == event_type and sid == session_id]

    def of(self, event_type):
        with self.lock:
            return [f for t, f in self.events if t == event_type]


class Enforcer:
    """serve_http on 127.0.0.1:<port> in a thread; `configure` sets what each new connection gets."""

    def __init__(self):
        self.sink = Sink()
        self.settings: dict = {}
        self.loop = asyncio.new_event_loop()
        self.sessions = 0
        started = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            self.server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
            self.port = self.server.sockets[0].getsockname()[1]
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        started.wait(5)

    def configure(self, port: int, host: str = "127.0.0.2", **settings) -> None:
        self.sink.clear()
        self.settings = dict(settings, port=port, host=host)

    async def _handle(self, reader, writer):
        s = self.settings
        self.sessions += 1
        target = TargetInfo("api", "http", s["host"], s["port"], tls=s.get("tls", UpstreamTLS()),
                            options=s.get("options", {}))
        ctx = ConnectionContext(f"sess{self.sessions}", s.get("identity", "billing"), {}, target, None,
                                self.sink, policy=s.get("policy"), masking=s.get("masking"),
                                approvals=s.get("approvals"), extra=dict(s.get("extra", {})))
        await serve_http(reader, writer, ctx)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self):
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def enforcer():
    e = Enforcer()
    yield e
    e.close()


def _curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "20", *args], capture_output=True, timeout=30)


def _wait_for(predicate, timeout=3.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# -- tests -----------------------------------------------------------------------------------

def test_httpx_methods_and_keep_alive_reuse(upstream, enforcer):
    enforcer.configure(upstream)
    with httpx.Client(base_url=enforcer.url, headers={"Host": "api"}) as client:
        results = [client.get("/echo?a=1"), client.post("/echo", content=b"x" * 1000),
                   client.put("/echo", json={"k": "v"}), client.delete("/echo/7")]
    assert [r.status_code for r in results] == [200, 200, 200, 200]
    assert [r.json()["method"] for r in results] == ["GET", "POST", "PUT", "DELETE"]
    assert results[1].json()["body_len"] == 1000
    assert results[0].json()["query"] == "a=1"
    assert _wait_for(lambda: enforcer.sink.of("session.end"))
    assert len(enforcer.sink.of("session.start")) == 1          # one connection, reused
    requests = enforcer.sink.of("http.request")
    assert [r["method"] for r in requests] == ["GET", "POST", "PUT", "DELETE"]
    assert [r["request_index"] for r in requests] == [1, 2, 3, 4]
    assert enforcer.sink.of("session.end")[0]["requests"] == 4


def test_curl_chunked_upload_and_expect_continue(upstream, enforcer, tmp_path):
    enforcer.configure(upstream)
    payload = os.urandom(3 * 1024 * 1024)
    (tmp_path / "up.bin").write_bytes(payload)
    done = _curl("-H", "Transfer-Encoding: chunked", "-H", "Expect: 100-continue",
                 "--data-binary", f"@{tmp_path / 'up.bin'}", f"{enforcer.url}/echo")
    assert done.returncode == 0, done.stderr
    echo = json.loads(done.stdout)
    assert echo["body_len"] == len(payload)
    assert echo["body_sha256"] == hashlib.sha256(payload).hexdigest()
    assert echo["headers"].get("transfer-encoding") == "chunked"


def test_curl_large_streamed_download(upstream, enforcer, tmp_path):
    enforcer.configure(upstream)
    size = 40 * 1024 * 1024
    out = tmp_path / "big"
    done = _curl("-o", str(out), f"{enforcer.url}/big?n={size}")
    assert done.returncode == 0, done.stderr
    assert out.stat().st_size == size
    expected = hashlib.sha256((bytes(range(256)) * 256 * (size // 65536 + 1))[:size]).hexdigest()
    assert hashlib.sha256(out.read_bytes()).hexdigest() == expected
    assert _wait_for(lambda: enforcer.sink.of("http.response"))
    assert enforcer.sink.of("http.response")[0]["body_bytes"] == size


def test_raw_pipelining_and_http10(upstream, enforcer):
    enforcer.configure(upstream)
    with socket.create_connection(("127.0.0.1", enforcer.port), timeout=10) as sock:
        sock.sendall(b"GET /echo?n=1 HTTP/1.1\r\nHost: api\r\n\r\n"
                     b"POST /echo?n=2 HTTP/1.1\r\nHost: api\r\nContent-Length: 3\r\n\r\nabc"
                     b"HEAD /json HTTP/1.1\r\nHost: api\r\n\r\n"
                     b"GET /echo?n=4 HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    parts = data.split(b"HTTP/1.1 200 OK\r\n")[1:]
    assert len(parts) == 4
    assert b'"query": "n=1"' in parts[0] and b'"query": "n=2"' in parts[1] and b'"body_len": 3' in parts[1]
    assert parts[2].endswith(b"\r\n\r\n") and b"content-length" in parts[2].lower()     # HEAD: no body
    assert b'"query": "n=4"' in parts[3] and b"connection: close" in parts[3].lower()


POLICY = """
@id("billing-read")
permit(principal == Service::"billing", action in Action::"http:read", resource in Target::"api");

@id("billing-write-echo")
permit(principal == Service::"billing", action == Action::"http:POST", resource in Endpoint::"api/api/echo");

@id("no-deletes")
forbid(principal, action == Action::"http:DELETE", resource);
"""


def test_policy_allows_and_denies_by_method_and_path(upstream, enforcer):
    from enforcer.policy.engine import PolicyEngine
    enforcer.configure(upstream, policy=PolicyEngine.from_text(POLICY))
    with httpx.Client(base_url=enforcer.url, headers={"Host": "api"}) as client:
        allowed = client.get("/echo")
        posted = client.post("/echo", content=b"ok")
        denied = client.delete("/echo/1")
        not_permitted = client.post("/other", content=b"no")
        after = client.get("/seen")
    assert allowed.status_code == 200 and posted.status_code == 200
    assert denied.status_code == 403 and not_permitted.status_code == 403
    body = denied.json()
    assert body["identity"] == "billing" and body["action"] == "http:DELETE"
    assert body["policy"] == ["no-deletes"] and body["request_id"].endswith("-3")
    assert not_permitted.json()["policy"] == []
    seen = after.json()
    assert "DELETE /echo/1" not in seen and "POST /other" not in seen
    # each request's record carries its decision
    decisions = enforcer.sink.of("http.request")
    assert [d["decision"] for d in decisions] == ["allow", "allow", "deny", "deny", "allow"]
    assert decisions[2]["policy_ids"] == ["no-deletes"] and decisions[2]["request_index"] == 3
    assert decisions[2]["action"] == "http:DELETE" and decisions[2]["reason"]
    assert enforcer.sink.of("policy.decision") == []


def test_brokered_credentials_reach_the_server_not_the_record(upstream, enforcer, tmp_path):
    secret = tmp_path / "api-token"
    secret.write_text("real-secret-1\n")
    enforcer.configure(upstream, options={"credentials": {"header": "Authorization", "scheme": "Bearer",
                                                          "value_file": str(secret)}})
    with httpx.Client(base_url=enforcer.url, headers={"Host": "api"}) as client:
        forged = client.get("/echo", headers={"Authorization": "Bearer workload-guess"}).json()
        bare = client.get("/echo").json()
    assert forged["headers"]["authorization"] == "Bearer real-secret-1"
    assert bare["headers"]["authorization"] == "Bearer real-secret-1"
    assert enforcer.sink.of("http.request")[0]["headers"]["authorization"] == "[redacted]"
    assert "real-secret" not in json.dumps(enforcer.sink.events)


class _CardMasker:
    """Stands in for enforcer.masking: the shell calls mask_json_body(body, content_type)."""

    def mask_json_body(self, body: bytes, content_type: str):
        document = json.loads(body)
        masked = 0
        if "card" in document:
            document["card"] = "****"
            masked = 1
        return json.dumps(document).encode(), {"card": masked}


def test_masking_hook_rewrites_json_bodies_including_gzip(upstream, enforcer):
    enforcer.configure(upstream, masking=_CardMasker())
    with httpx.Client(base_url=enforcer.url, headers={"Host": "api"}) as client:
        plain = client.get("/json")
        zipped = client.get("/gzip-json", headers={"Accept-Encoding": "gzip"})
    assert plain.json() == {"id": 7, "card": "****", "name": "Ada"}
    assert int(plain.headers["content-length"]) == len(plain.content)
    assert zipped.json() == {"card": "****"} and "content-encoding" not in zipped.headers
    applied = enforcer.sink.of("mask.applied")
    assert [a["request_index"] for a in applied] == [1, 2] and applied[0]["values_masked"] == 1


class _Refusing:
    """The real masking layer, fed a document too deep for it whatever the upstream sent."""

    def __init__(self, masker):
        self.masker = masker

    def mask_json_body(self, body: bytes, content_type: str):
        return self.masker.mask_json_body(b"[" * 5000 + body + b"]" * 5000, content_type)


def test_a_response_too_deep_to_mask_is_refused_not_sent_raw(upstream, enforcer):
    from enforcer.masking import load_masking
    masker = load_masking({"rules": [{"json_key": "card", "strategy": "partial"}]}).for_session("svc", {}, "api")
    too_deep = b"[" * 5000 + b'{"card": "4111 1111 1111 1111"}' + b"]" * 5000
    with pytest.raises(MaskingRefused, match="nests too deeply"):
        masker.mask_json_body(too_deep, "application/json")
    enforcer.configure(upstream, masking=_Refusing(masker))
    with httpx.Client(base_url=enforcer.url, headers={"Host": "api"}) as client:
        refused = client.get("/json")
    assert refused.status_code == 502
    assert "card" not in refused.text and "nests too deeply" in refused.text


def test_tls_upstream_verified_with_ca_and_sni(tls_upstream, enforcer):
    port, ca_file = tls_upstream
    enforcer.configure(port, host="127.0.0.3", tls=UpstreamTLS("verify-full", ca_file, "api.test"))
    done = _curl(f"{enforcer.url}/echo", "-H", "Host: api.test")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["method"] == "GET"
    assert enforcer.sink.of("http.request")[0]["scheme"] == "https"
    # a wrong server name fails verification: the client gets a 502 naming the cause
    enforcer.configure(port, host="127.0.0.3", tls=UpstreamTLS("verify-full", ca_file, "other.test"))
    failed = _curl("-i", f"{enforcer.url}/echo", "-H", "Host: api.test")
    assert failed.stdout.startswith(b"HTTP/1.1 502") and b"CERTIFICATE_VERIFY_FAILED" in failed.stdout


def test_websocket_upgrade_is_relayed_as_a_tunnel(enforcer):
    async def upgrade_server(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: x\r\n\r\n")
        while data := await reader.read(1024):
            writer.write(b"echo:" + data)
            await writer.drain()
        writer.close()

    server = asyncio.run_coroutine_threadsafe(asyncio.start_server(upgrade_server, "127.0.0.2", 0),
                                              enforcer.loop).result(5)
    enforcer.configure(server.sockets[0].getsockname()[1])
    with socket.create_connection(("127.0.0.1", enforcer.port), timeout=10) as sock:
        sock.sendall(b"GET /ws HTTP/1.1\r\nHost: api\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                     b"Sec-WebSocket-Key: k\r\nSec-WebSocket-Version: 13\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(4096)
        assert head.startswith(b"HTTP/1.1 101") and b"upgrade: websocket" in head.lower()
        sock.sendall(b"frame-1")
        got = head.split(b"\r\n\r\n", 1)[1]
        while len(got) < len(b"echo:frame-1"):
            got += sock.recv(4096)
        assert got == b"echo:frame-1"
    assert _wait_for(lambda: enforcer.sink.of("session.end"))
    end = enforcer.sink.of("session.end")[0]
    assert end["x_tunnel_bytes_up"] == 7 and end["x_tunnel_bytes_down"] == 12
    enforcer.loop.call_soon_threadsafe(server.close)


def test_connect_refused_unless_allowed(upstream, enforcer):
    enforcer.configure(upstream)
    with socket.create_connection(("127.0.0.1", enforcer.port), timeout=10) as sock:
        sock.sendall(b"CONNECT api:443 HTTP/1.1\r\nHost: api:443\r\n\r\n")
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 405") and b"allow_connect" in answer


class _CountingPolicy:
    """A policy that changes its answers when its version moves, as PolicyStore on a reload."""

    def __init__(self, engine):
        self.engine = engine
        self.version = 1
        self.calls = []

    def decide_http(self, identity, attrs, target, method, host, path, headers=None, approved=False):
        self.calls.append((method, path))
        return self.engine.decide_http(identity, attrs, target, method, host, path, headers, approved)


def test_a_session_remembers_decisions_until_the_policy_version_changes(upstream, enforcer):
    from enforcer.policy.engine import PolicyEngine
    policy = _CountingPolicy(PolicyEngine.from_text(POLICY))
    enforcer.configure(upstream, policy=policy)
    with httpx.Client(base_url=enforcer.url, headers={"Host": "api"}) as client:
        codes = [client.get("/echo").status_code for _ in range(3)]
        codes += [client.delete("/echo/1").status_code for _ in range(2)]
        assert policy.calls == [("GET", "/echo"), ("DELETE", "/echo/1")]     # one each per session
        policy.engine = PolicyEngine.from_text(POLICY.replace("http:read", "http:POST"))
        policy.version = 2           # a reload: what was remembered is stale
        codes.append(client.get("/echo").status_code)
    assert codes == [200, 200, 200, 403, 403, 403]
    assert [d["decision"] for d in enforcer.sink.of("http.request")] == ["allow"] * 3 + ["deny"] * 3
    assert enforcer.sink.of("http.request")[3]["policy_ids"] == ["no-deletes"]
