"""SCRAM-SHA-256 client (RFC 5802 with RFC 7677's SHA-256), sans-IO: bytes in, bytes out.

Used by the brokered mode to log in upstream with the secret the agent holds:

    c = ScramClient(user, password)
    send SASLInitialResponse("SCRAM-SHA-256", c.client_first())
    send SASLResponse(c.handle_server_first(<AuthenticationSASLContinue data>))
    c.verify_server_final(<AuthenticationSASLFinal data>)      # raises ScramError on a wrong server

No channel binding (gs2 header "n,,"): the enforcer re-originates TLS, so there is no
end-to-end channel to bind; the session strips -PLUS mechanisms for the same reason.

Password preparation follows PostgreSQL (src/common/saslprep.c), because the server
derived its stored key the same way: SASLprep (RFC 4013) as a *stored* string (unassigned
code points prohibited), and when the password is not valid UTF-8 or SASLprep refuses it,
the raw bytes are used unchanged.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import stringprep
import unicodedata
from typing import Callable, Optional

MECHANISM = "SCRAM-SHA-256"
GS2_HEADER = b"n,,"
MIN_ITERATIONS = 4096          # RFC 7677's minimum; a lower count makes a captured proof cheap to brute-force
MAX_ITERATIONS = 1_000_000     # PBKDF2 cost is ours to pay: bound what a server can make us compute
NONCE_BYTES = 18               # 24 base64 characters, as libpq


class ScramError(Exception):
    """The exchange failed: malformed server message, bad parameters, or a server that does not know the password."""


# ======================================================================================
# SASLprep (RFC 4013, profile of stringprep RFC 3454)
# ======================================================================================
class SASLprepError(ValueError):
    pass


def _prohibited(ch: str) -> bool:
    # RFC 4013 section 2.3 prohibited output, plus unassigned code points (A.1) as for stored strings
    return (stringprep.in_table_c12(ch) or stringprep.in_table_c21_c22(ch) or stringprep.in_table_c3(ch)
            or stringprep.in_table_c4(ch) or stringprep.in_table_c5(ch) or stringprep.in_table_c6(ch)
            or stringprep.in_table_c7(ch) or stringprep.in_table_c8(ch) or stringprep.in_table_c9(ch)
            or stringprep.in_table_a1(ch))


def saslprep(value: str) -> str:
    """SASLprep a string (stored-string rules); SASLprepError when it contains prohibited characters."""
    if value.isascii() and all(0x20 <= ord(c) < 0x7F for c in value):
        return value                               # printable ASCII maps to itself
    # 2.1 mapping: non-ASCII spaces -> SPACE, "commonly mapped to nothing" -> removed
    mapped = "".join(" " if stringprep.in_table_c12(c) else c for c in value if not stringprep.in_table_b1(c))
    # 2.2 normalization: NFKC, with Unicode 3.2 as stringprep requires
    normalized = unicodedata.ucd_3_2_0.normalize("NFKC", mapped)
    if not normalized:
        return normalized
    for c in normalized:
        if _prohibited(c):
            raise SASLprepError(f"prohibited character U+{ord(c):04X}")
    # 2.4 bidi (RFC 3454 section 6)
    has_ral = any(stringprep.in_table_d1(c) for c in normalized)
    if has_ral:
        if any(stringprep.in_table_d2(c) for c in normalized):
            raise SASLprepError("mixes right-to-left and left-to-right characters")
        if not (stringprep.in_table_d1(normalized[0]) and stringprep.in_table_d1(normalized[-1])):
            raise SASLprepError("right-to-left string must start and end with a right-to-left character")
    return normalized


def prepare_password(password: str | bytes) -> bytes:
    """The bytes PBKDF2 is fed: SASLprep'd UTF-8, or the raw bytes when that is impossible (as PostgreSQL)."""
    raw = password.encode("utf-8") if isinstance(password, str) else bytes(password)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw
    try:
        return saslprep(text).encode("utf-8")
    except SASLprepError:
        return raw


def _escape_username(name: str) -> str:
    # RFC 5802 saslname: "=" and "," are escaped
    return name.replace("=", "=3D").replace(",", "=2C")


