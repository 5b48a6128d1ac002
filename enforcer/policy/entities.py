"""Cedar entities for Warden's model: services, groups, targets, tables and endpoints.

Everything here returns plain JSON-ready dicts; the engine turns them into cedarpy handles.
Attributes are coerced to the schema's types so a surprising value from the identity layer
(a uid as text, a claim as a list) cannot make the entity set invalid.
"""
from __future__ import annotations

import json
import posixpath
from typing import Any, Iterable, Mapping, Optional
from urllib.parse import unquote

_STRING_ATTRS = ("unit", "user", "exe", "host", "container")
_CLAIM_STRINGS = ("sub", "iss")
_CLAIM_SETS = ("aud", "scope", "roles", "groups")


def uid(entity_type: str, entity_id: str) -> dict:
    return {"type": entity_type, "id": entity_id}


def label(entity_type: str, entity_id: str) -> str:
    """How a resource is named in decisions and records: Cedar's own spelling."""
    return f"{entity_type}::{json.dumps(entity_id)}"


def _claim_set(value: Any) -> list[str]:
    if isinstance(value, str):
        return value.split()          # OAuth "scope" is a space-separated string
    if isinstance(value, (list, tuple, set, frozenset)):
        return [str(v) for v in value]
    return [str(value)]


def _claim_tag(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def principal_entity(identity: str, attrs: Optional[Mapping[str, Any]],
                     groups: Iterable[str]) -> dict:
    attrs = attrs or {}
    cedar_attrs: dict[str, Any] = {}
    for name in _STRING_ATTRS:
        value = attrs.get(name)
        if value not in (None, ""):
            cedar_attrs[name] = str(value)
    uid_value = attrs.get("uid")
    if isinstance(uid_value, int) and not isinstance(uid_value, bool):
        cedar_attrs["uid"] = uid_value
    elif isinstance(uid_value, str) and uid_value.isdigit():
        cedar_attrs["uid"] = int(uid_value)
    tags: dict[str, str] = {}
    claims = attrs.get("claims")
    if isinstance(claims, Mapping) and claims:
        record: dict[str, Any] = {}
        for name in _CLAIM_STRINGS:
            if name in claims and claims[name] is not None:
                record[name] = str(claims[name])
        for name in _CLAIM_SETS:
            if name in claims and claims[name] is not None:
                record[name] = _claim_set(claims[name])
        cedar_attrs["claims"] = record
        tags = {str(k): _claim_tag(v) for k, v in claims.items() if v is not None}
    return {
        "uid": uid("Service", identity),
        "attrs": cedar_attrs,
        "parents": [uid("Group", g) for g in groups],
        "tags": tags,
    }


def group_entity(name: str) -> dict:
    return {"uid": uid("Group", name), "attrs": {}, "parents": []}


def target_entity(target: str, protocol: Optional[str] = None) -> dict:
    attrs = {"protocol": protocol} if protocol else {}
    return {"uid": uid("Target", target), "attrs": attrs, "parents": []}


def table_id(target: str, table: str) -> str:
    return f"{target}/{table}"


def table_entity(target: str, table: str) -> dict:
    schema, _, name = table.partition(".")
    return {
        "uid": uid("Table", table_id(target, table)),
        "attrs": {"schema": schema, "name": name},
        "parents": [uid("Target", target)],
    }


def normalize_host(host: str) -> str:
    """Lower-case, no port, no trailing dot; IPv6 keeps its brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def normalize_path(path: str) -> str:
    """The path a server will most likely serve: no query, decoded, dot segments resolved.

    Decoding before resolving means `/v1/public/%2e%2e/admin` is judged as `/v1/admin`.
    """
    path = path.split("#", 1)[0].split("?", 1)[0]
    path = unquote(path)
    if not path.startswith("/"):
        path = "/" + path
    normalized = posixpath.normpath(path)
    if normalized.startswith("//"):   # normpath keeps a leading double slash (POSIX rule)
        normalized = "/" + normalized.lstrip("/")
    return normalized


def endpoint_entities(target: str, host: str, path: str) -> tuple[str, list[dict]]:
    """The endpoint's id and its ancestry: target/host/ -> target/host/a -> target/host/a/b."""
    root_id = f"{target}/{host}/"
    entities = [{
        "uid": uid("Endpoint", root_id),
        "attrs": {"host": host, "path": "/"},
        "parents": [uid("Target", target)],
    }]
    parent_id, prefix = root_id, ""
    for segment in [s for s in path.split("/") if s]:
        prefix += "/" + segment
        entity_id = f"{target}/{host}{prefix}"
        entities.append({
            "uid": uid("Endpoint", entity_id),
            "attrs": {"host": host, "path": prefix},
            "parents": [uid("Endpoint", parent_id)],
        })
        parent_id = entity_id
    return parent_id, entities
