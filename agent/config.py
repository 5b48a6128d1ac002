"""agent.yaml: parsing and validation with file:line in every error.

A config that fails validation is refused as a whole; the caller keeps whatever it ran
before. Keys and defaults are documented in README.md ("Configuration reference").
"""
from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import socket
from typing import Any, Optional

from agent.yamlpos import Positions, YamlPositionError, load_yaml as _load_yaml

DEFAULT_STATE_DIR = "/var/lib/warden"
DEFAULT_LISTEN_PORT_BASE = 15400
PROTOCOLS = ("postgres", "http", "tcp")
TLS_MODES = ("disable", "prefer", "require", "verify-full")
ON_DOWN = ("refuse", "bypass")
ON_FULL = ("refuse", "block")
IDENTITY_MATCH_KEYS = ("systemd_unit", "cgroup", "exe", "uid", "user", "container", "comm", "claim")


class ConfigError(Exception):
    """One or more problems, each as 'file:line: message'."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def load_yaml(text: str, filename: str) -> tuple[Any, Positions]:
    """agent.yaml's YAML reading: agent.yamlpos with its errors as ConfigError."""
    try:
        return _load_yaml(text, filename)
    except YamlPositionError as exc:
        raise ConfigError([str(exc)]) from None


# ---- the model -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TargetMatch:
    cidrs: tuple[str, ...]
    hostnames: tuple[str, ...]
    port: int


@dataclasses.dataclass(frozen=True)
class TargetConfig:
    name: str
    protocol: str
    match: TargetMatch
    listen_port: int
    upstream_tls: str = "disable"
    upstream_ca: Optional[str] = None
    client_tls: str = "allow"        # postgres: allow | refuse; http: intercept | sni | refuse
    on_enforcer_down: str = "refuse"
    credentials: dict = dataclasses.field(default_factory=dict)
    options: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class IdentityRule:
    name: str
    match: dict
    groups: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class SpoolConfig:
    path: str
    max_bytes: int = 1 << 30
    on_full: str = "refuse"
    flush_interval: float = 0.1     # an event is durable (fsynced) at most this long after it happened


@dataclasses.dataclass(frozen=True)
class CollectorConfig:
    url: Optional[str] = None
    enrollment: Optional[str] = None
    ca: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    source: str
    agent_id: Optional[str]
    state_dir: str
    scope_cgroups: tuple[str, ...]
    targets: tuple[TargetConfig, ...]
    identities: tuple[IdentityRule, ...]
    collector: CollectorConfig
    spool: SpoolConfig
    policy_path: Optional[str]
    masking: dict
    masking_engine: Any
    approvals_timeout: float
    approvals_grant_window: float
    inventory_interval: float
    heartbeat_interval: float
    event_log: Optional[str]          # JSON lines of every event, '-' for stdout, None for off
    listen_host4: str = "127.0.0.1"
    listen_host6: str = "::1"
    on_stop: str = "detach"           # detach | hold: what a stop does with the BPF programs
    stop_drain: float = 5.0           # s a stop waits for sessions to reach an idle point

    def policy_groups(self) -> dict[str, list[str]]:
        """Group name -> the identities in it (`identities[].groups`), as policies see them."""
        groups: dict[str, list[str]] = {}
        for rule in self.identities:
            for group in rule.groups:
                groups.setdefault(group, []).append(rule.name)
        return groups

    def target(self, name: str) -> TargetConfig:
        for t in self.targets:
            if t.name == name:
                return t
        raise KeyError(name)


def _parse_size(value: Any) -> int:
    if isinstance(value, int):
        return value
    text = str(value).strip().upper()
    units = {"K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "MIB": 1 << 20,
             "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30, "T": 1 << 40, "TB": 1 << 40, "TIB": 1 << 40}
    for suffix in sorted(units, key=len, reverse=True):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * units[suffix])
    return int(text)


