"""Service tokens: JWTs validated against a JWKS (file or URL) with PyJWT.

A workload presents a token (as its Postgres password in brokered mode, or in an HTTP
header); `TokenVerifier.verify(token)` returns its claims or raises `TokenError` whose
message says exactly why it was refused.

What is refused, and why it matters:
- `alg: none` and every HMAC algorithm (HS256/384/512): with public keys in the JWKS, an
  HMAC token "signed" with the public key bytes would otherwise verify (key confusion);
- any algorithm outside the configured allow-list, and a key whose type does not fit the
  token's algorithm (an RSA key never verifies an ES256 token, and so on);
- symmetric (`kty: oct`) keys in the JWKS are ignored outright;
- unknown `kid` (after one forced, rate-limited JWKS refresh), bad signature, malformed
  token, unknown critical header parameters;
- expired / not yet valid (with `leeway_s`), wrong issuer, wrong audience, missing
  required claims.

Header parameters that point elsewhere for keys (`jku`, `x5u`, `jwk`) are never followed:
keys come only from the configured JWKS.
"""
from __future__ import annotations

import ipaddress
import json
import os
import ssl
import threading
import time
import urllib.parse
import urllib.request
from typing import Any, Callable, Optional, Sequence

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

DEFAULT_ALGORITHMS = ("RS256", "ES256", "EdDSA", "PS256")
# Only asymmetric signature algorithms can ever be allowed.
SUPPORTED_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                                  "ES256", "ES384", "ES512", "EdDSA"})
_EC_CURVE_FOR_ALG = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}

MAX_TOKEN_BYTES = 16 * 1024          # a token is a password-sized thing; bigger input is refused unparsed
MAX_JWKS_BYTES = 1024 * 1024
FORCED_REFRESH_MIN_INTERVAL_S = 10.0  # unknown-kid refreshes: at most one per interval (no fetch amplification)


class TokenError(Exception):
    """A refused token. `code` is a short machine-readable reason, `reason` the sentence for humans."""

    def __init__(self, reason: str, code: str = "invalid"):
        super().__init__(reason)
        self.reason = reason
        self.code = code


class JWKSError(Exception):
    """The key set could not be loaded (bad file, unreachable URL, invalid JSON)."""


# ======================================================================================
# key set
# ======================================================================================
class _Key:
    __slots__ = ("kid", "alg", "public_key")

    def __init__(self, kid: Optional[str], alg: Optional[str], public_key: Any):
        self.kid = kid
        self.alg = alg
        self.public_key = public_key

    def fits(self, alg: str) -> bool:
        """Whether this key may verify a token signed with `alg` (the key-type check against confusion)."""
        if self.alg is not None and self.alg != alg:
            return False
        k = self.public_key
        if alg.startswith(("RS", "PS")):
            return isinstance(k, rsa.RSAPublicKey)
        if alg in _EC_CURVE_FOR_ALG:
            return isinstance(k, ec.EllipticCurvePublicKey) and k.curve.name == _EC_CURVE_FOR_ALG[alg]
        if alg == "EdDSA":
            return isinstance(k, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey))
        return False


def parse_jwks(text: str | bytes) -> list[_Key]:
    """Usable signature keys of a JWKS document; unusable entries are skipped, a bad document raises JWKSError."""
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise JWKSError(f"JWKS is not valid JSON: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise JWKSError('JWKS must be a JSON object with a "keys" list')
    keys = []
    for entry in doc["keys"]:
        if not isinstance(entry, dict):
            continue
        if entry.get("kty") == "oct":
            continue                      # symmetric keys would enable HMAC tokens: never used
        if entry.get("use", "sig") != "sig":
            continue
        ops = entry.get("key_ops")
        if isinstance(ops, list) and "verify" not in ops:
            continue
        alg = entry.get("alg")
        if alg is not None and alg not in SUPPORTED_ALGORITHMS:
            continue
        try:
            key = jwt.PyJWK(entry).key
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError):
            continue
        if isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey,
                            ed448.Ed448PrivateKey)):
            # a private key published by mistake: verify with its public half only
            key = key.public_key()
        if not isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey,
                                ed448.Ed448PublicKey)):
            continue
        kid = entry.get("kid")
        keys.append(_Key(str(kid) if kid is not None else None, alg, key))
    return keys


