"""collector.yaml: load, validate, and report mistakes with their line number."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from collector.timeparse import TimeFormatError, parse_duration_ns

DEFAULT_STATE_DIR = "/var/lib/warden-collector"
DEFAULT_LISTEN = "127.0.0.1:8443"


class ConfigError(Exception):
    """A configuration mistake; the message names the file, line and fix."""


@dataclass
class TokenSettings:
    issuer: str = "warden-collector"
    audience: str = "warden-api"
    default_ttl: str = "8h"


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
    approval_timeout: str = "15m"
    webhook: WebhookSettings = field(default_factory=WebhookSettings)
    source: str = "<defaults>"

    @property
    def database_url(self) -> str:
        if self.db:
            return self.db
        return "sqlite:///" + str(Path(self.state_dir) / "collector.db")

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
    "tokens": (dict, {"issuer": str, "audience": str, "default_ttl": str}),
    "retention": (dict, {"days": int}),
    "approvals": (dict, {"timeout": str}),
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
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{file}:{mark.line + 1}" if mark else str(file)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: not valid YAML: {problem}") from None
    config = CollectorConfig(source=str(file))
    if root is None:
        return config
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(f"{file}:{root.start_mark.line + 1}: the top level must be a mapping of keys")
    values = _validate(file, root)
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
    )
    config.retention_days = values.get("retention", {}).get("days")
    config.approval_timeout = values.get("approvals", {}).get("timeout", "15m")
    hook = values.get("webhook", {})
    config.webhook = WebhookSettings(url=hook.get("url"), secret=hook.get("secret"))
    return config


def _validate(file: Path, root: yaml.MappingNode) -> dict:
    values: dict = {}
    for key_node, value_node in root.value:
        key, line = key_node.value, key_node.start_mark.line + 1
        if key not in _SCHEMA:
            raise ConfigError(f"{file}:{line}: unknown key {key!r}; known keys: {', '.join(_SCHEMA)}")
        kind, sub = _SCHEMA[key]
        if sub is None:
            values[key] = _scalar(file, key, value_node, kind)
            continue
        if not isinstance(value_node, yaml.MappingNode):
            raise ConfigError(f"{file}:{value_node.start_mark.line + 1}: {key!r} must be a mapping "
                              f"with keys {', '.join(sub)}")
        section: dict = {}
        for sub_key_node, sub_value_node in value_node.value:
            sub_key = sub_key_node.value
            if sub_key not in sub:
                raise ConfigError(f"{file}:{sub_key_node.start_mark.line + 1}: unknown key "
                                  f"{key}.{sub_key}; known: {', '.join(sub)}")
            section[sub_key] = _scalar(file, f"{key}.{sub_key}", sub_value_node, sub[sub_key])
        values[key] = section
    _check_semantics(file, root, values)
    return values


def _scalar(file: Path, name: str, node: yaml.Node, kind: type):
    line = node.start_mark.line + 1
    if not isinstance(node, yaml.ScalarNode):
        raise ConfigError(f"{file}:{line}: {name} must be a single value")
    value = yaml.safe_load(yaml.serialize(node))
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{file}:{line}: {name} must be a non-negative whole number, got {node.value!r}")
        return value
    if value is None:
        raise ConfigError(f"{file}:{line}: {name} is empty")
    return str(value)


def _check_semantics(file: Path, root: yaml.MappingNode, values: dict) -> None:
    lines = {k.value: k.start_mark.line + 1 for k, _ in root.value}
    if "listen" in values:
        try:
            parse_listen(values["listen"])
        except ConfigError as exc:
            raise ConfigError(f"{file}:{lines['listen']}: {exc}") from None
    if "db" in values and not values["db"].startswith(("sqlite:", "postgresql:", "postgresql+psycopg:", "postgres:")):
        raise ConfigError(f"{file}:{lines['db']}: db must be sqlite:///PATH or postgresql://USER@HOST:PORT/DB")
    tls = values.get("tls", {})
    if bool(tls.get("cert")) != bool(tls.get("key")):
        raise ConfigError(f"{file}:{lines['tls']}: tls needs both cert and key")
    for key, sub in (("tokens", "default_ttl"), ("approvals", "timeout")):
        if sub in values.get(key, {}):
            try:
                parse_duration_ns(values[key][sub])
            except TimeFormatError as exc:
                raise ConfigError(f"{file}:{lines[key]}: {key}.{sub}: {exc}") from None