def _parse_duration(value: Any) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip().lower()
    for suffix, mult in (("ms", 0.001), ("s", 1), ("m", 60), ("h", 3600)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * mult
    return float(text)


# the keys of each top-level mapping (targets, identities and masking are checked where parsed)
_SECTION_KEYS = {
    "agent": ("id", "state_dir", "event_log", "heartbeat_interval", "on_stop", "stop_drain"),
    "collector": ("url", "enrollment", "ca"),
    "scope": ("cgroups",),
    "enforcer": ("listen_port_base",),
    "policy": ("path",),
    "spool": ("path", "max_bytes", "on_full", "flush_interval"),
    "approvals": ("timeout", "grant_window"),
    "inventory": ("interval",),
}


# A target's own options, by protocol: what each enforcer reads from TargetInfo.options.
# Sizes take 64MiB-style units, durations 30s / 500ms; both are stored as numbers.
_SIZE, _DURATION, _COUNT, _FLAG, _TEXT, _TEXTS = "size", "duration", "count", "flag", "text", "texts"
TARGET_OPTIONS = {
    "postgres": {"max_message_bytes": _SIZE, "startup_timeout": _DURATION, "idle_timeout": _DURATION,
                 "catalog_dsn": _TEXT, "max_connections": _COUNT, "durable_before_forward": _FLAG,
                 "durable_timeout": _DURATION},
    "http": {"max_header_bytes": _SIZE, "max_line_bytes": _SIZE, "allow_connect": _FLAG,
             "connect_timeout": _DURATION, "response_timeout": _DURATION, "mask_max_body_bytes": _SIZE,
             "discard_denied_body_bytes": _SIZE, "redact_headers": _TEXTS, "redact_query": _TEXTS,
             "client_hello_timeout": _DURATION, "client_tls_hostname": _TEXT, "client_tls_names": _TEXTS,
             "max_connections": _COUNT, "durable_before_forward": _FLAG, "durable_timeout": _DURATION},
    "tcp": {"max_connections": _COUNT},
}
# options a value of 0 switches off; the others must be positive
_ZERO_ALLOWED = {"idle_timeout", "max_connections", "discard_denied_body_bytes"}


def _target_option(key: str, kind: str, value: Any) -> Any:
    """The option's value as the enforcer uses it; ValueError saying what is wrong."""
    if kind == _FLAG:
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return value
    if kind == _TEXT:
        if not isinstance(value, str) or not value:
            raise ValueError(f"{key} must be a non-empty string, got {value!r}")
        return value
    if kind == _TEXTS:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ValueError(f"{key} must be a list of names, got {value!r}")
        return value
    if isinstance(value, bool):
        raise ValueError(f"{key} must be a number, got {value!r}")
    try:
        number = (_parse_size(value) if kind == _SIZE else _parse_duration(value) if kind == _DURATION
                  else value if isinstance(value, int) else int(str(value)))
    except (TypeError, ValueError):
        example = {_SIZE: "a size such as 64MiB", _DURATION: "a duration such as 30s or 500ms",
                   _COUNT: "a whole number"}[kind]
        raise ValueError(f"{key} must be {example}, got {value!r}") from None
    if math.isnan(number) or number < 0 or (number == 0 and key not in _ZERO_ALLOWED):
        raise ValueError(f"{key} must be {'zero or more' if key in _ZERO_ALLOWED else 'more than zero'}, "
                         f"got {value!r}")
    return number


def parse(text: str, filename: str = "agent.yaml") -> AgentConfig:
    data, where = load_yaml(text, filename)
    problems: list[str] = []

    def err(path: tuple, msg: str) -> None:
        problems.append(f"{where(path)}: {msg}")

    if not isinstance(data, dict):
        raise ConfigError([f"{filename}:1: the top level must be a mapping of keys (agent, scope, targets, ...)"])

    known = {"agent", "collector", "scope", "targets", "identities", "policy", "masking", "spool",
             "approvals", "inventory", "enforcer"}
    for key in data:
        if key not in known:
            err((key,), f"unknown key {key!r} (known: {', '.join(sorted(known))})")
    # a misspelt key would silently leave its default in force (an agent that never enrolls, a
    # spool of the wrong size): every section names what it takes
    for section, keys in _SECTION_KEYS.items():
        value = data.get(section)
        if isinstance(value, dict):
            for key in value:
                if key not in keys:
                    err((section, key), f"unknown key {key!r} in {section} (known: {', '.join(keys)})")

    agent = data.get("agent") or {}
    if not isinstance(agent, dict):
        err(("agent",), "'agent' must be a mapping"); agent = {}
    state_dir = str(agent.get("state_dir", DEFAULT_STATE_DIR))
    agent_id = agent.get("id")
    event_log = agent.get("event_log")

    collector = data.get("collector") or {}
    if not isinstance(collector, dict):
        err(("collector",), "'collector' must be a mapping with url, enrollment, ca"); collector = {}
    url = collector.get("url")
    if url is not None and not str(url).startswith(("http://", "https://")):
        err(("collector", "url"), f"collector.url must start with https:// (or http:// on loopback), got {url!r}")

    scope = data.get("scope") or {}
    if isinstance(scope, list):
        scope = {"cgroups": scope}
    cgroups_list = scope.get("cgroups", ["/"]) if isinstance(scope, dict) else None
    if not isinstance(cgroups_list, list) or not all(isinstance(c, str) for c in cgroups_list):
        err(("scope",), "scope.cgroups must be a list of cgroup paths such as /system.slice/app.service")
        cgroups_list = ["/"]

    enforcer = data.get("enforcer") or {}
    base_port = enforcer.get("listen_port_base", DEFAULT_LISTEN_PORT_BASE) if isinstance(enforcer, dict) else DEFAULT_LISTEN_PORT_BASE

    targets: list[TargetConfig] = []
    raw_targets = data.get("targets") or []
    if not isinstance(raw_targets, list):
        err(("targets",), "'targets' must be a list"); raw_targets = []
    seen_names: set[str] = set()
    used_ports: set[int] = set()
    for i, t in enumerate(raw_targets):
        p = ("targets", i)
        if not isinstance(t, dict):
            err(p, "each target must be a mapping with name, protocol, match"); continue
        name = t.get("name")
        if not name or not isinstance(name, str):
            err(p, "target needs a 'name'"); name = f"target{i}"
        elif name in seen_names:
            err(p + ("name",), f"duplicate target name {name!r}")
        seen_names.add(name)
        protocol = t.get("protocol", "tcp")
        if protocol not in PROTOCOLS:
            err(p + ("protocol",), f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        match = t.get("match") or {}
        if not isinstance(match, dict):
            err(p + ("match",), "match must be a mapping with cidr/hostname and port"); match = {}
        cidrs = match.get("cidr", [])
        cidrs = [cidrs] if isinstance(cidrs, str) else list(cidrs or [])
        for cidr in cidrs:
            try:
                ipaddress.ip_network(str(cidr), strict=False)
            except ValueError:
                err(p + ("match", "cidr"), f"{cidr!r} is not a CIDR such as 10.0.1.0/24 or 2001:db8::/64")
        hostnames = match.get("hostname", [])
        hostnames = [hostnames] if isinstance(hostnames, str) else list(hostnames or [])
        if not cidrs and not hostnames:
            err(p + ("match",), "match needs 'cidr' or 'hostname'")
        port = match.get("port")
        if not isinstance(port, int) or not 0 < port < 65536:
            err(p + ("match", "port"), f"match.port must be a TCP port number, got {port!r}")
            port = 0
        listen_port = t.get("listen_port", base_port + i)
        if not isinstance(listen_port, int) or not 0 < listen_port < 65536:
            err(p + ("listen_port",), f"listen_port must be a TCP port number, got {listen_port!r}")
            listen_port = 0
        elif listen_port in used_ports:
            err(p + ("listen_port",), f"listen_port {listen_port} is used by another target")
        used_ports.add(listen_port)
        tls = t.get("upstream_tls", "disable")
        if isinstance(tls, dict):
            tls_mode, tls_ca = tls.get("mode", "disable"), tls.get("ca")
            for key in sorted(set(tls) - {"mode", "ca"}):
                err(p + ("upstream_tls", key), f"unknown key {key!r} in upstream_tls (known: mode, ca)")
        else:
            tls_mode, tls_ca = tls, t.get("upstream_ca")
        if tls_mode not in TLS_MODES:
            err(p + ("upstream_tls",), f"upstream_tls must be one of {', '.join(TLS_MODES)}, got {tls_mode!r}")
        if tls_mode == "verify-full" and not tls_ca:
            err(p + ("upstream_tls",), "upstream_tls verify-full needs a CA bundle ('ca:')")
        on_down = t.get("on_enforcer_down", "refuse")
        if on_down not in ON_DOWN:
            err(p + ("on_enforcer_down",), f"on_enforcer_down must be refuse or bypass, got {on_down!r}")
        # what a workload that starts TLS towards the enforcer gets: postgres terminates it with the
        # agent CA (allow) or answers 'N'; http intercepts with the agent CA, decides by SNI only, or refuses
        # (the first mode is the default: an HTTP target intercepts only when told to, since
        # interception issues certificates for the names workloads ask for)
        client_tls_modes = {"postgres": ("allow", "refuse"), "http": ("refuse", "intercept", "sni"),
                            "tcp": ("refuse",)}[protocol if protocol in PROTOCOLS else "tcp"]
        client_tls = t.get("client_tls", client_tls_modes[0])
        if client_tls not in client_tls_modes:
            err(p + ("client_tls",), f"client_tls for a {protocol} target must be one of "
                                     f"{', '.join(client_tls_modes)}, got {client_tls!r}")
        creds = t.get("credentials") or {}
        if creds and protocol == "postgres":
            from enforcer.postgres.broker import BrokerConfig, ConfigError as BrokerConfigError
            try:
                BrokerConfig.from_credentials(creds, name)
            except BrokerConfigError as exc:
                err(p + ("credentials",), str(exc))
        elif creds and protocol == "http":
            from enforcer.http.credentials import CredentialError, credential_for
            try:
                credential_for({"credentials": creds})
            except CredentialError as exc:
                err(p + ("credentials",), str(exc))
        elif creds:
            err(p + ("credentials",), "credentials apply to postgres and http targets only")
        options = {k: v for k, v in t.items() if k not in {
            "name", "protocol", "match", "listen_port", "upstream_tls", "upstream_ca", "on_enforcer_down",
            "credentials", "client_tls"}}
        known_options = TARGET_OPTIONS.get(protocol, TARGET_OPTIONS["tcp"])
        for key, value in list(options.items()):
            kind = known_options.get(key)
            if kind is None:
                err(p + (key,), f"unknown key {key!r} for a {protocol} target (known: name, protocol, match, "
                                f"listen_port, upstream_tls, on_enforcer_down, client_tls, credentials, "
                                f"{', '.join(sorted(known_options))})")
                del options[key]
                continue
            try:
                options[key] = _target_option(key, kind, value)
            except ValueError as exc:
                err(p + (key,), str(exc))
                del options[key]
        targets.append(TargetConfig(
            name=name, protocol=protocol if protocol in PROTOCOLS else "tcp",
            match=TargetMatch(tuple(str(c) for c in cidrs), tuple(str(h) for h in hostnames), port),
            listen_port=listen_port, upstream_tls=tls_mode, upstream_ca=tls_ca, client_tls=client_tls,
            on_enforcer_down=on_down, credentials=creds, options=options))

    identities: list[IdentityRule] = []
    raw_ids = data.get("identities") or []
    if not isinstance(raw_ids, list):
        err(("identities",), "'identities' must be a list"); raw_ids = []
    for i, ident in enumerate(raw_ids):
        p = ("identities", i)
        if not isinstance(ident, dict) or not isinstance(ident.get("name"), str):
            err(p, "each identity needs a 'name' and a 'match' mapping"); continue
        for key in ident:
            if key not in ("name", "match", "groups"):
                err(p + (key,), f"unknown key {key!r} in an identity (known: name, match, groups)")
        match = ident.get("match") or {}
        if not isinstance(match, dict) or not match:
            err(p + ("match",), f"identity {ident['name']!r} needs a non-empty 'match'"); continue
        for key in match:
            if key not in IDENTITY_MATCH_KEYS:
                err(p + ("match", key), f"unknown identity match key {key!r} (known: {', '.join(IDENTITY_MATCH_KEYS)})")
        if "uid" in match and not isinstance(match["uid"], int):
            err(p + ("match", "uid"), "uid must be a number")
        groups = ident.get("groups", [])
        identities.append(IdentityRule(ident["name"], dict(match), tuple(groups or ())))

    policy = data.get("policy") or {}
    policy_path = policy.get("path") if isinstance(policy, dict) else policy

    spool = data.get("spool") or {}
    if not isinstance(spool, dict):
        err(("spool",), "'spool' must be a mapping"); spool = {}
    try:
        max_bytes = _parse_size(spool.get("max_bytes", 1 << 30))
    except ValueError:
        err(("spool", "max_bytes"), f"spool.max_bytes must be a size such as 512MiB, got {spool.get('max_bytes')!r}")
        max_bytes = 1 << 30
    try:
        flush_interval = _parse_duration(spool.get("flush_interval", 0.1))
        if not 0.001 <= flush_interval <= 10:
            raise ValueError
    except ValueError:
        err(("spool", "flush_interval"), "spool.flush_interval must be a duration between 1ms and 10s, e.g. 100ms")
        flush_interval = 0.1
    on_full = spool.get("on_full", "refuse")
    if on_full not in ON_FULL:
        err(("spool", "on_full"), f"spool.on_full must be refuse or block, got {on_full!r}")

    approvals = data.get("approvals") or {}
    try:
        approvals_timeout = _parse_duration(approvals.get("timeout", 300) if isinstance(approvals, dict) else 300)
    except ValueError:
        err(("approvals", "timeout"), "approvals.timeout must be a duration such as 5m"); approvals_timeout = 300
    try:
        grant_window = _parse_duration(approvals.get("grant_window", 0) if isinstance(approvals, dict) else 0)
    except ValueError:
        err(("approvals", "grant_window"), "approvals.grant_window must be a duration such as 10m"); grant_window = 0.0
    inventory = data.get("inventory") or {}
    try:
        inventory_interval = _parse_duration(inventory.get("interval", 10) if isinstance(inventory, dict) else 10)
    except ValueError:
        err(("inventory", "interval"), "inventory.interval must be a duration such as 10s"); inventory_interval = 10

    on_stop = agent.get("on_stop", "detach")
    if on_stop not in ("detach", "hold"):
        err(("agent", "on_stop"), f"agent.on_stop must be detach (a stop lets governed connects go direct) "
                                  f"or hold (they are refused until the agent runs again), got {on_stop!r}")
        on_stop = "detach"

    try:
        stop_drain = _parse_duration(agent.get("stop_drain", 5))
        if stop_drain < 0:
            raise ValueError
    except ValueError:
        err(("agent", "stop_drain"), "agent.stop_drain must be a duration such as 5s (0: cut sessions at once)")
        stop_drain = 5.0

    try:
        heartbeat_interval = _parse_duration(agent.get("heartbeat_interval", 30))
    except ValueError:
        err(("agent", "heartbeat_interval"), "agent.heartbeat_interval must be a duration such as 30s")
        heartbeat_interval = 30.0

    masking = data.get("masking") or {}
    masking_engine = None
    if masking:
        from enforcer.masking.config import MaskingConfigError, load_masking
        try:
            masking_engine = load_masking(masking, where=where,
                                          base_dir=os.path.dirname(os.path.abspath(filename)))
        except MaskingConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    return AgentConfig(
        source=filename, agent_id=agent_id, state_dir=state_dir,
        scope_cgroups=tuple(cgroups_list), targets=tuple(targets), identities=tuple(identities),
        collector=CollectorConfig(url, collector.get("enrollment"), collector.get("ca")),
        spool=SpoolConfig(str(spool.get("path", os.path.join(state_dir, "spool"))), max_bytes, on_full,
                          flush_interval),
        policy_path=policy_path, masking=masking if isinstance(masking, dict) else {},
        masking_engine=masking_engine,
        approvals_timeout=approvals_timeout, approvals_grant_window=grant_window,
        inventory_interval=inventory_interval,
        heartbeat_interval=heartbeat_interval,
        event_log=event_log, on_stop=on_stop, stop_drain=stop_drain)


def load(path: str) -> AgentConfig:
    try:
        with open(path) as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError([f"{path}:1: cannot read config: {exc.strerror}"]) from None
    return parse(text, path)


def resolve_target_networks(target: TargetConfig) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """CIDRs as given plus the current addresses of the hostnames (the agent refreshes these)."""
    nets = [ipaddress.ip_network(c, strict=False) for c in target.match.cidrs]
    for host in target.match.hostnames:
        try:
            infos = socket.getaddrinfo(host, target.match.port, proto=socket.IPPROTO_TCP)
        except socket.gaierror:
            continue
        for info in infos:
            ip = info[4][0]
            nets.append(ipaddress.ip_network(ip))
    return nets
