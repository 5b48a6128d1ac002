"""Decide SQL statements and HTTP requests against Cedar policies, with caches.

A decision is allow, deny, or approval. A `forbid` annotated `@approval("required")`
that matches while `context.approved` is false asks for approval instead of denying, but
only when approving would actually let the request through; any other forbid denies;
no matching permit denies. A statement touching several tables must be allowed on each
(the per-table accesses come from enforcer.sqlclass); a statement without tables is
decided on its Target.

Costs (see bench/policy.py): one cedarpy call costs tens of microseconds whatever the
policy, so three caches keep it off the hot path:
  1. message cache: (principal, target, exact text, approved, hour) -> decisions;
  2. statement cache: (principal, target, classification signature incl. the pglast
     fingerprint, statement count, approved, hour) -> decision; a new text of a known
     shape (other constants) costs a parse but no Cedar call. The signature is needed on
     top of the fingerprint because the fingerprint ignores constants that matter
     (`SET search_path` vs `SET application_name`, `EXECUTE a` vs `EXECUTE b`);
  3. classification by text (enforcer.sqlclass.ClassificationCache).
A reload builds a new engine, so every cache starts empty.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from typing import Any, Callable, Collection, Iterable, Mapping, Optional

import cedarpy

from enforcer.sqlclass import (
    DEFAULT_DANGEROUS, ClassificationCache, SqlClassifier, StatementClass,
)

from . import entities as ent
from .loader import LoadedPolicies, load_policies, load_policy_texts

ALLOW, DENY, APPROVAL = "allow", "deny", "approval"
_NOTHING_APPLIES = cedarpy.AuthzResult({"decision": "Deny", "diagnostics": {"reason": [], "errors": []}})
HTTP_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE", "TRACE", "CONNECT"})
_PRINCIPAL_VARIANTS = 16      # distinct attribute sets remembered per identity
_MAX_REMEMBERED_TABLES = 1000  # per principal and target; beyond, tables are added per request


@dataclass(frozen=True)
class Decision:
    kind: str                            # allow | deny | approval
    action: str
    policy_ids: tuple[str, ...]
    reason: str
    resources: tuple[str, ...] = ()

    @property
    def allowed(self) -> bool:
        return self.kind == ALLOW


@dataclass(frozen=True)
class StatementDecision:
    statement: StatementClass
    decision: Decision


def _action_ancestors(schema: "cedarpy.Schema") -> dict[str, frozenset[str]]:
    """Action -> the action groups it is in (transitively), from the schema's action entities."""
    parents: dict[str, list[str]] = {}
    for entity in json.loads(str(cedarpy.Entities.from_json_str("[]", schema))):
        if entity["uid"]["type"] == "Action":
            parents[entity["uid"]["id"]] = [p["id"] for p in entity.get("parents", [])]
    ancestors: dict[str, frozenset[str]] = {}
    for action in parents:
        seen: set[str] = set()
        stack = list(parents[action])
        while stack:
            group = stack.pop()
            if group not in seen:
                seen.add(group)
                stack.extend(parents.get(group, ()))
        ancestors[action] = frozenset(seen)
    return ancestors


def _scope_may_match(scope: dict, entity_type: str, entity_id: str, ancestors: Iterable[tuple[str, str]]) -> bool:
    """False only when a policy's principal/action scope certainly excludes this entity."""
    op = scope.get("op")
    if op == "All":
        return True
    me = (entity_type, entity_id)
    if op == "==":
        target = scope.get("entity", {})
        return (target.get("type"), target.get("id")) == me
    if op == "in":
        members = {me, *ancestors}
        if "entity" in scope:
            return (scope["entity"].get("type"), scope["entity"].get("id")) in members
        return any((e.get("type"), e.get("id")) in members for e in scope.get("entities", []))
    if op == "is":
        if scope.get("entity_type") != entity_type:
            return False
        inner = scope.get("in")
        if inner:
            return _scope_may_match({"op": "in", **inner}, entity_type, entity_id, ancestors)
        return True
    return True   # a scope form this code does not know: keep the policy


class _EntityBase:
    __slots__ = ("handle", "tables")

    def __init__(self, handle: "cedarpy.Entities"):
        self.handle = handle
        self.tables: set[str] = set()


