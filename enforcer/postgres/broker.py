"""Brokered authentication: the agent holds the database secret and logs in upstream itself.

The workload never sees the secret. It presents a service token (a JWT, sent as its
Postgres password) or, when the target says `accept: any`, any password at all; the
agent checks it, then authenticates to the real server as the brokered user with the
secret from a 0600 file (SCRAM-SHA-256, md5 or cleartext, whatever the server asks), and
finally hands both legs to the normal session as if authentication had passed through:
the server's AuthenticationOk, ParameterStatus, BackendKeyData and ReadyForQuery go to
the client through the session like any pass-through login.

Target config (agent.yaml, under a target):

    credentials:
      mode: brokered
      user: app_rw
      password_file: /etc/warden/secrets/customers-db
      accept: token            # token (default) | any
      token:
        issuer: https://issuer.example
        audience: customers-db
        jwks: /etc/warden/jwks.json      # or an https URL
        # optional: algorithms, leeway_s, refresh_s, required_claims

Layers here:
- `BrokerConfig.from_credentials` validates that mapping;
- `PostgresBroker` (one per target) owns the TokenVerifier (JWKS cache) and the SecretFile;
- `BrokeredLogin` (one per connection) is the sans-IO state machine for both legs;
- `authenticate_client` / `authenticate_upstream` / `brokered_startup` are the thin asyncio
  drivers that move its bytes.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import ipaddress
import os
import stat
import threading
import time
from typing import Awaitable, Callable, Optional

from enforcer.tokens import TokenError, TokenVerifier

from . import protocol as P
from .scram import MECHANISM as SCRAM_MECHANISM
from .scram import ScramClient, ScramError

ACCEPT_MODES = ("token", "any")
MAX_PASSWORD_MESSAGE = 32 * 1024       # a JWT fits easily; anything bigger is not a password
MAX_SERVER_AUTH_MESSAGE = 64 * 1024
READ_SIZE = 64 * 1024
# run-time settings that would let a workload choose a different role than the brokered one, as
# a startup parameter of their own or inside `options` (read as the server reads it:
# protocol.startup_option_settings, the parser the session's startup check uses)
_ROLE_SETTINGS = frozenset({"role", "session_authorization"})


class ConfigError(ValueError):
    """Invalid `credentials` mapping; the message names the key and the fix."""


class SecretError(Exception):
    """The secret file cannot be used (missing, unreadable, too permissive, empty)."""


class BrokerFailure(Exception):
    """Brokered login refused or failed. The client gets FATAL `sqlstate` `message` (if still connected)."""

    def __init__(self, sqlstate: str, message: str, reason: str, notify_client: bool = True):
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.reason = reason                 # short, for session.end / records
        self.notify_client = notify_client

    def error_response(self) -> bytes:
        return P.build_error_response(self.sqlstate, self.message, severity="FATAL")


# ======================================================================================
# configuration and per-target state
# ======================================================================================
@dataclasses.dataclass(frozen=True)
class TokenConfig:
    issuer: str
    audience: str | tuple
    jwks: str
    algorithms: tuple = ("RS256", "ES256", "EdDSA", "PS256")
    leeway_s: int = 30
    refresh_s: int = 300
    required_claims: tuple = ("exp", "iat", "sub")


@dataclasses.dataclass(frozen=True)
class BrokerConfig:
    target: str
    user: str
    password_file: str
    accept: str = "token"
    token: Optional[TokenConfig] = None

    @classmethod
    def from_credentials(cls, credentials: Optional[dict], target: str = "") -> Optional["BrokerConfig"]:
        """The brokered config of a target, or None when its credentials are passed through."""
        if not credentials:
            return None
        where = f"targets[{target}].credentials" if target else "credentials"
        if not isinstance(credentials, dict):
            raise ConfigError(f"{where} must be a mapping")
        # unknown keys first: a misspelt 'mode' would otherwise leave the target in pass-through
        known = {"mode", "user", "password_file", "accept", "token"}
        unknown = sorted(set(credentials) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown keys {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        mode = credentials.get("mode", "passthrough")
        if mode in ("passthrough", "pass-through"):
            if len(credentials) > 1:
                raise ConfigError(f"{where}: {', '.join(sorted(set(credentials) - {'mode'}))} apply only to "
                                  f"mode: brokered (this target passes the workload's credentials through)")
            return None
        if mode != "brokered":
            raise ConfigError(f"{where}.mode must be brokered or passthrough, got {mode!r}")
        user = credentials.get("user")
        if not isinstance(user, str) or not user:
            raise ConfigError(f"{where}.user: the database role Warden logs in as is required")
        pwfile = credentials.get("password_file")
        if not isinstance(pwfile, str) or not os.path.isabs(pwfile):
            raise ConfigError(f"{where}.password_file: an absolute path to a 0600 file holding the secret is required")
        accept = credentials.get("accept", "token")
        if accept not in ACCEPT_MODES:
            raise ConfigError(f"{where}.accept must be token or any, got {accept!r}")
        token = None
        raw = credentials.get("token")
        if accept == "token":
            if not isinstance(raw, dict):
                raise ConfigError(f"{where}.token: accept: token needs token: {{issuer, audience, jwks}}")
            missing = [k for k in ("issuer", "audience", "jwks") if not raw.get(k)]
            if missing:
                raise ConfigError(f"{where}.token: missing {', '.join(missing)}")
            extra = sorted(set(raw) - {f.name for f in dataclasses.fields(TokenConfig)})
            if extra:
                raise ConfigError(f"{where}.token: unknown keys {', '.join(extra)}")
            aud = raw["audience"]
            kwargs = {k: raw[k] for k in ("leeway_s", "refresh_s") if k in raw}
            for k in ("algorithms", "required_claims"):
                if k in raw:
                    kwargs[k] = tuple(raw[k])
            token = TokenConfig(issuer=str(raw["issuer"]), audience=aud if isinstance(aud, str) else tuple(aud),
                                jwks=str(raw["jwks"]), **kwargs)
        return cls(target=target, user=user, password_file=pwfile, accept=accept, token=token)


class SecretFile:
    """The database secret: read from a file that only its owner may read, re-read when it changes."""

    def __init__(self, path: str):
        self.path = path
        self._sig: Optional[tuple] = None
        self._value: Optional[bytes] = None
        self._lock = threading.Lock()

    def read(self) -> bytes:
        try:
            st = os.stat(self.path)
        except OSError as e:
            raise SecretError(f"cannot read secret file {self.path}: {e.strerror}") from e
        if not stat.S_ISREG(st.st_mode):
            raise SecretError(f"secret file {self.path} is not a regular file")
        if st.st_mode & 0o077:
            # like libpq's .pgpass check: a secret others can read is refused, not used
            raise SecretError(f"secret file {self.path} is accessible by group or others "
                              f"(mode {stat.S_IMODE(st.st_mode):04o}); run chmod 600 {self.path}")
        sig = (st.st_mtime_ns, st.st_size, st.st_ino)
        with self._lock:
            if sig != self._sig or self._value is None:
                try:
                    with open(self.path, "rb") as f:
                        data = f.read(64 * 1024)
                except OSError as e:
                    raise SecretError(f"cannot read secret file {self.path}: {e.strerror}") from e
                # one trailing newline is an editor's, not the password's
                if data.endswith(b"\r\n"):
                    data = data[:-2]
                elif data.endswith(b"\n"):
                    data = data[:-1]
                if not data:
                    raise SecretError(f"secret file {self.path} is empty")
                if b"\0" in data:
                    raise SecretError(f"secret file {self.path} contains a NUL byte")
                self._value, self._sig = data, sig
            return self._value


class PostgresBroker:
    """Per-target brokered credentials: shared token verifier (JWKS cache), secret file, SCRAM key cache."""

    def __init__(self, config: BrokerConfig, verifier: Optional[TokenVerifier] = None,
                 secret: Optional[SecretFile] = None):
        self.config = config
        if verifier is None and config.accept == "token":
            t = config.token
            verifier = TokenVerifier(t.issuer, t.audience if isinstance(t.audience, str) else list(t.audience),
                                     t.jwks, algorithms=t.algorithms, leeway_s=t.leeway_s,
                                     refresh_s=t.refresh_s, required_claims=t.required_claims)
        self.verifier = verifier
        self.secret = secret or SecretFile(config.password_file)
        # SaltedPassword per (secret digest, salt, iterations): a role's salt is fixed, so PBKDF2 runs
        # once per secret instead of once per connection
        self.scram_cache: dict = {}

    @classmethod
    def from_credentials(cls, credentials: Optional[dict], target: str = "") -> Optional["PostgresBroker"]:
        config = BrokerConfig.from_credentials(credentials, target)
        return cls(config) if config is not None else None

    def check(self) -> list[str]:
        """Problems that would make every brokered login fail (for `warden-agent check`)."""
        problems = []
        try:
            self.secret.read()
        except SecretError as e:
            problems.append(str(e))
        if self.verifier is not None:
            try:
                self.verifier.keys()
            except TokenError as e:
                problems.append(f"target {self.config.target}: {e.reason}")
        return problems

    def login(self, startup_params: dict, *, client_secure: bool) -> "BrokeredLogin":
        return BrokeredLogin(self, startup_params, client_secure=client_secure)


def is_loopback_peer(peername) -> bool:
    """Whether a socket peer (asyncio 'peername' extra) is on loopback, where a cleartext password stays local."""
    if not peername:
        return False
    if isinstance(peername, str):
        return True                           # a Unix socket path
    try:
        addr = ipaddress.ip_address(peername[0])
    except (ValueError, TypeError, IndexError):
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def md5_password(user: str, password: bytes, salt: bytes) -> bytes:
    """PostgreSQL's md5 response: 'md5' + md5(md5(password || user) || salt), in hex."""
    inner = hashlib.md5(password + user.encode("utf-8")).hexdigest().encode("ascii")
    return b"md5" + hashlib.md5(inner + salt).hexdigest().encode("ascii")


