"""collector.yaml: load, validate, and report mistakes with their line number."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from agent.yamlpos import Positions, YamlPositionError, load_yaml
from collector.timeparse import TimeFormatError, parse_duration_ns

DEFAULT_STATE_DIR = "/var/lib/warden-collector"
DEFAULT_LISTEN = "127.0.0.1:8443"


class ConfigError(Exception):
    """A configuration mistake; the message names the file, line and fix."""


PERSON_ROLES = ("auditor", "approver", "admin")
OIDC_DEFAULT_ALGORITHMS = ("RS256", "ES256", "EdDSA", "PS256")


@dataclass
class OIDCSettings:
    """People's tokens from an external identity provider, mapped to roles by a claim."""
    issuer: str
    audience: str
    jwks: str                       # file path or https URL (http only on loopback)
    role_claim: str = "groups"
    role_map: dict[str, str] = field(default_factory=dict)  # claim value -> auditor | approver | admin
    subject_claim: str = "sub"      # what the access log records, e.g. email
    algorithms: tuple[str, ...] = OIDC_DEFAULT_ALGORITHMS


@dataclass
class TokenSettings:
    issuer: str = "warden-collector"
    audience: str = "warden-api"
    default_ttl: str = "8h"
    oidc: OIDCSettings | None = None


@dataclass
class WebhookSettings:
    url: str | None = None
    secret: str | None = None


@dataclass
class CollectorConfig:
    listen: str = DEFAULT_LISTEN
    db: str | None = None            # default: sqlite file inside state_dir
    tls_cert: str | None = None
    tls_key: str | None = None
    state_dir: str = DEFAULT_STATE_DIR
    tokens: TokenSettings = field(default_factory=TokenSettings)
    retention_days: int | None = None
    retention_interval: str = "1h"
    approval_timeout: str = "15m"
    ingest_workers: int | None = None   # None: two per CPU (or WARDEN_INGEST_WORKERS); 0: in-process
    webhook: WebhookSettings = field(default_factory=WebhookSettings)
    source: str = "<defaults>"

    @property
    def database_url(self) -> str:
        if self.db:
            return self.db
        return "sqlite:///" + str(Path(self.state_dir) / "collector.db")

    @property
    def retention_interval_s(self) -> float:
        return parse_duration_ns(self.retention_interval) / 1e9

    @property
    def approval_timeout_ns(self) -> int:
        return parse_duration_ns(self.approval_timeout)

    def listen_host_port(self) -> tuple[str, int]:
        return parse_listen(self.listen)


def parse_listen(text: str) -> tuple[str, int]:
    value = str(text).strip()
    if value.startswith("["):  # [::1]:8443
        host, _, port = value[1:].partition("]:")
    else:
        host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"bad listen address {text!r}: use HOST:PORT, e.g. 127.0.0.1:8443")
    return host, int(port)


# key -> (kind, allowed subkeys or None)
_SCHEMA: dict[str, tuple[type, dict | None]] = {
    "listen": (str, None),
    "db": (str, None),
    "state_dir": (str, None),
    "tls": (dict, {"cert": str, "key": str}),
    "tokens": (dict, {"issuer": str, "audience": str, "default_ttl": str, "oidc": dict}),
    "retention": (dict, {"days": int, "interval": str}),
    "approvals": (dict, {"timeout": str}),
    "ingest": (dict, {"workers": int}),
    "webhook": (dict, {"url": str, "secret": str}),
}


def load_config(path: str | os.PathLike | None) -> CollectorConfig:
    """Read collector.yaml; None gives the defaults."""
    if path is None:
        return CollectorConfig()
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read config: {exc.strerror}") from None
    try:
        root, where = load_yaml(text, str(file))
    except YamlPositionError as exc:
        raise ConfigError(str(exc)) from None
    config = CollectorConfig(source=str(file))
    if not isinstance(root, dict):
        raise ConfigError(f"{where.value_at(())}: the top level must be a mapping of keys")
    values = _validate(where, root)
    config.listen = values.get("listen", config.listen)
    config.db = values.get("db")
    config.state_dir = values.get("state_dir", config.state_dir)
    tls = values.get("tls", {})
    config.tls_cert, config.tls_key = tls.get("cert"), tls.get("key")
    tokens = values.get("tokens", {})
    config.tokens = TokenSettings(
        issuer=tokens.get("issuer", "warden-collector"),
        audience=tokens.get("audience", "warden-api"),
        default_ttl=tokens.get("default_ttl", "8h"),
        oidc=tokens.get("oidc"),
    )
    config.retention_days = values.get("retention", {}).get("days")
    config.retention_interval = values.get("retention", {}).get("interval", "1h")
    config.approval_timeout = values.get("approvals", {}).get("timeout", "15m")
    config.ingest_workers = values.get("ingest", {}).get("workers")
    hook = values.get("webhook", {})
    config.webhook = WebhookSettings(url=hook.get("url"), secret=hook.get("secret"))
    return config


