"""PostgreSQL frontend/backend protocol v3: framing, parsers and builders. Pure functions, no I/O.

Reference: PostgreSQL documentation, "Frontend/Backend Protocol" — "Message Formats".
A regular message is: 1 type byte, int32 length (counting itself, not the type byte), body.
Startup-phase packets (StartupMessage, SSLRequest, GSSENCRequest, CancelRequest) have no
type byte: int32 length, int32 code, body.

Parsers take the message *body* (after type byte and length) and return plain values or
small dataclasses; builders return complete wire messages as bytes.
"""
from __future__ import annotations

import dataclasses
import datetime
import struct
import uuid
from typing import Iterable, Optional, Sequence

# -- startup-phase codes ---------------------------------------------------------------
PROTOCOL_3_0 = 3 << 16          # 196608
PROTOCOL_3_2 = (3 << 16) | 2    # 196610
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102
TLS_HANDSHAKE_BYTE = 0x16       # first byte of a TLS record: PG17 "direct SSL" (sslnegotiation=direct)

# -- authentication request codes (backend 'R') -----------------------------------------
AUTH_OK = 0
AUTH_KERBEROS_V5 = 2
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_GSS = 7
AUTH_GSS_CONTINUE = 8
AUTH_SSPI = 9
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

AUTH_METHOD_NAMES = {
    AUTH_OK: "trust", AUTH_KERBEROS_V5: "kerberos", AUTH_CLEARTEXT: "password", AUTH_MD5: "md5",
    AUTH_GSS: "gss", AUTH_SSPI: "sspi", AUTH_SASL: "scram-sha-256",
}

_I32 = struct.Struct("!i")
_I16 = struct.Struct("!h")
_HEADER = struct.Struct("!ci")
_U32 = struct.Struct("!I")


class ProtocolError(Exception):
    """Malformed message: the connection gets ErrorResponse 08P01 and is closed."""


# ======================================================================================
# framing
# ======================================================================================
def message_length_at(buf: bytes, pos: int) -> Optional[int]:
    """Total length (type byte included) of the typed message at pos, or None if the header is incomplete."""
    if len(buf) - pos < 5:
        return None
    length = _I32.unpack_from(buf, pos + 1)[0]
    if length < 4:
        raise ProtocolError(f"invalid message length {length}")
    return length + 1