# ======================================================================================
# sans-IO login state machine
# ======================================================================================
class BrokeredLogin:
    """One connection's brokered login. No I/O; call in this order:

        client.write(login.begin())                      # AuthenticationCleartextPassword
        pw = login.feed_client(bytes)  ... until not None   # the client's PasswordMessage
        claims = login.check_password(pw)                # token -> claims (may read the JWKS)
        upstream.write(login.upstream_startup())         # StartupMessage as the brokered user
        upstream.write(login.feed_server(bytes)) ... until login.done
        login.server_bytes                               # from AuthenticationOk on: give to the session

    Every method raises BrokerFailure on refusal; its message never contains the secret.
    """

    def __init__(self, broker: PostgresBroker, startup_params: dict, *, client_secure: bool):
        self.broker = broker
        self.config = broker.config
        self.client_params = dict(startup_params)
        self.client_secure = client_secure
        self.claims: Optional[dict] = None
        self.presented: Optional[str] = None        # token | password
        self.upstream_method: Optional[str] = None  # scram-sha-256 | md5 | password | trust
        self.done = False
        self.server_bytes = b""
        self._state = "new"
        self._cbuf = b""
        self._sbuf = b""
        self._scram: Optional[ScramClient] = None

    # -- client leg -----------------------------------------------------------------
    def begin(self) -> bytes:
        if self._state != "new":
            raise RuntimeError("begin() called twice")
        if not self.client_secure:
            raise BrokerFailure("28000", f"target {self.config.target} uses brokered credentials, which need "
                                         "TLS from the client (sslmode=require) or a loopback connection",
                                "broker_insecure_client")
        if self.client_params.get("replication") not in (None, "", "false", "0", "off", "no"):
            raise BrokerFailure("28000", "replication connections cannot use brokered credentials",
                                "broker_refused_params")
        if self._chooses_role():
            raise BrokerFailure("28000", "the startup option role/session_authorization is not allowed with "
                                         "brokered credentials (the role is chosen by Warden)",
                                "broker_refused_params")
        self._state = "await_password"
        return P.build_authentication_cleartext()

    def _chooses_role(self) -> bool:
        """The client's startup parameters set role or session_authorization: as a parameter of their
        own (any case: the server's names are case-insensitive) or inside `options` (-c, --,
        backslash escapes). Options that cannot be read the way the server will read them count as
        choosing one: what they set is unknown."""
        if any(P.setting_name(k) in _ROLE_SETTINGS for k in self.client_params):
            return True
        options = self.client_params.get("options")
        if not options:
            return False
        try:
            settings = P.startup_option_settings(options)
        except P.ProtocolError:
            return True
        return any(name in _ROLE_SETTINGS for name, _ in settings)

    def feed_client(self, data: bytes) -> Optional[bytes]:
        """Bytes from the client; returns its password once the PasswordMessage is complete."""
        if self._state != "await_password":
            raise RuntimeError(f"feed_client() in state {self._state}")
        self._cbuf += data
        buf = self._cbuf
        if len(buf) < 5:
            return None
        t = buf[0:1]
        length = int.from_bytes(buf[1:5], "big", signed=True)
        if t == b"X":
            raise BrokerFailure("08006", "client ended the connection during authentication", "client_closed",
                                notify_client=False)
        if t != b"p":
            raise BrokerFailure("08P01", f"expected a password message, got message type {t!r}", "protocol_error")
        if length < 5 or length > MAX_PASSWORD_MESSAGE:
            raise BrokerFailure("08P01", f"invalid password message length {length}", "protocol_error")
        if len(buf) < 1 + length:
            return None
        if len(buf) > 1 + length:
            # the client may not send anything before it is authenticated
            raise BrokerFailure("08P01", "unexpected data after the password message", "protocol_error")
        try:
            password = P.parse_password(buf[5:1 + length])
        except P.ProtocolError as e:
            raise BrokerFailure("08P01", f"invalid password message: {e}", "protocol_error") from None
        self._cbuf = b""
        self._state = "check_password"
        return password

    @property
    def check_may_block(self) -> bool:
        """True when check_password() may fetch a JWKS over the network (run it in a thread)."""
        v = self.broker.verifier
        return self.config.accept == "token" and v is not None and v.source.is_url

    def check_password(self, password: bytes) -> Optional[dict]:
        """Validate what the client presented; returns the token claims (None with accept: any)."""
        if self._state != "check_password":
            raise RuntimeError(f"check_password() in state {self._state}")
        if self.config.accept == "any":
            self.presented = "password"
        else:
            if not password:
                raise BrokerFailure("28P01", "invalid service token: no token presented (send the token as the "
                                             "password, e.g. PGPASSWORD=<token>)", "token_refused:missing")
            try:
                self.claims = self.broker.verifier.verify(password)
            except TokenError as e:
                raise BrokerFailure("28P01", f"invalid service token: {e.reason}",
                                    f"token_refused:{e.code}") from None
            self.presented = "token"
        self._state = "client_ok"
        return self.claims

    # -- upstream leg ----------------------------------------------------------------
    def upstream_params(self) -> dict:
        """The client's startup parameters with the brokered user; the database defaults as Postgres would."""
        params = {k: v for k, v in self.client_params.items() if not k.startswith("_pq_.")}
        params["database"] = params.get("database") or params.get("user") or self.config.user
        params["user"] = self.config.user
        return {"user": params.pop("user"), "database": params.pop("database"), **params}

    def upstream_startup(self) -> bytes:
        if self._state != "client_ok":
            raise RuntimeError(f"upstream_startup() in state {self._state}")
        self._state = "upstream_auth"
        return P.build_startup_message(self.upstream_params())

    def _secret(self) -> bytes:
        try:
            return self.broker.secret.read()
        except SecretError as e:
            raise BrokerFailure("08006", f"Warden cannot log in to target {self.config.target} for you: {e}",
                                "broker_secret_unavailable") from None

    def upstream_failure(self, what: str, reason: str = "upstream_auth_failed", sqlstate: str = "08006") -> BrokerFailure:
        return BrokerFailure(sqlstate, f"Warden's brokered login to target {self.config.target} as "
                                       f"{self.config.user!r} failed: {what}", reason)

    def feed_server(self, data: bytes) -> bytes:
        """Server bytes during upstream authentication; returns what to send upstream (maybe b"")."""
        if self._state != "upstream_auth":
            raise RuntimeError(f"feed_server() in state {self._state}")
        buf = self._sbuf + data
        out = []
        pos = 0
        while len(buf) - pos >= 5:
            t = buf[pos:pos + 1]
            length = int.from_bytes(buf[pos + 1:pos + 5], "big", signed=True)
            if length < 4 or length > MAX_SERVER_AUTH_MESSAGE:
                raise self.upstream_failure(f"invalid message length {length} from the server",
                                             "upstream_protocol_error", "08P01")
            end = pos + 1 + length
            if end > len(buf):
                break
            body = buf[pos + 5:end]
            if t == b"R":
                try:
                    req = P.parse_authentication(body)
                except P.ProtocolError as e:
                    raise self.upstream_failure(f"malformed authentication request: {e}",
                                                 "upstream_protocol_error", "08P01") from None
                if req.code == P.AUTH_OK:
                    if self._scram is not None and not self._scram.done:
                        # never accept a login the server did not prove (SCRAM is mutual)
                        raise self.upstream_failure("the server skipped the SCRAM final verification")
                    self.upstream_method = self.upstream_method or "trust"
                    self.server_bytes = bytes(buf[pos:])
                    self._sbuf = b""
                    self.done = True
                    self._state = "done"
                    return b"".join(out)
                out.append(self._answer(req))
            elif t == b"E":
                try:
                    fields = P.parse_error_fields(body)
                except P.ProtocolError:
                    fields = {}
                msg = fields.get("M", "error without message")
                raise self.upstream_failure(f"{msg} (check the secret in {self.config.password_file} and the "
                                             f"role's pg_hba.conf entry)", "upstream_auth_failed",
                                             fields.get("C") or "28000")
            elif t in (b"N", b"v"):
                pass                          # notices, protocol negotiation: nothing to answer
            else:
                raise self.upstream_failure(f"unexpected message type {t!r} during authentication",
                                             "upstream_protocol_error", "08P01")
            pos = end
        self._sbuf = bytes(buf[pos:])
        return b"".join(out)

    def _answer(self, req: P.AuthenticationRequest) -> bytes:
        user = self.config.user
        if req.code == P.AUTH_SASL:
            if SCRAM_MECHANISM not in req.mechanisms:
                raise self.upstream_failure(f"the server offers SASL mechanisms {req.mechanisms}, "
                                             f"not {SCRAM_MECHANISM}")
            if self._scram is not None:
                raise self.upstream_failure("the server restarted SASL", "upstream_protocol_error", "08P01")
            self.upstream_method = "scram-sha-256"
            self._scram = ScramClient(user, self._secret(), cache=self.broker.scram_cache)
            return P.build_sasl_initial_response(SCRAM_MECHANISM, self._scram.client_first())
        if req.code == P.AUTH_SASL_CONTINUE:
            if self._scram is None:
                raise self.upstream_failure("SASL continue without SASL start", "upstream_protocol_error", "08P01")
            try:
                return P.build_sasl_response(self._scram.handle_server_first(req.data))
            except ScramError as e:
                raise self.upstream_failure(f"SCRAM: {e}") from None
        if req.code == P.AUTH_SASL_FINAL:
            if self._scram is None:
                raise self.upstream_failure("SASL final without SASL start", "upstream_protocol_error", "08P01")
            try:
                self._scram.verify_server_final(req.data)
            except ScramError as e:
                raise self.upstream_failure(f"SCRAM: {e}") from None
            return b""
        if req.code == P.AUTH_MD5:
            self.upstream_method = "md5"
            return P.build_password(md5_password(user, self._secret(), req.salt))
        if req.code == P.AUTH_CLEARTEXT:
            self.upstream_method = "password"
            return P.build_password(self._secret())
        name = P.AUTH_METHOD_NAMES.get(req.code, f"code {req.code}")
        raise self.upstream_failure(f"the server asks for {name} authentication, which brokered mode cannot do; "
                                     f"use scram-sha-256 for this role in pg_hba.conf")

    # -- what the records and identity rules need ---------------------------------------
    def record_fields(self) -> dict:
        """Fields for session.start: who logged in as whom, and with which token (never the secret or token)."""
        fields = {"credentials": "brokered", "brokered_user": self.config.user,
                  "client_user": self.client_params.get("user"), "presented": self.presented,
                  "upstream_auth": self.upstream_method}
        if self.claims is not None:
            fields["token"] = {k: self.claims[k] for k in ("iss", "sub", "aud", "exp", "iat", "jti")
                               if k in self.claims}
        return fields


