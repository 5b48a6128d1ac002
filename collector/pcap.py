"""A recorded session as a synthetic TCP capture (scapy), so Wireshark and tshark
dissect it as PostgreSQL or HTTP.

The record holds what was said, not the bytes on the wire, so the messages are
rebuilt: for Postgres a StartupMessage, then per statement Query (or Parse/Bind/Execute/
Sync for the extended protocol) and the server's CommandComplete or ErrorResponse
(no RowDescription/DataRow: row values are never recorded); for HTTP the request and
response heads with an empty body (the recorded size is in X-Warden-Body-Bytes).
Endpoints come from session.start: client (or client_addr) and orig_dst.
"""
from __future__ import annotations

import ipaddress
import struct
import zlib

MSS = 1460
PGSQL_PORTS = {5432}
HTTP_PORTS = {80, 3128, 3132, 5985, 8080, 8088, 11371, 1900, 2869, 2710}
_HOP_HEADERS = {"content-length", "transfer-encoding", "content-encoding", "connection"}
_REASONS = {200: "OK", 201: "Created", 204: "No Content", 301: "Moved Permanently", 302: "Found",
            304: "Not Modified", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 409: "Conflict", 429: "Too Many Requests", 500: "Internal Server Error",
            502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}


def _endpoint(value, default_host: str, default_port: int) -> tuple[str, int]:
    """'127.0.0.2:5432', '[::1]:5432', {'ip':..,'port':..} or a bare host."""
    if isinstance(value, dict):
        host = value.get("ip") or value.get("host") or value.get("addr") or default_host
        return str(host), int(value.get("port") or default_port)
    if not value:
        return default_host, default_port
    text = str(value)
    if text.startswith("["):
        host, _, port = text[1:].partition("]:")
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        host = default_host  # a hostname: a capture needs addresses
    return host, int(port) if port.isdigit() else default_port


class _Flow:
    """One TCP connection: handshake, data segments with consistent seq/ack, teardown."""

    def __init__(self, client: tuple[str, int], server: tuple[str, int]):
        from scapy.layers.inet import IP, TCP
        from scapy.layers.inet6 import IPv6
        self.TCP = TCP
        v6 = ":" in client[0] or ":" in server[0]
        if v6:  # both sides must share a family
            client = (client[0] if ":" in client[0] else "::1", client[1])
            server = (server[0] if ":" in server[0] else "::1", server[1])
        self.ip = IPv6 if v6 else IP
        self.client, self.server = client, server
        self.seq = {True: 1_000_000, False: 2_000_000}  # keyed by "from client"
        self.packets: list = []
        self.messages = 0

    def _packet(self, from_client: bool, flags: str, payload: bytes, ts_ns: int):
        src, dst = (self.client, self.server) if from_client else (self.server, self.client)
        ip = self.ip(src=src[0], dst=dst[0])
        segment = self.TCP(sport=src[1], dport=dst[1], flags=flags, seq=self.seq[from_client],
                           ack=self.seq[not from_client] if "A" in flags else 0, window=65535)
        packet = ip / segment / payload if payload else ip / segment
        packet.time = ts_ns / 1e9
        self.packets.append(packet)

    def open(self, ts_ns: int) -> None:
        self._packet(True, "S", b"", ts_ns)
        self.seq[True] += 1
        self._packet(False, "SA", b"", ts_ns + 1000)
        self.seq[False] += 1
        self._packet(True, "A", b"", ts_ns + 2000)

    def send(self, from_client: bool, data: bytes, ts_ns: int) -> None:
        if not data:
            return
        self.messages += 1
        for offset in range(0, len(data), MSS):
            chunk = data[offset:offset + MSS]
            self._packet(from_client, "PA", chunk, ts_ns)
            self.seq[from_client] += len(chunk)

    def close(self, ts_ns: int) -> None:
        self._packet(True, "FA", b"", ts_ns)
        self.seq[True] += 1
        self._packet(False, "FA", b"", ts_ns + 1000)
        self.seq[False] += 1
        self._packet(True, "A", b"", ts_ns + 2000)


