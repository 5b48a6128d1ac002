"""Who is calling: people (collector-minted JWTs with a role) and agents (EdDSA JWTs
signed by their enrolled key). Verification is strict: algorithm allow-list, issuer,
audience, expiry, required claims."""
from __future__ import annotations

import hashlib
import os
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import Connection, select, update

from collector.storage.schema import agents, tokens

ROLES = ("auditor", "approver", "admin")
ROLE_RANK = {"auditor": 1, "approver": 2, "admin": 3}
AGENT_AUDIENCE = "warden-collector"
AGENT_TOKEN_MAX_LIFETIME_S = 300
CLOCK_LEEWAY_S = 30
KEY_FILE = "collector_signing_key.pem"


class AuthError(Exception):
    """401: the caller could not be authenticated."""


class ForbiddenError(Exception):
    """403: authenticated, but the role does not allow this."""


@dataclass(frozen=True)
class Principal:
    kind: str      # "person" | "agent"
    subject: str   # person name, or agent id
    role: str      # auditor | approver | admin | agent


class CollectorKeys:
    """The collector's own Ed25519 signing key, kept in its state dir (mode 0600)."""

    def __init__(self, state_dir: str | os.PathLike):
        self.path = Path(state_dir) / KEY_FILE
        self.private_key = self._load_or_create()
        self.public_key = self.private_key.public_key()

    def _load_or_create(self) -> Ed25519PrivateKey:
        if self.path.exists():
            key = serialization.load_pem_private_key(self.path.read_bytes(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise AuthError(f"{self.path} is not an Ed25519 key; move it away to create a new one")
            return key
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        # Create exclusively so two processes starting together agree on one key.
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            time.sleep(0.05)
            return self._load_or_create()
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
        return key


def mint_api_token(connection: Connection, keys: CollectorKeys, *, role: str, subject: str,
                   ttl_s: int, issuer: str, audience: str) -> str:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
    now = int(time.time())
    jti = uuid.uuid4().hex
    claims = {"iss": issuer, "aud": audience, "sub": subject, "role": role,
              "iat": now, "nbf": now, "exp": now + int(ttl_s), "jti": jti}
    connection.execute(tokens.insert().values(
        id=jti, kind="api", role=role, subject=subject, created_ns=now * 10**9,
        expires_ns=(now + int(ttl_s)) * 10**9))
    return jwt.encode(claims, keys.private_key, algorithm="EdDSA")


def verify_api_token(connection: Connection, keys: CollectorKeys, token: str, *,
                     issuer: str, audience: str) -> Principal:
    try:
        # No leeway: these tokens are minted on the collector's own clock.
        claims = jwt.decode(token, keys.public_key, algorithms=["EdDSA"], audience=audience,
                            issuer=issuer, leeway=0,
                            options={"require": ["exp", "iat", "iss", "aud", "sub", "jti"]})
    except jwt.ExpiredSignatureError:
        raise AuthError("token expired: mint a new one with `warden-collector token create`") from None
    except jwt.InvalidTokenError as exc:
        raise AuthError(f"invalid token: {exc}") from None
    role = claims.get("role")
    if role not in ROLES:
        raise AuthError("invalid token: no valid role claim")
    row = connection.execute(select(tokens.c.revoked_ns).where(tokens.c.id == claims["jti"])).first()
    if row is not None and row.revoked_ns is not None:
        raise AuthError("token revoked")
    return Principal(kind="person", subject=str(claims["sub"]), role=role)


def revoke_api_token(connection: Connection, jti: str) -> bool:
    result = connection.execute(update(tokens).where(tokens.c.id == jti, tokens.c.kind == "api")
                                .values(revoked_ns=time.time_ns()))
    return result.rowcount > 0


def _enroll_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class EnrollmentGrant:
    """What a consumed enrollment token allows."""
    token_id: str             # tokens.id (sha256 of the token)
    agent_id: str | None      # the agent id it was created for (None: any id not enrolled yet)
    rotate: bool              # it may replace that agent's key
    created_by: str | None
    created_ns: int


def create_enrollment_token(connection: Connection, ttl_s: int, *, agent_id: str | None = None,
                            rotate: bool = False, created_by: str | None = None) -> str:
    """A one-time token. Without agent_id it enrolls any agent id that is not enrolled yet; with
    agent_id only that one, and with rotate=True it may also replace that agent's key."""
    if rotate and not agent_id:
        raise ValueError("a key rotation token must name the agent whose key it replaces")
    token = "wenr_" + secrets.token_urlsafe(32)
    now = time.time_ns()
    connection.execute(tokens.insert().values(
        id=_enroll_hash(token), kind="enroll", created_ns=now, expires_ns=now + int(ttl_s) * 10**9,
        agent_id=agent_id or None, rotate=bool(rotate), created_by=created_by))
    return token


def consume_enrollment_token(connection: Connection, token: str, agent_id: str) -> EnrollmentGrant:
    """Mark the token used, atomically; raises AuthError if unknown, used or expired, and
    ForbiddenError if it was created for another agent id."""
    now = time.time_ns()
    token_id = _enroll_hash(token)
    row = connection.execute(select(tokens).where(tokens.c.id == token_id, tokens.c.kind == "enroll")).first()
    if row is not None and row.agent_id is not None and row.agent_id != agent_id \
            and row.used_ns is None and row.revoked_ns is None and row.expires_ns > now:
        raise ForbiddenError(f"this enrollment token was created for agent {row.agent_id!r} and cannot enroll "
                             f"{agent_id!r}")
    result = connection.execute(
        update(tokens)
        .where(tokens.c.id == token_id, tokens.c.kind == "enroll",
               tokens.c.used_ns.is_(None), tokens.c.revoked_ns.is_(None), tokens.c.expires_ns > now)
        .values(used_ns=now, used_by=agent_id))
    if row is None or result.rowcount != 1:
        raise AuthError("enrollment token unknown, already used or expired: "
                        "create a new one with `warden-collector enroll create`")
    return EnrollmentGrant(token_id=token_id, agent_id=row.agent_id, rotate=bool(row.rotate),
                           created_by=row.created_by, created_ns=row.created_ns)


def looks_like_agent_token(token: str) -> str | None:
    """The claimed agent id if this JWT says it is from an agent (unverified: it only
    selects which strict verification applies)."""
    try:
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return None
    if header.get("alg") == "EdDSA" and claims.get("aud") == AGENT_AUDIENCE and isinstance(claims.get("iss"), str):
        return claims["iss"]
    return None


def verify_agent_token(connection: Connection, token: str) -> Principal:
    try:
        unverified = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError as exc:
        raise AuthError(f"invalid agent token: {exc}") from None
    agent_id = unverified.get("iss")
    if not isinstance(agent_id, str):
        raise AuthError("invalid agent token: no issuer")
    row = connection.execute(select(agents.c.public_key).where(agents.c.agent_id == agent_id)).first()
    if row is None:
        raise AuthError(f"agent {agent_id!r} is not enrolled")
    public_key = Ed25519PublicKey.from_public_bytes(bytes(row.public_key))
    try:
        claims = jwt.decode(token, public_key, algorithms=["EdDSA"], audience=AGENT_AUDIENCE,
                            issuer=agent_id, leeway=CLOCK_LEEWAY_S,
                            options={"require": ["exp", "iat", "iss", "sub", "aud", "jti"]})
    except jwt.ExpiredSignatureError:
        raise AuthError("agent token expired") from None
    except jwt.InvalidTokenError as exc:
        raise AuthError(f"invalid agent token: {exc}") from None
    if claims.get("sub") != agent_id:
        raise AuthError("invalid agent token: sub must equal iss (the agent id)")
    if claims["exp"] > time.time() + AGENT_TOKEN_MAX_LIFETIME_S + CLOCK_LEEWAY_S:
        raise AuthError("invalid agent token: exp is more than 5 minutes ahead")
    return Principal(kind="agent", subject=agent_id, role="agent")


def mint_agent_token(private_key: Ed25519PrivateKey, agent_id: str, lifetime_s: int = 240) -> str:
    """What an agent sends (used by tests and tools; the agent's shipper has its own)."""
    now = int(time.time())
    return jwt.encode({"iss": agent_id, "sub": agent_id, "aud": AGENT_AUDIENCE, "iat": now,
                       "exp": now + lifetime_s, "jti": uuid.uuid4().hex}, private_key, algorithm="EdDSA")


class OIDCVerifier:
    """People's tokens from an external OIDC provider: verified strictly by the shared
    enforcer.tokens.TokenVerifier (asymmetric algorithm allow-list, never none/HS*,
    issuer, audience, expiry, kid lookup with a rate-limited JWKS refresh), then mapped
    to a role through one claim (e.g. groups) and the configured role_map."""

    def __init__(self, settings):
        from enforcer.tokens import TokenVerifier
        self.settings = settings
        self.verifier = TokenVerifier(settings.issuer, settings.audience, settings.jwks,
                                      algorithms=settings.algorithms, required_claims=("exp", "iat", "iss", "aud"))

    def claims_issuer_matches(self, token: str) -> bool:
        """Whether the (unverified) token names this provider: it only selects the verifier."""
        try:
            return jwt.decode(token, options={"verify_signature": False}).get("iss") == self.settings.issuer
        except jwt.InvalidTokenError:
            return False

    def principal(self, token: str) -> Principal:
        from enforcer.tokens import TokenError
        try:
            claims = self.verifier.verify(token)
        except TokenError as exc:
            hint = ": sign in again with your identity provider" if exc.code == "expired" else ""
            raise AuthError(f"OIDC token refused: {exc.reason}{hint}") from None
        subject = _claim(claims, self.settings.subject_claim)
        if not isinstance(subject, str) or not subject:
            raise AuthError(f"OIDC token refused: no {self.settings.subject_claim!r} claim to name the person")
        values = _claim(claims, self.settings.role_claim)
        if isinstance(values, str):
            values = [values]
        roles = [self.settings.role_map[v] for v in values or [] if isinstance(v, str) and v in self.settings.role_map]
        if not roles:
            raise ForbiddenError(f"{subject} has no Warden role: none of the token's {self.settings.role_claim!r} "
                                 f"values is in tokens.oidc.role_map")
        return Principal(kind="person", subject=subject, role=max(roles, key=ROLE_RANK.__getitem__))


def _claim(claims: dict, path: str):
    """A claim by name, or a dotted path into nested claims (e.g. realm_access.roles)."""
    if path in claims:
        return claims[path]
    value = claims
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value