def _validate(where: Positions, root: dict) -> dict:
    values: dict = {}
    for key, value in root.items():
        if key not in _SCHEMA:
            raise ConfigError(f"{where((key,))}: unknown key {key!r}; known keys: {', '.join(_SCHEMA)}")
        kind, sub = _SCHEMA[key]
        if sub is None:
            values[key] = _scalar(where, (key,), key, value, kind)
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"{where.value_at((key,))}: {key!r} must be a mapping "
                              f"with keys {', '.join(sub)}")
        section: dict = {}
        for sub_key, sub_value in value.items():
            if sub_key not in sub:
                raise ConfigError(f"{where((key, sub_key))}: unknown key "
                                  f"{key}.{sub_key}; known: {', '.join(sub)}")
            if (key, sub_key) == ("tokens", "oidc"):
                section[sub_key] = _oidc(where, (key, sub_key), sub_value)
                continue
            section[sub_key] = _scalar(where, (key, sub_key), f"{key}.{sub_key}", sub_value, sub[sub_key])
        values[key] = section
    _check_semantics(where, values)
    return values


_OIDC_KEYS = ("issuer", "audience", "jwks", "role_claim", "role_map", "subject_claim", "algorithms")


def _oidc(where: Positions, path: tuple, node) -> OIDCSettings:
    at = where.value_at(path)
    if not isinstance(node, dict):
        raise ConfigError(f"{where(path)}: tokens.oidc must be a mapping with "
                          f"issuer, audience, jwks, role_claim, role_map")
    values: dict = {}
    for name, value in node.items():
        line = where(path + (name,))
        if name not in _OIDC_KEYS:
            raise ConfigError(f"{line}: unknown key tokens.oidc.{name}; known: {', '.join(_OIDC_KEYS)}")
        if name == "role_map":
            if not isinstance(value, dict):
                raise ConfigError(f"{line}: tokens.oidc.role_map must map claim values to roles, "
                                  f'e.g. "sec-auditors: auditor"')
            role_map = {}
            for group, role_value in value.items():
                group_path = path + (name, group)
                role = _scalar(where, group_path, f"tokens.oidc.role_map.{group}", role_value, str)
                if role not in PERSON_ROLES:
                    raise ConfigError(f"{where.value_at(group_path)}: tokens.oidc.role_map."
                                      f"{group}: unknown role {role!r}; use {', '.join(PERSON_ROLES)}")
                role_map[str(group)] = role
            values[name] = role_map
        elif name == "algorithms":
            if isinstance(value, list):
                items = [(path + (name, i), item) for i, item in enumerate(value)]
            else:
                items = [(path + (name,), value)]
            algorithms = tuple(_scalar(where, p, "tokens.oidc.algorithms", item, str) for p, item in items)
            from enforcer.tokens import SUPPORTED_ALGORITHMS
            bad = [a for a in algorithms if a not in SUPPORTED_ALGORITHMS]
            if bad or not algorithms:
                raise ConfigError(f"{line}: tokens.oidc.algorithms: {', '.join(bad) or 'empty list'} not "
                                  f"allowed; choose from {', '.join(sorted(SUPPORTED_ALGORITHMS))} "
                                  f"(none and HMAC are never accepted)")
            values[name] = algorithms
        else:
            values[name] = _scalar(where, path + (name,), f"tokens.oidc.{name}", value, str)
    missing = [k for k in ("issuer", "audience", "jwks") if k not in values]
    if missing:
        raise ConfigError(f"{at}: tokens.oidc needs {', '.join(missing)}")
    if not values.get("role_map"):
        raise ConfigError(f"{at}: tokens.oidc.role_map is empty: map at least one "
                          f"{values.get('role_claim', 'groups')} value to a role")
    jwks = values["jwks"]
    if jwks.startswith("http://") and not jwks.startswith(("http://127.", "http://localhost", "http://[::1]")):
        raise ConfigError(f"{at}: tokens.oidc.jwks must be a file or an https URL (plain http only on loopback)")
    return OIDCSettings(**values)


def _scalar(where: Positions, path: tuple, name: str, value, kind: type):
    at = where.value_at(path)
    if isinstance(value, (dict, list)):
        raise ConfigError(f"{at}: {name} must be a single value")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{at}: {name} must be a non-negative whole number, got {value!r}")
        return value
    if value is None:
        raise ConfigError(f"{at}: {name} is empty")
    return str(value)


def _check_semantics(where: Positions, values: dict) -> None:
    if "listen" in values:
        try:
            parse_listen(values["listen"])
        except ConfigError as exc:
            raise ConfigError(f"{where(('listen',))}: {exc}") from None
    if "db" in values and not values["db"].startswith(("sqlite:", "postgresql:", "postgresql+psycopg:", "postgres:")):
        raise ConfigError(f"{where(('db',))}: db must be sqlite:///PATH or postgresql://USER@HOST:PORT/DB")
    oidc = values.get("tokens", {}).get("oidc")
    if oidc is not None and oidc.issuer == values.get("tokens", {}).get("issuer", "warden-collector"):
        raise ConfigError(f"{where(('tokens',))}: tokens.oidc.issuer must differ from tokens.issuer "
                          f"(the collector's own tokens)")
    tls = values.get("tls", {})
    if bool(tls.get("cert")) != bool(tls.get("key")):
        raise ConfigError(f"{where(('tls',))}: tls needs both cert and key")
    for key, sub in (("tokens", "default_ttl"), ("approvals", "timeout"), ("retention", "interval")):
        if sub in values.get(key, {}):
            try:
                parse_duration_ns(values[key][sub])
            except TimeFormatError as exc:
                raise ConfigError(f"{where((key,))}: {key}.{sub}: {exc}") from None