def _is_loopback_host(host: Optional[str]) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class JWKSSource:
    """A JWKS file path or URL, loaded into keys; remembers what it loaded to skip unchanged reloads."""

    def __init__(self, location: str, *, ssl_context: Optional[ssl.SSLContext] = None, timeout_s: float = 5.0):
        self.location = location
        self.ssl_context = ssl_context
        self.timeout_s = timeout_s
        parsed = urllib.parse.urlsplit(location)
        self.is_url = parsed.scheme in ("http", "https")
        if self.is_url:
            # plain http only to loopback: a JWKS fetched over the network must be authenticated by TLS
            if parsed.scheme == "http" and not _is_loopback_host(parsed.hostname):
                raise JWKSError(f"JWKS URL {location!r} must use https (plain http is accepted only on loopback)")
        elif parsed.scheme not in ("", "file"):
            raise JWKSError(f"JWKS location {location!r} must be a file path or an https URL")
        self.path = parsed.path if parsed.scheme == "file" else location
        self._file_sig: Optional[tuple] = None
        self.loads = 0            # how many times the document was actually (re)read: for tests and metrics

    def load(self, force: bool = False) -> Optional[list[_Key]]:
        """New keys, or None when a file is unchanged since the last load (and not forced)."""
        if self.is_url:
            return self._fetch()
        try:
            st = os.stat(self.path)
        except OSError as e:
            raise JWKSError(f"cannot read JWKS file {self.path}: {e.strerror}") from e
        sig = (st.st_mtime_ns, st.st_size, st.st_ino)
        if not force and sig == self._file_sig:
            return None
        try:
            with open(self.path, "rb") as f:
                data = f.read(MAX_JWKS_BYTES + 1)
        except OSError as e:
            raise JWKSError(f"cannot read JWKS file {self.path}: {e.strerror}") from e
        if len(data) > MAX_JWKS_BYTES:
            raise JWKSError(f"JWKS file {self.path} is larger than {MAX_JWKS_BYTES} bytes")
        keys = parse_jwks(data)
        self._file_sig = sig
        self.loads += 1
        return keys

    def _fetch(self) -> list[_Key]:
        req = urllib.request.Request(self.location, headers={"Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s, context=self.ssl_context) as resp:
                data = resp.read(MAX_JWKS_BYTES + 1)
        except (OSError, ValueError) as e:
            raise JWKSError(f"cannot fetch JWKS from {self.location}: {e}") from e
        if len(data) > MAX_JWKS_BYTES:
            raise JWKSError(f"JWKS at {self.location} is larger than {MAX_JWKS_BYTES} bytes")
        keys = parse_jwks(data)
        self.loads += 1
        return keys


# ======================================================================================
# verifier
# ======================================================================================
class TokenVerifier:
    """Validates service tokens against one issuer, audience and JWKS. Thread-safe.

    The JWKS is loaded on first use and re-checked every `refresh_s` (a file is re-read
    only when its mtime/size/inode changed; a URL is re-fetched). A token whose `kid` is
    unknown triggers one forced refresh, at most once per FORCED_REFRESH_MIN_INTERVAL_S,
    so rotated keys are picked up at once without letting tokens drive fetches.
    Keys without a `kid`: a token naming a kid only matches keys with that kid; a token
    without a kid is tried against every key whose type fits its algorithm.
    """

    def __init__(self, issuer: str, audience: str | Sequence[str], jwks: str,
                 algorithms: Sequence[str] = DEFAULT_ALGORITHMS, leeway_s: int = 30, refresh_s: int = 300,
                 required_claims: Sequence[str] = ("exp", "iat", "sub"), *,
                 ssl_context: Optional[ssl.SSLContext] = None,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic,
                 forced_refresh_min_interval_s: float = FORCED_REFRESH_MIN_INTERVAL_S):
        if not issuer:
            raise ValueError("token verification needs an issuer")
        if not audience:
            raise ValueError("token verification needs an audience")
        bad = [a for a in algorithms if a not in SUPPORTED_ALGORITHMS]
        if bad:
            raise ValueError(f"algorithms {', '.join(bad)} cannot be allowed for service tokens "
                             f"(allowed: {', '.join(sorted(SUPPORTED_ALGORITHMS))}); none and HMAC are never accepted")
        if not algorithms:
            raise ValueError("the algorithm allow-list is empty")
        self.issuer = issuer
        self.audience = audience if isinstance(audience, str) else list(audience)
        self.algorithms = tuple(algorithms)
        self.leeway_s = leeway_s
        self.refresh_s = refresh_s
        self.required_claims = tuple(required_claims)
        self.source = JWKSSource(jwks, ssl_context=ssl_context)
        self.clock = clock
        self.monotonic = monotonic
        self.forced_refresh_min_interval_s = forced_refresh_min_interval_s
        self._keys: Optional[list[_Key]] = None
        self._next_check = 0.0
        self._last_forced: Optional[float] = None
        self._lock = threading.Lock()

    # -- key management ----------------------------------------------------------------
    def _refresh(self, force: bool) -> None:
        """Reload the JWKS if due (or forced). A failed reload keeps the previous keys."""
        now = self.monotonic()
        with self._lock:
            if force:
                if self._last_forced is not None and now - self._last_forced < self.forced_refresh_min_interval_s:
                    return
                self._last_forced = now
            elif self._keys is not None and now < self._next_check:
                return
            try:
                keys = self.source.load(force=force or self._keys is None)
            except JWKSError:
                if self._keys is None:
                    raise
                keys = None          # keep serving the last good key set
            if keys is not None:
                self._keys = keys
            self._next_check = now + self.refresh_s

    def keys(self) -> list[_Key]:
        try:
            self._refresh(force=False)
        except JWKSError as e:
            raise TokenError(f"no signing keys available: {e}", "jwks_unavailable") from e
        return list(self._keys or ())

    def _candidates(self, alg: str, kid: Optional[str]) -> list[_Key]:
        keys = self.keys()
        if kid is not None:
            found = [k for k in keys if k.kid == kid]
            if not found:
                try:
                    self._refresh(force=True)
                except JWKSError:
                    pass
                found = [k for k in (self._keys or ()) if k.kid == kid]
            if not found:
                raise TokenError(f"unknown signing key id (kid) {kid!r}: not in the JWKS {self.source.location}",
                                 "unknown_kid")
            fitting = [k for k in found if k.fits(alg)]
            if not fitting:
                raise TokenError(f"key {kid!r} cannot verify algorithm {alg} (key type or alg mismatch)",
                                 "key_mismatch")
            return fitting
        fitting = [k for k in keys if k.fits(alg)]
        if not fitting:
            raise TokenError(f"no key in the JWKS fits algorithm {alg}", "unknown_kid")
        return fitting

    # -- verification ------------------------------------------------------------------
    def verify(self, token: str | bytes) -> dict:
        """Claims of a valid token; TokenError naming the reason otherwise."""
        if isinstance(token, bytes):
            try:
                token = token.decode("ascii")
            except UnicodeDecodeError:
                raise TokenError("malformed token: not ASCII", "malformed") from None
        token = token.strip()
        if len(token) > MAX_TOKEN_BYTES:
            raise TokenError(f"malformed token: longer than {MAX_TOKEN_BYTES} bytes", "malformed")
        if token.count(".") != 2:
            raise TokenError("malformed token: a JWT has three dot-separated parts", "malformed")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as e:
            raise TokenError(f"malformed token: {e}", "malformed") from None
        alg = header.get("alg")
        if not isinstance(alg, str):
            raise TokenError("malformed token: header has no alg", "malformed")
        if alg.lower() == "none":
            raise TokenError("unsigned token (alg: none) refused", "alg_none")
        if alg.upper().startswith("HS"):
            raise TokenError(f"HMAC-signed token ({alg}) refused: service tokens must be signed with an "
                             f"asymmetric key", "alg_hmac")
        if alg not in self.algorithms:
            raise TokenError(f"algorithm {alg} is not allowed (allowed: {', '.join(self.algorithms)})",
                             "alg_not_allowed")
        crit = header.get("crit")
        if crit is not None:
            raise TokenError(f"unsupported critical header parameters {crit!r}", "malformed")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise TokenError("malformed token: kid must be a string", "malformed")

        last_error: Optional[TokenError] = None
        for key in self._candidates(alg, kid):
            try:
                return self._decode(token, key.public_key, alg)
            except jwt.InvalidSignatureError:
                last_error = TokenError("bad signature", "bad_signature")
            except jwt.PyJWTError as e:
                raise self._explain(e) from None
        raise last_error or TokenError("bad signature", "bad_signature")

    def _decode(self, token: str, key: Any, alg: str) -> dict:
        # Signature, issuer, audience and presence of required claims by PyJWT; the time claims are
        # checked here against self.clock so the messages say by how much and tests need no sleeping.
        claims = jwt.decode(
            token, key, algorithms=[alg], audience=self.audience, issuer=self.issuer,
            options={"require": list(self.required_claims), "verify_exp": False, "verify_nbf": False,
                     "verify_iat": False})
        now = self.clock()
        for name in ("exp", "nbf", "iat"):
            value = claims.get(name)
            if name in claims and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise TokenError(f"malformed token: claim {name} must be a number", "malformed")
        if "exp" in claims and claims["exp"] <= now - self.leeway_s:
            raise TokenError(self._expired_reason(claims["exp"], now), "expired")
        if "nbf" in claims and claims["nbf"] > now + self.leeway_s:
            raise TokenError(f"token not yet valid (nbf is {int(claims['nbf'] - now)} s in the future)", "not_yet_valid")
        if "iat" in claims and claims["iat"] > now + self.leeway_s:
            raise TokenError(f"token not yet valid (issued {int(claims['iat'] - now)} s in the future)", "not_yet_valid")
        return claims

    @staticmethod
    def _expired_reason(exp: float, now: float) -> str:
        return f"token expired {int(now - exp)} s ago"

    def _explain(self, e: jwt.PyJWTError) -> TokenError:
        if isinstance(e, jwt.ExpiredSignatureError):
            return TokenError("token expired", "expired")
        if isinstance(e, jwt.ImmatureSignatureError):
            return TokenError(f"token not yet valid ({e})", "not_yet_valid")
        if isinstance(e, jwt.InvalidIssuerError):
            return TokenError(f"wrong issuer: expected {self.issuer!r}", "wrong_issuer")
        if isinstance(e, jwt.InvalidAudienceError):
            want = (repr(self.audience) if isinstance(self.audience, str)
                    else " or ".join(repr(a) for a in self.audience))
            return TokenError(f"wrong audience: expected {want}", "wrong_audience")
        if isinstance(e, jwt.MissingRequiredClaimError):
            return TokenError(f"missing required claim {e.claim!r}", "missing_claim")
        if isinstance(e, jwt.InvalidAlgorithmError):
            return TokenError(f"algorithm not allowed: {e}", "alg_not_allowed")
        if isinstance(e, jwt.InvalidIssuedAtError):
            return TokenError(f"malformed token: {e}", "malformed")
        if isinstance(e, jwt.DecodeError):
            return TokenError(f"malformed token: {e}", "malformed")
        return TokenError(f"invalid token: {e}", "invalid")