# --- PostgreSQL frontend/backend messages ---------------------------------------

def _cstr(text) -> bytes:
    return str(text if text is not None else "").replace("\x00", "").encode() + b"\x00"


def _pg(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def pg_startup(user: str, database: str, application_name: str | None) -> bytes:
    body = struct.pack("!I", 196608) + _cstr("user") + _cstr(user) + _cstr("database") + _cstr(database)
    if application_name:
        body += _cstr("application_name") + _cstr(application_name)
    body += b"\x00"
    return struct.pack("!I", len(body) + 4) + body


def pg_auth_ok() -> bytes:
    return _pg(b"R", struct.pack("!I", 0)) + pg_ready()


def pg_ready(status: bytes = b"I") -> bytes:
    return _pg(b"Z", status)


def pg_query(text: str) -> bytes:
    return _pg(b"Q", _cstr(text))


def pg_extended(text: str, params, statement_name: str | None, portal: str | None) -> bytes:
    values = list(params.values()) if isinstance(params, dict) else list(params or [])
    bind = _cstr(portal or "") + _cstr(statement_name or "") + struct.pack("!H", 0) + struct.pack("!H", len(values))
    for value in values:
        if value is None:
            bind += struct.pack("!i", -1)
        else:
            data = str(value).encode()
            bind += struct.pack("!i", len(data)) + data
    bind += struct.pack("!H", 0)
    return (_pg(b"P", _cstr(statement_name or "") + _cstr(text) + struct.pack("!H", 0)) + _pg(b"B", bind)
            + _pg(b"E", _cstr(portal or "") + struct.pack("!I", 0)) + _pg(b"S", b""))


def pg_command_complete(tag: str) -> bytes:
    return _pg(b"C", _cstr(tag))


def pg_error(sqlstate: str, message: str) -> bytes:
    body = b"S" + _cstr("ERROR") + b"V" + _cstr("ERROR") + b"C" + _cstr(sqlstate or "XX000") + b"M" + _cstr(message)
    return _pg(b"E", body + b"\x00")


# --- HTTP heads -------------------------------------------------------------------

def _header_lines(headers, body_bytes) -> str:
    lines = ""
    items = headers.items() if isinstance(headers, dict) else (headers or [])
    for name, value in items:
        if str(name).lower() in _HOP_HEADERS:
            continue
        lines += f"{name}: {value}\r\n"
    # The body was not recorded: announce none, and say how big it was.
    lines += "Content-Length: 0\r\n"
    if body_bytes:
        lines += f"X-Warden-Body-Bytes: {body_bytes}\r\n"
    return lines


def http_request_head(f: dict) -> bytes:
    method = f.get("method") or "GET"
    path = f.get("path") or "/"
    query = f.get("query")
    target = f"{path}?{query}" if query else path
    headers = f.get("headers") or {}
    host_line = "" if any(str(n).lower() == "host" for n in (headers if isinstance(headers, dict) else dict(headers))) \
        else f"Host: {f.get('host') or 'localhost'}\r\n"
    return f"{method} {target} HTTP/1.1\r\n{host_line}{_header_lines(headers, f.get('body_bytes'))}\r\n".encode(
        "utf-8", "replace")


def http_response_head(f: dict) -> bytes:
    status = int(f.get("status") or 0) or 502
    reason = _REASONS.get(status, "Status")
    return f"HTTP/1.1 {status} {reason}\r\n{_header_lines(f.get('headers'), f.get('body_bytes'))}\r\n".encode(
        "utf-8", "replace")


# --- the session ------------------------------------------------------------------

def session_packets(session: dict, events: list[dict]) -> tuple[list, dict]:
    """Packets for one session (events as the API returns them), and a summary."""
    events = sorted(events, key=lambda e: (e["ts"], e.get("agent_id", ""), e.get("seq", 0)))
    start = next((e for e in events if e["type"] == "session.start"), None)
    start_fields = (start or {}).get("fields") or {}
    protocol = (session.get("protocol") or start_fields.get("protocol")
                or ("http" if any(e["type"].startswith("http.") for e in events) else "postgres"))
    server = _endpoint(start_fields.get("orig_dst") or start_fields.get("dst"), "127.0.0.2",
                       5432 if protocol == "postgres" else 80)
    # Without a recorded client port, derive a stable ephemeral one from the session id.
    client = _endpoint(start_fields.get("client") or start_fields.get("client_addr"), "127.0.0.1",
                       32768 + zlib.crc32(str(session.get("id") or "").encode()) % 28000)
    flow = _Flow(client, server)
    first_ts = events[0]["ts"] if events else 0
    flow.open(first_ts)
    statements = 0
    if protocol == "postgres":
        statements = _postgres(flow, start_fields, events, first_ts)
    else:
        statements = _http(flow, events)
    end_ts = events[-1]["ts"] if events else first_ts
    flow.close(end_ts + 3000)
    summary = {"protocol": protocol, "client": f"{flow.client[0]}:{flow.client[1]}",
               "server": f"{flow.server[0]}:{flow.server[1]}", "packets": len(flow.packets),
               "messages": flow.messages, "statements": statements,
               "dissector": "pgsql" if protocol == "postgres" else "http"}
    known = PGSQL_PORTS if protocol == "postgres" else HTTP_PORTS
    if flow.server[1] not in known:
        summary["decode_as"] = f"tcp.port=={flow.server[1]},{summary['dissector']}"
    return flow.packets, summary


def _postgres(flow: _Flow, start: dict, events: list[dict], first_ts: int) -> int:
    user = start.get("auth_user") or start.get("client_user") or "postgres"
    flow.send(True, pg_startup(user, start.get("database") or user, start.get("application_name")), first_ts + 3000)
    flow.send(False, pg_auth_ok(), first_ts + 4000)
    pending = None  # the statement still waiting for its result: (fields, decision)
    count = 0

    def finish_pending(ts: int) -> None:
        # A statement without a recorded result: a refusal becomes the error the client saw.
        nonlocal pending
        if pending is None:
            return
        fields, decision = pending
        if decision in ("deny", "denied"):
            flow.send(False, pg_error("42501", "statement refused by Warden policy") + pg_ready(), ts)
        pending = None

    for event in events:
        kind, f, ts = event["type"], event.get("fields") or {}, event["ts"]
        if kind == "pg.statement":
            finish_pending(ts)
            count += 1
            text = f.get("text") or ""
            if f.get("protocol") == "extended":
                flow.send(True, pg_extended(text, f.get("params"), f.get("statement_name"), f.get("portal")), ts)
            else:
                flow.send(True, pg_query(text), ts)
            pending = (f, f.get("decision"))
        elif kind == "policy.decision" and pending is not None:
            pending = (pending[0], f.get("decision") or pending[1])
        elif kind == "pg.result":
            extended = pending is not None and pending[0].get("protocol") == "extended"
            reply = _pg(b"1", b"") + _pg(b"2", b"") if extended else b""
            if f.get("sqlstate") or f.get("error"):
                reply += pg_error(f.get("sqlstate") or "XX000", f.get("error") or "error")
            else:
                reply += pg_command_complete(f.get("command_tag") or f.get("tag") or "")
            flow.send(False, reply + pg_ready(), ts)
            pending = None
        elif kind == "session.end":
            finish_pending(ts)
            flow.send(True, _pg(b"X", b""), ts)
    return count


def _http(flow: _Flow, events: list[dict]) -> int:
    count = 0
    for event in events:
        kind, f, ts = event["type"], event.get("fields") or {}, event["ts"]
        if kind == "http.request":
            count += 1
            flow.send(True, http_request_head(f), ts)
        elif kind == "http.response":
            flow.send(False, http_response_head(f), ts)
    return count


def write_session_pcap(path: str, session: dict, events: list[dict]) -> dict:
    from scapy.utils import wrpcap
    packets, summary = session_packets(session, events)
    wrpcap(path, packets)
    return summary