# ======================================================================================
# primitives
# ======================================================================================
def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def salted_password(password: bytes, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", password, salt, iterations)


def _parse_attributes(message: bytes, what: str) -> list[tuple[str, str]]:
    try:
        text = message.decode("utf-8")
    except UnicodeDecodeError:
        raise ScramError(f"{what} is not valid UTF-8") from None
    attrs = []
    for part in text.split(","):
        if len(part) < 2 or part[1] != "=" or not part[0].isalpha():
            raise ScramError(f"malformed {what}: attribute {part[:16]!r}")
        attrs.append((part[0], part[2:]))
    return attrs


def _b64decode(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise ScramError(f"{what} is not valid base64") from None


# ======================================================================================
# client
# ======================================================================================
class ScramClient:
    """One SCRAM-SHA-256 exchange, client side. Call the three steps in order, once each."""

    def __init__(self, username: str, password: str | bytes, *, nonce: Optional[str] = None,
                 min_iterations: int = MIN_ITERATIONS, max_iterations: int = MAX_ITERATIONS,
                 token_urlsafe: Callable[[int], str] = secrets.token_urlsafe, cache: Optional[dict] = None):
        self.username = username
        self._cache = cache
        self._password = prepare_password(password)
        # printable, no ",": base64url without padding qualifies
        self.client_nonce = nonce if nonce is not None else token_urlsafe(NONCE_BYTES)
        if not self.client_nonce or "," in self.client_nonce or not self.client_nonce.isprintable():
            raise ValueError("client nonce must be printable and contain no ','")
        self.min_iterations = min_iterations
        self.max_iterations = max_iterations
        self._client_first_bare: Optional[bytes] = None
        self._expected_server_signature: Optional[bytes] = None
        self.done = False

    def client_first(self) -> bytes:
        """client-first-message (the SASLInitialResponse data)."""
        if self._client_first_bare is not None:
            raise ScramError("client_first() called twice")
        try:
            user = saslprep(self.username)
        except SASLprepError:
            user = self.username             # PostgreSQL ignores this name (it uses the startup user)
        self._client_first_bare = f"n={_escape_username(user)},r={self.client_nonce}".encode("utf-8")
        return GS2_HEADER + self._client_first_bare

    def handle_server_first(self, server_first: bytes) -> bytes:
        """Check server-first-message and return client-final-message (the SASLResponse data)."""
        if self._client_first_bare is None:
            raise ScramError("handle_server_first() before client_first()")
        if self._expected_server_signature is not None:
            raise ScramError("handle_server_first() called twice")
        attrs = _parse_attributes(server_first, "server-first-message")
        if attrs and attrs[0][0] == "m":
            raise ScramError("server requires an unsupported SCRAM extension")
        if attrs and attrs[0][0] == "e":
            raise ScramError(f"server refused: {attrs[0][1]}")
        if [k for k, _ in attrs[:3]] != ["r", "s", "i"]:
            raise ScramError("malformed server-first-message: expected r=,s=,i=")
        nonce, salt_b64, iter_text = attrs[0][1], attrs[1][1], attrs[2][1]
        if not nonce.startswith(self.client_nonce) or len(nonce) == len(self.client_nonce):
            raise ScramError("server nonce does not extend the client nonce")
        salt = _b64decode(salt_b64, "salt")
        if not salt:
            raise ScramError("empty salt")
        if not iter_text.isdigit():
            raise ScramError(f"invalid iteration count {iter_text[:16]!r}")
        iterations = int(iter_text)
        if not self.min_iterations <= iterations <= self.max_iterations:
            raise ScramError(f"iteration count {iterations} outside the accepted range "
                             f"{self.min_iterations}..{self.max_iterations}")

        salted = self._salted(salt, iterations)
        client_key = _hmac(salted, b"Client Key")
        stored_key = hashlib.sha256(client_key).digest()
        server_key = _hmac(salted, b"Server Key")
        channel_binding = base64.b64encode(GS2_HEADER).decode("ascii")
        final_without_proof = f"c={channel_binding},r={nonce}".encode("ascii")
        auth_message = self._client_first_bare + b"," + bytes(server_first) + b"," + final_without_proof
        client_signature = _hmac(stored_key, auth_message)
        proof = bytes(a ^ b for a, b in zip(client_key, client_signature))
        self._expected_server_signature = _hmac(server_key, auth_message)
        return final_without_proof + b",p=" + base64.b64encode(proof)

    def _salted(self, salt: bytes, iterations: int) -> bytes:
        # PBKDF2 is the expensive step; a caller logging in repeatedly with the same secret may share a
        # cache (keyed by a digest of the prepared password, never the password itself)
        if self._cache is None:
            return salted_password(self._password, salt, iterations)
        key = (hashlib.sha256(self._password).digest(), salt, iterations)
        value = self._cache.get(key)
        if value is None:
            value = salted_password(self._password, salt, iterations)
            if len(self._cache) >= 64:
                self._cache.clear()
            self._cache[key] = value
        return value

    def verify_server_final(self, server_final: bytes) -> None:
        """Check server-final-message: the server proves it knows the password too (mutual authentication)."""
        if self._expected_server_signature is None:
            raise ScramError("verify_server_final() before handle_server_first()")
        attrs = _parse_attributes(server_final, "server-final-message")
        if not attrs:
            raise ScramError("empty server-final-message")
        key, value = attrs[0]
        if key == "e":
            raise ScramError(f"server refused: {value}")
        if key != "v":
            raise ScramError("malformed server-final-message: expected v=")
        signature = _b64decode(value, "server signature")
        if not hmac.compare_digest(signature, self._expected_server_signature):
            raise ScramError("server signature is wrong: the server does not know the password (possible impostor)")
        self.done = True

