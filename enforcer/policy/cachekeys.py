"""What a cached policy answer depends on besides the request itself, shared by the enforcers'
per-connection decision memos: the policy (object and version), the principal, the target and
the hour (policies may depend on the time of day; the engine's own caches are per hour too)."""
from __future__ import annotations

import itertools
import time


def _frozen(value):
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple, set, frozenset)):
        return tuple(_frozen(v) for v in value)
    return value


# principal (identity, frozen attributes) -> a number that stands for it in cache keys, so the
# keys hash a small int instead of the whole attribute tuple on every lookup; numbers are never
# reused, so clearing the table only orphans old cache entries (the LRU evicts them)
_principal_ids: dict = {}
_principal_counter = itertools.count(1)
PRINCIPAL_IDS_MAX = 100_000


def principal_key(ctx) -> int:
    """The identity with its attributes, as a number: policies may read any attribute (unit,
    user, token claims), so two connections of one identity name can be decided differently.
    Kept on the context until its identity or attributes are replaced (brokered login does that)."""
    memo = ctx.extra.get("principal_key")
    if memo is not None and memo[0] is ctx.identity_attrs and memo[1] == ctx.identity:
        return memo[2]
    principal = (ctx.identity, _frozen(ctx.identity_attrs or {}))
    number = _principal_ids.get(principal)
    if number is None:
        if len(_principal_ids) >= PRINCIPAL_IDS_MAX:
            _principal_ids.clear()
        number = _principal_ids[principal] = next(_principal_counter)
    ctx.extra["principal_key"] = (ctx.identity_attrs, ctx.identity, number)
    return number


_policy_numbers = itertools.count(1)


def policy_key(policy) -> int:
    """A number for this policy object that no other object ever gets. Not id(): a freed object's
    id is given to the next one, and the process-wide caches would serve a replaced policy's
    answers (an allow where the new one wants an approval) to a new policy built at its address."""
    number = getattr(policy, "_warden_cache_number", None)
    if number is None:
        number = next(_policy_numbers)
        policy._warden_cache_number = number
    return number


def cache_base(ctx, policy) -> tuple:
    """The key prefix of every cached answer for this connection; when it changes (new policy
    or version, other principal, next hour) what was cached under the old one is stale."""
    return (policy_key(policy), getattr(policy, "version", None), principal_key(ctx), ctx.target.name,
            int(time.time() // 3600))


def base_guard(ctx, policy, base: tuple) -> tuple:
    """What `base` (cache_base of ctx and policy) was made of, for a check that needs no Python:
    (ctx, policy, its version, ctx.identity_attrs, ctx.identity, end of the base's hour). The C
    client lane (_pglanes memo_lookup) answers from a memo keyed on `base` only while ctx.policy is
    that object with that version, ctx.identity_attrs that object, ctx.identity equal and the wall
    clock before that end; the target is fixed per connection. A new input of cache_base must
    be added here and to that check."""
    return (ctx, policy, getattr(policy, "version", None), ctx.identity_attrs, ctx.identity,
            float((base[-1] + 1) * 3600))