# ======================================================================================
# asyncio drivers
# ======================================================================================
async def _read(reader: asyncio.StreamReader, deadline: float) -> bytes:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise asyncio.TimeoutError
    return await asyncio.wait_for(reader.read(READ_SIZE), remaining)


async def authenticate_client(login: BrokeredLogin, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                              *, timeout: float = 30.0, pending: bytes = b"") -> Optional[dict]:
    """Ask the client for its password and check it. Returns the claims; raises BrokerFailure.

    `pending`: client bytes already read past the StartupMessage (normally none).
    Does not write the error itself: the caller turns BrokerFailure into its FATAL (session.fatal).
    """
    deadline = time.monotonic() + timeout
    writer.write(login.begin())
    await writer.drain()
    password = login.feed_client(pending) if pending else None
    try:
        while password is None:
            data = await _read(reader, deadline)
            if not data:
                raise BrokerFailure("08006", "client closed the connection during authentication",
                                    "client_closed", notify_client=False)
            password = login.feed_client(data)
    except asyncio.TimeoutError:
        raise BrokerFailure("08P01", f"no password received within {timeout:g} s", "startup_timeout") from None
    if login.check_may_block:
        return await asyncio.to_thread(login.check_password, password)
    return login.check_password(password)


async def authenticate_upstream(login: BrokeredLogin, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                                *, timeout: float = 30.0) -> bytes:
    """Log in upstream as the brokered user. Returns the server's bytes from AuthenticationOk on."""
    deadline = time.monotonic() + timeout
    writer.write(login.upstream_startup())
    await writer.drain()
    try:
        while not login.done:
            data = await _read(reader, deadline)
            if not data:
                raise login.upstream_failure("the server closed the connection during authentication")
            answer = login.feed_server(data)
            if answer:
                writer.write(answer)
                await writer.drain()
    except asyncio.TimeoutError:
        raise login.upstream_failure(f"no answer from the server within {timeout:g} s") from None
    return login.server_bytes