def split_messages(buf: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Split a buffer into complete (type, body) pairs plus the incomplete remainder (for tests and tools)."""
    out = []
    pos = 0
    while True:
        total = message_length_at(buf, pos)
        if total is None or len(buf) - pos < total:
            return out, buf[pos:]
        out.append((buf[pos:pos + 1], bytes(buf[pos + 5:pos + total])))
        pos += total


def _msg(type_byte: bytes, body: bytes) -> bytes:
    return type_byte + _I32.pack(len(body) + 4) + body


def _cstr(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    if b"\0" in b:
        raise ValueError("string contains NUL")
    return b + b"\0"


class _Reader:
    """Cursor over a message body; every read checks bounds so malformed input raises ProtocolError."""

    __slots__ = ("buf", "pos", "end")

    def __init__(self, buf: bytes, pos: int = 0, end: Optional[int] = None):
        self.buf = buf
        self.pos = pos
        self.end = len(buf) if end is None else end

    def int32(self) -> int:
        if self.pos + 4 > self.end:
            raise ProtocolError("message truncated (int32)")
        v = _I32.unpack_from(self.buf, self.pos)[0]
        self.pos += 4
        return v

    def uint32(self) -> int:
        if self.pos + 4 > self.end:
            raise ProtocolError("message truncated (uint32)")
        v = _U32.unpack_from(self.buf, self.pos)[0]
        self.pos += 4
        return v

    def int16(self) -> int:
        if self.pos + 2 > self.end:
            raise ProtocolError("message truncated (int16)")
        v = _I16.unpack_from(self.buf, self.pos)[0]
        self.pos += 2
        return v

    def byte(self) -> bytes:
        if self.pos + 1 > self.end:
            raise ProtocolError("message truncated (byte)")
        v = self.buf[self.pos:self.pos + 1]
        self.pos += 1
        return bytes(v)

    def bytes(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise ProtocolError("message truncated (bytes)")
        v = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return v

    def cstr(self) -> str:
        i = self.buf.find(b"\0", self.pos, self.end)
        if i < 0:
            raise ProtocolError("unterminated string")
        v = bytes(self.buf[self.pos:i]).decode("utf-8", "replace")
        self.pos = i + 1
        return v

    def rest(self) -> bytes:
        v = bytes(self.buf[self.pos:self.end])
        self.pos = self.end
        return v

    def done(self) -> None:
        if self.pos != self.end:
            raise ProtocolError("trailing bytes in message")


# ======================================================================================
# frontend (client -> server)
# ======================================================================================
@dataclasses.dataclass
class StartupPacket:
    kind: str                                  # startup | ssl | gssenc | cancel
    version: int = 0
    params: dict = dataclasses.field(default_factory=dict)
    cancel_pid: int = 0
    cancel_key: bytes = b""

    @property
    def major(self) -> int:
        return self.version >> 16

    @property
    def minor(self) -> int:
        return self.version & 0xFFFF


def parse_startup_packet(packet: bytes) -> StartupPacket:
    """packet: the whole untyped packet, length word included."""
    r = _Reader(packet)
    length = r.int32()
    if length != len(packet):
        raise ProtocolError("startup packet length mismatch")
    code = r.int32()
    if code == SSL_REQUEST_CODE:
        r.done()
        return StartupPacket("ssl", code)
    if code == GSSENC_REQUEST_CODE:
        r.done()
        return StartupPacket("gssenc", code)
    if code == CANCEL_REQUEST_CODE:
        pid = r.int32()
        key = r.rest()               # 4 bytes in 3.0; up to 256 bytes in 3.2
        if not 4 <= len(key) <= 256:
            raise ProtocolError("invalid cancel key length")
        return StartupPacket("cancel", code, cancel_pid=pid, cancel_key=key)
    params: dict[str, str] = {}
    while True:
        name = r.cstr()
        if name == "":
            break
        params[name] = r.cstr()
    r.done()
    return StartupPacket("startup", code, params=params)


def build_startup_message(params: dict, version: int = PROTOCOL_3_0) -> bytes:
    body = _I32.pack(version) + b"".join(_cstr(k) + _cstr(v) for k, v in params.items()) + b"\0"
    return _I32.pack(len(body) + 4) + body


# the C library's isspace() in the "C" locale: what the server splits `options` on
_OPTION_SPACE = frozenset(" \t\n\v\f\r")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def setting_name(name: str) -> str:
    """A run-time parameter's name as the server compares it (guc_name_compare: ASCII case-insensitive)."""
    return name.translate(_ASCII_LOWER)


def split_startup_options(options: str) -> list[str]:
    """The `options` startup parameter split into words as the server does (pg_split_opts): words
    are separated by whitespace, and a backslash takes the next character literally (`\\ ` is a
    space inside a word, `\\\\` a backslash, `r\\ole` is `role`).

    Raises ProtocolError for any character outside printable ASCII and its whitespace: which of
    them separate words depends on the server's locale, so a string holding one cannot be read
    the way the server will read it."""
    for ch in options:
        if not (" " <= ch <= "~" or ch in _OPTION_SPACE):
            raise ProtocolError(f"character {ch!r} in the options string (only printable ASCII is accepted)")
    words: list[str] = []
    i, n = 0, len(options)
    while i < n:
        while i < n and options[i] in _OPTION_SPACE:
            i += 1
        if i >= n:
            break
        word: list[str] = []
        escaped = False
        while i < n:
            ch = options[i]
            if ch in _OPTION_SPACE and not escaped:
                break
            if not escaped and ch == "\\":
                escaped = True
            else:
                escaped = False
                word.append(ch)
            i += 1
        words.append("".join(word))
    return words


def startup_option_settings(options: str) -> list[tuple[str, str]]:
    """The run-time settings an `options` startup parameter makes, as the server reads them
    (pg_split_opts, then process_postgres_switches' getopt): `-c name=value`, `-cname=value` and
    `--name=value`, in order; names as the server looks them up (ParseLongOption turns '-' into
    '_'; ASCII case-insensitive). Raises ProtocolError for anything else: another switch (the
    server has many, e.g. -e, -P, -B), a word that is no switch, a setting without '='."""
    words = split_startup_options(options)
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if word.startswith("--") and len(word) > 2:
            arg = word[2:]
        elif word.startswith("-c"):
            if len(word) > 2:
                arg = word[2:]
            elif i < len(words):
                arg = words[i]
                i += 1
            else:
                raise ProtocolError("-c without a setting at the end of the options string")
        elif word.startswith("-") and len(word) > 1:
            raise ProtocolError(f"switch {word[:2]!r} in the options string (only -c name=value and "
                                "--name=value are accepted)")
        else:
            raise ProtocolError(f"{word!r} in the options string is not a -c name=value or --name=value setting")
        name, eq, value = arg.partition("=")
        if not eq or not name:
            raise ProtocolError(f"{arg!r} in the options string is not a name=value setting")
        out.append((setting_name(name.replace("-", "_")), value))
    return out


def build_ssl_request() -> bytes:
    return _I32.pack(8) + _I32.pack(SSL_REQUEST_CODE)


def build_gssenc_request() -> bytes:
    return _I32.pack(8) + _I32.pack(GSSENC_REQUEST_CODE)


def build_cancel_request(pid: int, key: bytes) -> bytes:
    return _I32.pack(12 + len(key)) + _I32.pack(CANCEL_REQUEST_CODE) + _I32.pack(pid) + key


def parse_query(body: bytes) -> str:
    """Query, CommandComplete, CopyFail: one NUL-terminated string filling the body (hot path: no cursor)."""
    if body[-1:] != b"\0" or body.find(b"\0") != len(body) - 1:
        raise ProtocolError("malformed string message")
    return bytes(body[:-1]).decode("utf-8", "replace")


def build_query(sql: str) -> bytes:
    return _msg(b"Q", _cstr(sql))


@dataclasses.dataclass
class ParseMessage:
    name: str
    query: str
    param_types: list[int]


def parse_parse(body: bytes) -> ParseMessage:
    r = _Reader(body)
    name = r.cstr()
    query = r.cstr()
    n = r.int16()
    if n < 0:
        raise ProtocolError("negative parameter count")
    types = [r.uint32() for _ in range(n)]
    r.done()
    return ParseMessage(name, query, types)


def build_parse(name: str, query: str, param_types: Sequence[int] = ()) -> bytes:
    return _msg(b"P", _cstr(name) + _cstr(query) + _I16.pack(len(param_types))
                + b"".join(_U32.pack(t) for t in param_types))


@dataclasses.dataclass
class BindMessage:
    portal: str
    statement: str
    param_formats: list[int]
    params: list[Optional[bytes]]
    result_formats: list[int]


def parse_bind(body: bytes) -> BindMessage:
    body = bytes(body)
    try:
        return BindMessage(*parse_bind_at(body, 0, len(body)))
    except ProtocolError:
        raise bind_error(body) from None


def bind_error(body: bytes) -> ProtocolError:
    """What is wrong with a Bind body that parse_bind_at rejected (slow path, for the error message only)."""
    r = _Reader(body)
    try:
        r.cstr()
        r.cstr()
        nf = r.int16()
        if nf < 0:
            return ProtocolError("negative format count")
        for _ in range(nf):
            r.int16()
        np_ = r.int16()
        if np_ < 0:
            return ProtocolError("negative parameter count")
        for _ in range(np_):
            ln = r.int32()
            if ln != -1:
                r.bytes(ln)
        nr = r.int16()
        if nr < 0:
            return ProtocolError("negative result format count")
        for _ in range(nr):
            r.int16()
        r.done()
    except ProtocolError as e:
        return e
    return ProtocolError("malformed Bind")


_H = _I16.unpack_from
_L = _I32.unpack_from


def parse_bind_at(buf: bytes, start: int, end: int) -> tuple:
    """Bind body at buf[start:end] -> (portal, statement, param_formats, params, result_formats),
    read in place (hot path: one Bind per execution, no body copy, no cursor object).
    Raises ProtocolError (without detail; parse_bind says what is wrong) on malformed input."""
    try:
        i = buf.index(0, start, end)
        j = buf.index(0, i + 1, end)
        pos = j + 1
        nf = _H(buf, pos)[0]
        pos += 2
        if nf == 0:
            fmts = []
        elif nf > 0:
            fmts = list(struct.unpack_from(f"!{nf}h", buf, pos))
            pos += 2 * nf
        else:
            raise ProtocolError("negative format count")
        np_ = _H(buf, pos)[0]
        pos += 2
        if np_ < 0:
            raise ProtocolError("negative parameter count")
        params: list[Optional[bytes]] = []
        append = params.append
        for _ in range(np_):
            ln = _L(buf, pos)[0]
            pos += 4
            if ln == -1:
                append(None)
            elif ln < 0 or pos + ln > end:
                raise ProtocolError("message truncated (bytes)")
            else:
                append(buf[pos:pos + ln])
                pos += ln
        nr = _H(buf, pos)[0]
        pos += 2
        if nr < 0 or pos + 2 * nr != end:
            raise ProtocolError("malformed Bind")
        rfmts = list(struct.unpack_from(f"!{nr}h", buf, pos)) if nr else []
        return (buf[start:i].decode("utf-8", "replace"), buf[i + 1:j].decode("utf-8", "replace"),
                fmts, params, rfmts)
    except (ValueError, struct.error, IndexError):
        raise ProtocolError("malformed Bind") from None


def build_bind(portal: str, statement: str, params: Sequence[Optional[bytes]] = (),
               param_formats: Sequence[int] = (), result_formats: Sequence[int] = ()) -> bytes:
    body = [_cstr(portal), _cstr(statement), _I16.pack(len(param_formats))]
    body += [_I16.pack(f) for f in param_formats]
    body.append(_I16.pack(len(params)))
    for p in params:
        body.append(_I32.pack(-1) if p is None else _I32.pack(len(p)) + p)
    body.append(_I16.pack(len(result_formats)))
    body += [_I16.pack(f) for f in result_formats]
    return _msg(b"B", b"".join(body))


def param_format(formats: Sequence[int], index: int) -> int:
    """Bind's parameter-format rule: no code = text, one code = every parameter, else one each."""
    if len(formats) == 1:
        return formats[0]
    return formats[index] if index < len(formats) else 0


_PG_EPOCH = datetime.datetime(2000, 1, 1)


def _binary_bool(value: bytes) -> str:
    if len(value) != 1:
        raise ValueError("a binary bool is one byte")
    return "false" if value == b"\x00" else "true"


# binary send formats read back as the text Postgres would print, by type OID
_BINARY_AS_TEXT = {
    16: _binary_bool,                                                              # bool
    20: lambda v: str(struct.unpack("!q", v)[0]),                                  # int8
    21: lambda v: str(struct.unpack("!h", v)[0]),                                  # int2
    23: lambda v: str(struct.unpack("!i", v)[0]),                                  # int4
    26: lambda v: str(struct.unpack("!I", v)[0]),                                  # oid
    700: lambda v: repr(struct.unpack("!f", v)[0]),                                # float4
    701: lambda v: repr(struct.unpack("!d", v)[0]),                                # float8
    2950: lambda v: str(uuid.UUID(bytes=v)),                                       # uuid
    1082: lambda v: (_PG_EPOCH + datetime.timedelta(days=struct.unpack("!i", v)[0])).date().isoformat(),
    1114: lambda v: (_PG_EPOCH + datetime.timedelta(microseconds=struct.unpack("!q", v)[0])).isoformat(" "),
    1184: lambda v: (_PG_EPOCH + datetime.timedelta(microseconds=struct.unpack("!q", v)[0])).isoformat(" ")
    + "+00",
    25: lambda v: v.decode("utf-8"), 1043: lambda v: v.decode("utf-8"),            # text, varchar
    1042: lambda v: v.decode("utf-8"), 19: lambda v: v.decode("utf-8"),            # bpchar, name
    114: lambda v: v.decode("utf-8"),                                              # json
    3802: lambda v: v[1:].decode("utf-8") if v[:1] == b"\x01" else _not_jsonb(),  # jsonb: version 1
}


def _not_jsonb():
    raise ValueError("unknown jsonb binary version")


def binary_value_text(type_oid: int, value: bytes) -> Optional[str]:
    """A value in binary format as text, for the types whose binary form is simple (integers,
    bool, floats, uuid, dates, text, json); None for other types or bytes that do not fit."""
    decode = _BINARY_AS_TEXT.get(type_oid)
    if decode is None:
        return None
    try:
        return decode(value)
    except (ValueError, struct.error, OverflowError):
        return None


def parse_describe(body: bytes) -> tuple[str, str]:
    """Also parses Close: ('S' statement | 'P' portal, name)."""
    r = _Reader(body)
    kind = r.byte().decode("latin-1")
    if kind not in ("S", "P"):
        raise ProtocolError(f"invalid Describe/Close target {kind!r}")
    name = r.cstr()
    r.done()
    return kind, name


parse_close = parse_describe


def build_describe(kind: str, name: str) -> bytes:
    return _msg(b"D", kind.encode() + _cstr(name))


def build_close(kind: str, name: str) -> bytes:
    return _msg(b"C", kind.encode() + _cstr(name))


def parse_execute(body: bytes) -> tuple[str, int]:
    r = _Reader(body)
    portal = r.cstr()
    max_rows = r.int32()
    r.done()
    return portal, max_rows


def build_execute(portal: str = "", max_rows: int = 0) -> bytes:
    return _msg(b"E", _cstr(portal) + _I32.pack(max_rows))


SYNC = b"S\0\0\0\4"
FLUSH = b"H\0\0\0\4"
TERMINATE = b"X\0\0\0\4"
COPY_DONE = b"c\0\0\0\4"


def build_sync() -> bytes:
    return SYNC


def build_flush() -> bytes:
    return FLUSH


def build_terminate() -> bytes:
    return TERMINATE


def build_copy_data(data: bytes) -> bytes:
    return _msg(b"d", data)


def build_copy_done() -> bytes:
    return COPY_DONE


def parse_copy_fail(body: bytes) -> str:
    return parse_query(body)


def build_copy_fail(message: str) -> bytes:
    return _msg(b"f", _cstr(message))


@dataclasses.dataclass
class FunctionCallMessage:
    function_oid: int
    arg_formats: list[int]
    args: list[Optional[bytes]]
    result_format: int


def parse_function_call(body: bytes) -> FunctionCallMessage:
    r = _Reader(body)
    oid = r.uint32()
    nf = r.int16()
    fmts = [r.int16() for _ in range(max(nf, 0))]
    na = r.int16()
    args: list[Optional[bytes]] = []
    for _ in range(max(na, 0)):
        ln = r.int32()
        args.append(None if ln == -1 else r.bytes(ln))
    rf = r.int16()
    r.done()
    return FunctionCallMessage(oid, fmts, args, rf)


def build_function_call(oid: int, args: Sequence[Optional[bytes]] = (), arg_formats: Sequence[int] = (),
                        result_format: int = 0) -> bytes:
    body = [_U32.pack(oid), _I16.pack(len(arg_formats))] + [_I16.pack(f) for f in arg_formats]
    body.append(_I16.pack(len(args)))
    for a in args:
        body.append(_I32.pack(-1) if a is None else _I32.pack(len(a)) + a)
    body.append(_I16.pack(result_format))
    return _msg(b"F", b"".join(body))


def parse_password(body: bytes) -> bytes:
    """PasswordMessage (cleartext or md5): a NUL-terminated string."""
    end = body.find(b"\0")
    if end < 0:
        raise ProtocolError("unterminated password")
    return bytes(body[:end])


def build_password(password: str | bytes) -> bytes:
    return _msg(b"p", _cstr(password))


def parse_sasl_initial_response(body: bytes) -> tuple[str, Optional[bytes]]:
    r = _Reader(body)
    mech = r.cstr()
    ln = r.int32()
    data = None if ln == -1 else r.bytes(ln)
    r.done()
    return mech, data


def build_sasl_initial_response(mechanism: str, data: Optional[bytes]) -> bytes:
    tail = _I32.pack(-1) if data is None else _I32.pack(len(data)) + data
    return _msg(b"p", _cstr(mechanism) + tail)


def parse_sasl_response(body: bytes) -> bytes:
    return bytes(body)


def build_sasl_response(data: bytes) -> bytes:
    return _msg(b"p", data)


# ======================================================================================
# backend (server -> client)
# ======================================================================================
@dataclasses.dataclass
class AuthenticationRequest:
    code: int
    salt: bytes = b""                      # md5
    mechanisms: list[str] = dataclasses.field(default_factory=list)   # SASL
    data: bytes = b""                      # SASL continue/final, GSS continue


def parse_authentication(body: bytes) -> AuthenticationRequest:
    r = _Reader(body)
    code = r.int32()
    if code == AUTH_MD5:
        salt = r.bytes(4)
        r.done()
        return AuthenticationRequest(code, salt=salt)
    if code == AUTH_SASL:
        mechs = []
        while True:
            m = r.cstr()
            if m == "":
                break
            mechs.append(m)
        r.done()
        return AuthenticationRequest(code, mechanisms=mechs)
    return AuthenticationRequest(code, data=r.rest())


def build_authentication(code: int, payload: bytes = b"") -> bytes:
    return _msg(b"R", _I32.pack(code) + payload)


def build_authentication_ok() -> bytes:
    return build_authentication(AUTH_OK)


def build_authentication_cleartext() -> bytes:
    return build_authentication(AUTH_CLEARTEXT)


def build_authentication_md5(salt: bytes) -> bytes:
    return build_authentication(AUTH_MD5, salt)


def build_authentication_sasl(mechanisms: Iterable[str]) -> bytes:
    return build_authentication(AUTH_SASL, b"".join(_cstr(m) for m in mechanisms) + b"\0")


def build_authentication_sasl_continue(data: bytes) -> bytes:
    return build_authentication(AUTH_SASL_CONTINUE, data)


def build_authentication_sasl_final(data: bytes) -> bytes:
    return build_authentication(AUTH_SASL_FINAL, data)


def parse_parameter_status(body: bytes) -> tuple[str, str]:
    r = _Reader(body)
    name = r.cstr()
    value = r.cstr()
    r.done()
    return name, value


def build_parameter_status(name: str, value: str) -> bytes:
    return _msg(b"S", _cstr(name) + _cstr(value))


def parse_backend_key_data(body: bytes) -> tuple[int, bytes]:
    r = _Reader(body)
    pid = r.int32()
    key = r.rest()
    if not 4 <= len(key) <= 256:
        raise ProtocolError("invalid BackendKeyData key length")
    return pid, key


def build_backend_key_data(pid: int, key: bytes) -> bytes:
    return _msg(b"K", _I32.pack(pid) + key)


def parse_ready_for_query(body: bytes) -> str:
    if len(body) != 1 or body not in (b"I", b"T", b"E"):
        raise ProtocolError("invalid ReadyForQuery status")
    return body.decode()


def build_ready_for_query(status: str) -> bytes:
    return _msg(b"Z", status.encode())


@dataclasses.dataclass
class FieldDescription:
    name: str
    table_oid: int
    column_attnum: int
    type_oid: int
    type_size: int
    type_modifier: int
    format: int


_FIELD_TAIL = struct.Struct("!IhIhih")


def parse_row_description(body: bytes) -> list[FieldDescription]:
    r = _Reader(body)
    n = r.int16()
    fields = []
    for _ in range(max(n, 0)):
        name = r.cstr()
        if r.pos + 18 > r.end:
            raise ProtocolError("RowDescription truncated")
        t_oid, attnum, type_oid, size, mod, fmt = _FIELD_TAIL.unpack_from(body, r.pos)
        r.pos += 18
        fields.append(FieldDescription(name, t_oid, attnum, type_oid, size, mod, fmt))
    r.done()
    return fields


def build_row_description(fields: Sequence[FieldDescription]) -> bytes:
    body = [_I16.pack(len(fields))]
    for f in fields:
        body.append(_cstr(f.name) + _FIELD_TAIL.pack(f.table_oid, f.column_attnum, f.type_oid,
                                                      f.type_size, f.type_modifier, f.format))
    return _msg(b"T", b"".join(body))


def parse_data_row(body: bytes) -> list[Optional[bytes]]:
    r = _Reader(body)
    n = r.int16()
    values: list[Optional[bytes]] = []
    for _ in range(max(n, 0)):
        ln = r.int32()
        values.append(None if ln == -1 else r.bytes(ln))
    r.done()
    return values


def build_data_row_body(values: Sequence[Optional[bytes]]) -> bytes:
    parts = [_I16.pack(len(values))]
    for v in values:
        parts.append(_I32.pack(-1) if v is None else _I32.pack(len(v)) + v)
    return b"".join(parts)


def build_data_row(values: Sequence[Optional[bytes]]) -> bytes:
    return _msg(b"D", build_data_row_body(values))


def parse_command_complete(body: bytes) -> str:
    return parse_query(body)


def build_command_complete(tag: str) -> bytes:
    return _msg(b"C", _cstr(tag))


def rows_from_tag(tag: str) -> Optional[int]:
    """Row count carried by a command tag: 'SELECT 5', 'INSERT 0 3', 'COPY 10' -> the last number."""
    last = tag.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else None


def parse_error_fields(body: bytes) -> dict[str, str]:
    """ErrorResponse / NoticeResponse: {'S': severity, 'C': sqlstate, 'M': message, ...}."""
    fields: dict[str, str] = {}
    r = _Reader(body)
    while True:
        code = r.byte()
        if code == b"\0":
            break
        fields[code.decode("latin-1")] = r.cstr()
    r.done()
    return fields


def _build_fields(type_byte: bytes, fields: dict[str, str]) -> bytes:
    return _msg(type_byte, b"".join(k.encode() + _cstr(v) for k, v in fields.items()) + b"\0")


def build_error_response(sqlstate: str, message: str, severity: str = "ERROR",
                         detail: Optional[str] = None, hint: Optional[str] = None) -> bytes:
    fields = {"S": severity, "V": severity, "C": sqlstate, "M": message}
    if detail:
        fields["D"] = detail
    if hint:
        fields["H"] = hint
    return _build_fields(b"E", fields)


def build_error_fields(fields: dict[str, str]) -> bytes:
    return _build_fields(b"E", fields)


def build_notice_response(fields: dict[str, str]) -> bytes:
    return _build_fields(b"N", fields)


def parse_notification(body: bytes) -> tuple[int, str, str]:
    r = _Reader(body)
    pid = r.int32()
    channel = r.cstr()
    payload = r.cstr()
    r.done()
    return pid, channel, payload


def build_notification(pid: int, channel: str, payload: str) -> bytes:
    return _msg(b"A", _I32.pack(pid) + _cstr(channel) + _cstr(payload))


def parse_parameter_description(body: bytes) -> list[int]:
    r = _Reader(body)
    n = r.int16()
    oids = [r.uint32() for _ in range(max(n, 0))]
    r.done()
    return oids


def build_parameter_description(oids: Sequence[int]) -> bytes:
    return _msg(b"t", _I16.pack(len(oids)) + b"".join(_U32.pack(o) for o in oids))


def parse_copy_response(body: bytes) -> tuple[int, list[int]]:
    """CopyInResponse 'G', CopyOutResponse 'H', CopyBothResponse 'W': (overall format, column formats)."""
    r = _Reader(body)
    overall = r.bytes(1)[0]
    n = r.int16()
    cols = [r.int16() for _ in range(max(n, 0))]
    r.done()
    return overall, cols


def build_copy_response(type_byte: bytes, overall: int, column_formats: Sequence[int]) -> bytes:
    return _msg(type_byte, bytes([overall]) + _I16.pack(len(column_formats))
                + b"".join(_I16.pack(f) for f in column_formats))


def build_copy_in_response(overall: int, cols: Sequence[int]) -> bytes:
    return build_copy_response(b"G", overall, cols)


def build_copy_out_response(overall: int, cols: Sequence[int]) -> bytes:
    return build_copy_response(b"H", overall, cols)


def build_copy_both_response(overall: int, cols: Sequence[int]) -> bytes:
    return build_copy_response(b"W", overall, cols)


def parse_negotiate_protocol_version(body: bytes) -> tuple[int, list[str]]:
    r = _Reader(body)
    newest_minor = r.int32()
    n = r.int32()
    opts = [r.cstr() for _ in range(max(n, 0))]
    r.done()
    return newest_minor, opts


def build_negotiate_protocol_version(newest_minor: int, unrecognized: Sequence[str]) -> bytes:
    return _msg(b"v", _I32.pack(newest_minor) + _I32.pack(len(unrecognized))
                + b"".join(_cstr(o) for o in unrecognized))


PARSE_COMPLETE = b"1\0\0\0\4"
BIND_COMPLETE = b"2\0\0\0\4"
CLOSE_COMPLETE = b"3\0\0\0\4"
NO_DATA = b"n\0\0\0\4"
PORTAL_SUSPENDED = b"s\0\0\0\4"
EMPTY_QUERY_RESPONSE = b"I\0\0\0\4"


def build_parse_complete() -> bytes:
    return PARSE_COMPLETE


def build_bind_complete() -> bytes:
    return BIND_COMPLETE


def build_close_complete() -> bytes:
    return CLOSE_COMPLETE


def build_no_data() -> bytes:
    return NO_DATA


def build_portal_suspended() -> bytes:
    return PORTAL_SUSPENDED


def build_empty_query_response() -> bytes:
    return EMPTY_QUERY_RESPONSE


def parse_function_call_response(body: bytes) -> Optional[bytes]:
    r = _Reader(body)
    ln = r.int32()
    v = None if ln == -1 else r.bytes(ln)
    r.done()
    return v


def build_function_call_response(value: Optional[bytes]) -> bytes:
    return _msg(b"V", _I32.pack(-1) if value is None else _I32.pack(len(value)) + value)