class _Principal:
    """One identity with one set of attributes, and its Cedar entities per target."""

    __slots__ = ("identity", "attrs", "entity", "groups", "bases", "slices")

    def __init__(self, identity: str, attrs: Mapping[str, Any], entity: dict, groups: Iterable[str]):
        self.identity = identity
        self.attrs = attrs
        self.entity = entity
        self.groups = tuple(groups)
        self.bases: dict[str, _EntityBase] = {}
        # action -> (the policies that can apply to this principal and action, whether they
        # read the context); None when no policy can apply
        self.slices: dict[str, Optional[tuple[cedarpy.PolicySet, bool]]] = {}


class _BoundedCache(dict):
    """A dict that forgets its oldest tenth when full (no per-hit bookkeeping)."""

    def __init__(self, max_entries: int):
        super().__init__()
        self.max_entries = max_entries

    def put(self, key, value) -> None:
        if len(self) >= self.max_entries:
            for old in list(self)[: max(1, self.max_entries // 10)]:
                del self[old]
        self[key] = value


class PolicyEngine:
    def __init__(self, loaded: LoadedPolicies, groups: Optional[Mapping[str, Iterable[str]]] = None,
                 dangerous_functions: frozenset[str] = DEFAULT_DANGEROUS,
                 context_headers: Iterable[str] = (),
                 known_identities: Optional[Collection[str]] = None,
                 cache_size: int = 50_000,
                 clock: Callable[[], float] = time.time):
        self.loaded = loaded
        self.dangerous_functions = frozenset(dangerous_functions)
        self.context_headers = tuple(h.lower() for h in context_headers)
        self.known_identities = frozenset(known_identities) if known_identities is not None else None
        self._clock = clock
        self._groups_of: dict[str, list[str]] = {}
        for group, members in (groups or {}).items():
            for member in members:
                self._groups_of.setdefault(member, []).append(group)
        self._group_entities = [ent.group_entity(g) for g in sorted(groups or {})]
        self._action_ancestors = _action_ancestors(loaded.schema)
        self._principals: dict[str, list[_Principal]] = {}
        self._messages = _BoundedCache(cache_size)
        self._statements = _BoundedCache(cache_size)
        self._http = _BoundedCache(cache_size)
        self.classifications = ClassificationCache(self.dangerous_functions, cache_size)
        self._stats = {"message_hits": 0, "message_misses": 0, "statement_hits": 0,
                       "statement_misses": 0, "http_hits": 0, "http_misses": 0,
                       "cedar_requests": 0, "cedar_calls": 0}

    # -- construction ------------------------------------------------------------------
    @classmethod
    def from_files(cls, policy_path: str, schema_path: Optional[str] = None,
                   groups: Optional[Mapping[str, Iterable[str]]] = None,
                   dangerous_functions: frozenset[str] = DEFAULT_DANGEROUS, **options: Any) -> "PolicyEngine":
        """Raises PolicyError (file, line, reason) when a file does not parse or validate."""
        return cls(load_policies(policy_path, schema_path), groups, dangerous_functions, **options)

    @classmethod
    def from_text(cls, policy_text: str, schema_path: Optional[str] = None, source: str = "<policy>",
                  **options: Any) -> "PolicyEngine":
        return cls(load_policy_texts([(source, policy_text)], schema_path), **options)

    def new_session_classifier(self, known: Optional[Mapping[str, str]] = None) -> SqlClassifier:
        """A classifier for one client session, sharing this engine's classification cache;
        `known`: the session's prepared statements (name -> text), which EXECUTE resolves to."""
        return SqlClassifier(cache=self.classifications, known=known)

    # -- SQL ---------------------------------------------------------------------------
    def decide_sql(self, identity: str, identity_attrs: Optional[dict], target: str, sql: str,
                   approved: bool = False, classifier: Optional[SqlClassifier] = None) -> list[StatementDecision]:
        now = self._clock()
        hour_index = int(now // 3600)
        principal = self._principal(identity, identity_attrs)
        key = (principal or identity, target, sql, approved, hour_index)
        # with a session's classifier the text alone does not say what runs (EXECUTE)
        found = self._messages.get(key) if classifier is None else None
        if found is not None:
            self._stats["message_hits"] += 1
            return list(found)
        self._stats["message_misses"] += 1

        if classifier is not None:
            statements = classifier.classify(sql)
            session_dependent = classifier.depends_on_session(statements)
        else:
            statements = list(self.classifications.classify(sql))
            session_dependent = False
        count = len(statements)
        decisions = []
        for statement in statements:
            if principal is None:
                decision = _unknown_identity(identity, statement.action)
            else:
                decision = self._decide_statement(principal, target, statement, count, approved,
                                                  hour_index, int(now // 3600 % 24))
            decisions.append(StatementDecision(statement, decision))
        if not session_dependent:
            self._messages.put(key, tuple(decisions))
        return decisions

    def decide_connect(self, identity: str, identity_attrs: Optional[dict], target: str) -> Decision:
        """pg:connect on the Target (the startup message, before any statement)."""
        principal = self._principal(identity, identity_attrs)
        if principal is None:
            return _unknown_identity(identity, "pg:connect")
        now = self._clock()
        context = _pg_context(StatementClass(action="pg:connect", kind="Connect"), 0, False, int(now // 3600 % 24))
        requests = [_request(principal.identity, "pg:connect", "Target", target, context)]
        return self._evaluate(principal, self._entities(principal, target), "pg:connect", requests, None)

    def _decide_statement(self, principal: _Principal, target: str, statement: StatementClass,
                          count: int, approved: bool, hour_index: int, hour: int) -> Decision:
        key = (principal, target, statement.signature(), count, approved, hour_index)
        found = self._statements.get(key)
        if found is not None:
            self._stats["statement_hits"] += 1
            return found
        self._stats["statement_misses"] += 1
        context = _pg_context(statement, count, approved, hour)
        requests, tables = [], []
        access_actions = set()
        for action, table in statement.accesses:
            access_actions.add(action)
            tables.append(table)
            requests.append(_request(principal.identity, action, "Table", ent.table_id(target, table), context))
        if statement.action not in access_actions:
            requests.append(_request(principal.identity, statement.action, "Target", target, context))
        entities = self._entities(principal, target, dict.fromkeys(tables))
        decision = self._evaluate(principal, entities, statement.action, requests, statement.parse_error)
        self._statements.put(key, decision)
        return decision

    # -- HTTP --------------------------------------------------------------------------
    def decide_http(self, identity: str, identity_attrs: Optional[dict], target: str, method: str,
                    host: str, path: str, headers: Optional[Mapping[str, str]] = None,
                    approved: bool = False) -> Decision:
        now = self._clock()
        hour_index = int(now // 3600)
        principal = self._principal(identity, identity_attrs)
        method = method.upper()
        action = f"http:{method}" if method in HTTP_METHODS else "http:OTHER"
        header_values = self._header_values(headers) if self.context_headers else ()
        key = (principal or identity, target, action, host, path, header_values, approved, hour_index)
        found = self._http.get(key)
        if found is not None:
            self._stats["http_hits"] += 1
            return found
        self._stats["http_misses"] += 1
        if principal is None:
            decision = _unknown_identity(identity, action)
        else:
            clean_host, clean_path = ent.normalize_host(host), ent.normalize_path(path)
            endpoint_id, extra = ent.endpoint_entities(target, clean_host, clean_path)
            context = {"method": method, "host": clean_host, "path": clean_path,
                       "headers": list(header_values), "hour": int(now // 3600 % 24), "approved": approved}
            requests = [_request(principal.identity, action, "Endpoint", endpoint_id, context)]
            entities = self._entities(principal, target, extra=extra)
            decision = self._evaluate(principal, entities, action, requests, None)
        self._http.put(key, decision)
        return decision

    def _header_values(self, headers: Optional[Mapping[str, str]]) -> tuple[str, ...]:
        if not headers:
            return ()
        lowered = {str(k).lower(): v for k, v in headers.items()}
        return tuple(f"{name}={lowered[name]}" for name in self.context_headers if name in lowered)

    # -- Cedar -------------------------------------------------------------------------
    def _principal(self, identity: Optional[str], attrs: Optional[Mapping[str, Any]]) -> Optional[_Principal]:
        if not identity or (self.known_identities is not None and identity not in self.known_identities):
            return None
        attrs = attrs if attrs is not None else {}
        variants = self._principals.get(identity)
        if variants is not None:
            for principal in variants:
                if principal.attrs == attrs:
                    return principal
        else:
            variants = self._principals[identity] = []
        groups = self._groups_of.get(identity, ())
        principal = _Principal(identity, copy.deepcopy(dict(attrs)),
                               ent.principal_entity(identity, attrs, groups), groups)
        if len(variants) >= _PRINCIPAL_VARIANTS:
            del variants[0]
        variants.append(principal)
        return principal

    def _entities(self, principal: _Principal, target: str, tables: Iterable[str] = (),
                  extra: Iterable[dict] = ()) -> "cedarpy.Entities":
        """The principal, its groups, the target, the given tables and extra entities.

        Tables are added to the principal's per-target entity set and kept there (a
        database has a bounded number of tables), so a warm engine parses no entities.
        """
        base = principal.bases.get(target)
        if base is None:
            document = [principal.entity, *self._group_entities, ent.target_entity(target)]
            # with the schema, Cedar adds the action entities (needed for action groups)
            base = _EntityBase(cedarpy.Entities.from_json_str(json.dumps(document), self.loaded.schema))
            principal.bases[target] = base
        missing = [t for t in tables if t not in base.tables]
        if missing:
            delta = json.dumps([ent.table_entity(target, t) for t in missing])
            if len(base.tables) + len(missing) <= _MAX_REMEMBERED_TABLES:
                base.handle = base.handle.with_added_json_str(delta)
                base.tables.update(missing)
            else:
                extra = [*extra, *(ent.table_entity(target, t) for t in missing)]
        extra = list(extra)
        if not extra:
            return base.handle
        return base.handle.with_added_json_str(json.dumps(extra))

    def _slice(self, principal: _Principal, action: str) -> Optional[tuple["cedarpy.PolicySet", bool]]:
        """Only the policies whose scope can match: Cedar's cost grows with the policy count."""
        if action in principal.slices:
            return principal.slices[action]
        principal_ancestors = [("Group", g) for g in principal.groups]
        action_ancestors = [("Action", a) for a in self._action_ancestors.get(action, ())]
        chosen = {
            cedar_id: policy for cedar_id, policy in self.loaded.est.items()
            if _scope_may_match(policy.get("principal", {"op": "All"}), "Service", principal.identity,
                                principal_ancestors)
            and _scope_may_match(policy.get("action", {"op": "All"}), "Action", action, action_ancestors)
        }
        sliced = None
        if chosen:   # the Cedar JSON form keeps the ids (policy0, ...) that name policies
            policies = cedarpy.PolicySet.from_json_str(json.dumps(
                {"staticPolicies": chosen, "templates": {}, "templateLinks": []}))
            # cedarpy spends most of a request converting the context: skip it when unused
            uses_context = '{"Var": "context"}' in json.dumps(list(chosen.values()))
            sliced = (policies, uses_context)
        principal.slices[action] = sliced
        return sliced

    def _authorize(self, principal: _Principal, requests: list[dict], entities: "cedarpy.Entities") -> list:
        results: list = [None] * len(requests)
        by_action: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            by_action.setdefault(request["action"]["id"], []).append(index)
        for action, indexes in by_action.items():
            sliced = self._slice(principal, action)
            if sliced is None:
                for index in indexes:
                    results[index] = _NOTHING_APPLIES
                continue
            policies, uses_context = sliced
            batch = [requests[i] for i in indexes]
            if not uses_context:
                batch = [{k: v for k, v in r.items() if k != "context"} for r in batch]
            self._stats["cedar_calls"] += 1
            self._stats["cedar_requests"] += len(indexes)
            answers = cedarpy.is_authorized_batch(batch, policies, entities)
            for index, answer in zip(indexes, answers):
                results[index] = answer
        return results

    def _evaluate(self, principal: _Principal, entities: "cedarpy.Entities", action: str,
                  requests: list[dict], parse_error: Optional[str]) -> Decision:
        results = self._authorize(principal, requests, entities)
        resources = tuple(_resource_label(r) for r in requests)
        names = self.loaded.names
        permits: list[str] = []
        denials: list[tuple[str, list[str]]] = []      # (resource, forbid ids) or no permit (empty)
        approvals: list[tuple[dict, list[str]]] = []
        for request, result in zip(requests, results):
            diagnostics = result.diagnostics
            reasons = list(diagnostics.reasons)
            if diagnostics.errors:
                # a policy that fails to evaluate might have been a forbid: fail closed
                return Decision(DENY, action, tuple(names.get(r, r) for r in reasons),
                                "policy evaluation error: " + "; ".join(map(str, diagnostics.errors)),
                                resources)
            if result.allowed:
                permits.extend(reasons)
            elif reasons and all(r in self.loaded.approval for r in reasons) \
                    and not request["context"]["approved"]:
                approvals.append((request, reasons))
            else:
                denials.append((_resource_label(request), reasons))
        if not denials and approvals:
            # approval only makes sense if an approved request would then be permitted
            retry = [dict(r, context=dict(r["context"], approved=True)) for r, _ in approvals]
            for (request, forbids), result in zip(approvals, self._authorize(principal, retry, entities)):
                if not result.allowed:
                    denials.append((_resource_label(request), list(result.diagnostics.reasons)))
        if denials:
            return _denial(action, denials, names, resources, parse_error)
        if approvals:
            ids = _names(names, (r for _, forbids in approvals for r in forbids))
            what = ", ".join(_resource_label(r) for r, _ in approvals)
            return Decision(APPROVAL, action, ids, f"{action} on {what} requires approval ({', '.join(ids)})",
                            resources)
        ids = _names(names, permits)
        return Decision(ALLOW, action, ids, f"permitted by {', '.join(ids)}", resources)

    def clear_caches(self) -> None:
        """Forget every cached decision and classification (principals' entities stay)."""
        self._messages.clear()
        self._statements.clear()
        self._http.clear()
        self.classifications.clear()

    def cache_stats(self) -> dict:
        stats = dict(self._stats)
        stats.update(
            message_entries=len(self._messages), statement_entries=len(self._statements),
            http_entries=len(self._http), classification_hits=self.classifications.hits,
            classification_misses=self.classifications.misses,
            principals=sum(len(v) for v in self._principals.values()),
        )
        return stats


def _names(names: Mapping[str, str], cedar_ids: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names.get(i, i) for i in cedar_ids))


def _denial(action: str, denials: list[tuple[str, list[str]]], names: Mapping[str, str],
            resources: tuple[str, ...], parse_error: Optional[str]) -> Decision:
    forbidden = [(res, ids) for res, ids in denials if ids]
    if forbidden:
        ids = _names(names, (i for _, group in forbidden for i in group))
        where = ", ".join(res for res, _ in forbidden)
        reason = f"{action} on {where} forbidden by {', '.join(ids)}"
    else:
        ids = ()
        reason = f"no policy permits {action} on {', '.join(res for res, _ in denials)}"
    if parse_error:
        reason += f" (the statement did not parse: {parse_error})"
    return Decision(DENY, action, ids, reason, resources)


def _unknown_identity(identity: Optional[str], action: str) -> Decision:
    who = f"identity {identity!r}" if identity else "a connection with no identity"
    return Decision(DENY, action, (), f"{who} is not known to the policy: denied")


def _request(identity: str, action: str, resource_type: str, resource_id: str, context: dict) -> dict:
    return {
        "principal": ent.uid("Service", identity),
        "action": ent.uid("Action", action),
        "resource": ent.uid(resource_type, resource_id),
        "context": context,
    }


def _resource_label(request: dict) -> str:
    resource = request["resource"]
    return ent.label(resource["type"], resource["id"])


def _pg_context(statement: StatementClass, count: int, approved: bool, hour: int) -> dict:
    return {
        "statement_kind": statement.kind,
        "statement_count": count,
        "has_where": bool(statement.has_where),
        "locks_rows": statement.locks_rows,
        "functions": list(statement.functions),
        "dangerous_functions": list(statement.dangerous_functions),
        "parse_error": statement.parse_error is not None,
        "hour": hour,
        "approved": approved,
    }