async def brokered_startup(login: BrokeredLogin, client_reader: asyncio.StreamReader,
                           client_writer: asyncio.StreamWriter,
                           open_upstream: Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]],
                           *, timeout: float = 30.0):
    """Both legs for a caller without a session: the client is checked before any upstream connection
    is opened. Returns (upstream_reader, upstream_writer, server_bytes); on BrokerFailure the FATAL is
    written to the client here, the upstream (if opened) is closed, and the failure re-raised."""
    upstream_writer = None
    try:
        await authenticate_client(login, client_reader, client_writer, timeout=timeout)
        try:
            upstream_reader, upstream_writer = await asyncio.wait_for(open_upstream(), timeout)
        except (OSError, asyncio.TimeoutError) as e:
            raise login.upstream_failure(f"cannot connect: {e or e.__class__.__name__}",
                                          "upstream_connect_failed") from None
        server_bytes = await authenticate_upstream(login, upstream_reader, upstream_writer, timeout=timeout)
        return upstream_reader, upstream_writer, server_bytes
    except BrokerFailure as failure:
        if failure.notify_client:
            try:
                client_writer.write(failure.error_response())
                await client_writer.drain()
            except (ConnectionError, OSError):
                pass
        if upstream_writer is not None:
            upstream_writer.close()
        raise
