"""The Postgres enforcer's decision caches: by exact text, by statement shape, per principal."""
from __future__ import annotations

from types import SimpleNamespace

from enforcer.context import ConnectionContext, TargetInfo
from enforcer.policy.engine import PolicyEngine
from enforcer.postgres.proxy import CACHED_SHAPE, CACHED_TEXT, DECIDED, decide_now

POLICY = """
@id("app-user-reads")
permit (principal == Service::"svc", action == Action::"pg:select", resource in Target::"db")
when { principal has user && principal.user == "app" };
"""


def _ctx(policy, user: str) -> ConnectionContext:
    target = TargetInfo(name="db", protocol="postgres", upstream_host="127.0.0.2", upstream_port=5432)
    return ConnectionContext(session_id="s", identity="svc", identity_attrs={"user": user}, target=target,
                             attribution=None, sink=None, policy=policy)


def _decide(ctx, sql):
    return decide_now(ctx, sql)


def test_same_identity_with_other_attributes_is_decided_again():
    """Bug fix: the shared cache was keyed by identity name only, so a connection whose
    attributes a policy rejects got the verdict cached for another one."""
    policy = PolicyEngine.from_text(POLICY)
    allowed, how = _decide(_ctx(policy, "app"), "SELECT * FROM accounts WHERE id = 1")
    assert allowed[0].allowed and how == DECIDED
    denied, how = _decide(_ctx(policy, "intruder"), "SELECT * FROM accounts WHERE id = 1")
    assert not denied[0].allowed and how == DECIDED
    denied, how = _decide(_ctx(policy, "intruder"), "SELECT * FROM accounts WHERE id = 2")
    assert not denied[0].allowed and how == CACHED_SHAPE


def test_new_constants_reuse_the_shape_and_keep_their_own_text():
    policy = PolicyEngine.from_text(POLICY)
    ctx = _ctx(policy, "app")
    first, how = _decide(ctx, "SELECT balance FROM accounts WHERE id = 1;")
    assert how == DECIDED
    second, how = _decide(ctx, "SELECT balance FROM accounts WHERE id = 99;")
    assert how == CACHED_SHAPE
    assert second[0].text == "SELECT balance FROM accounts WHERE id = 99"
    assert (second[0].allowed, second[0].tables, second[0].policy_ids) == (True, ("public.accounts",), ("app-user-reads",))
    again, how = _decide(ctx, "SELECT balance FROM accounts WHERE id = 1;")
    assert how == CACHED_TEXT and again == first


def test_shape_reuse_never_crosses_tables_or_kinds():
    policy = PolicyEngine.from_text(POLICY)
    ctx = _ctx(policy, "app")
    _decide(ctx, "SELECT * FROM accounts WHERE id = 1")
    other_schema, how = _decide(ctx, "SELECT * FROM private.accounts WHERE id = 1")
    assert how == DECIDED and other_schema[0].tables == ("private.accounts",)
    write, how = _decide(ctx, "DELETE FROM accounts WHERE id = 1")
    assert how == DECIDED and not write[0].allowed
    # utility statements read their constants: decided each time
    _decide(ctx, "SET search_path = 'a'")
    _, how = _decide(ctx, "SET search_path = 'b'")
    assert how == DECIDED


def _decide_fast(conn, sql):
    """conn._decide_inline(sql), and whether a memo or the shared cache answered (the policy was
    not asked): decide_now was not called, or answered from the cache."""
    from enforcer.postgres import proxy
    asked = []
    real = proxy.decide_now

    def watching(*args, **kwargs):
        verdicts, how = real(*args, **kwargs)
        asked.append(how)
        return verdicts, how
    proxy.decide_now = watching
    try:
        verdicts = conn._decide_inline(sql)
    finally:
        proxy.decide_now = real
    return verdicts, not asked or asked[0] != proxy.DECIDED


def _connection(ctx):
    from enforcer.postgres.proxy import _Connection
    conn = object.__new__(_Connection)      # only the decision state, no sockets
    conn.ctx, conn._verdicts, conn._shape_verdicts, conn._verdicts_key = ctx, {}, {}, None
    conn.session = SimpleNamespace(shape_memo=None)     # where the shell keeps the C lane's memo
    return conn


def test_connection_keeps_shape_verdicts_and_drops_them_when_the_principal_changes():
    from enforcer.postgres.proxy import decision_cache
    policy = PolicyEngine.from_text(POLICY)
    ctx = _ctx(policy, "app")
    conn = _connection(ctx)
    first, cached = _decide_fast(conn, "SELECT balance FROM accounts WHERE id = 1")
    assert first[0].allowed and not cached
    second, cached = _decide_fast(conn, "SELECT balance FROM accounts WHERE id = 2")
    assert second[0].allowed and cached
    decision_cache._entries.clear()         # from now on only the connection's own memo knows
    third, cached = _decide_fast(conn, "SELECT balance FROM accounts WHERE id = 3")
    assert cached and third[0].allowed and third[0].text == "SELECT balance FROM accounts WHERE id = 3"
    assert third[0].policy_ids == ("app-user-reads",)
    # brokered login replaces the attributes: the memo must not answer for the new principal
    ctx.identity_attrs = {"user": "intruder"}
    fourth, cached = _decide_fast(conn, "SELECT balance FROM accounts WHERE id = 4")
    assert not fourth[0].allowed and not cached


def test_connection_shape_memo_never_answers_for_another_table_or_kind():
    policy = PolicyEngine.from_text(POLICY)
    conn = _connection(_ctx(policy, "app"))
    for sql in ("SELECT * FROM accounts WHERE id = 1", "SELECT * FROM accounts WHERE id = 2"):
        _decide_fast(conn, sql)
    other, _ = _decide_fast(conn, "SELECT * FROM private.accounts WHERE id = 3")
    assert other[0].tables == ("private.accounts",)
    write, _ = _decide_fast(conn, "DELETE FROM accounts WHERE id = 3")
    assert not write[0].allowed


def test_principal_numbers_tell_attribute_sets_apart_and_survive_a_full_table(monkeypatch):
    from enforcer.policy import cachekeys
    policy = PolicyEngine.from_text(POLICY)
    app, again, intruder = _ctx(policy, "app"), _ctx(policy, "app"), _ctx(policy, "intruder")
    assert cachekeys.principal_key(app) == cachekeys.principal_key(again) != cachekeys.principal_key(intruder)
    before = cachekeys.principal_key(intruder)
    monkeypatch.setattr(cachekeys, "PRINCIPAL_IDS_MAX", 0)     # the next new principal empties the table
    newcomer = _ctx(policy, "newcomer")
    assert cachekeys.principal_key(newcomer) not in (before, cachekeys.principal_key(app))
    # a context that learned its number before the table was emptied keeps it; a fresh one
    # for the same principal gets a new number, never another principal's
    assert cachekeys.principal_key(_ctx(policy, "intruder")) != cachekeys.principal_key(newcomer)


def test_a_policy_built_where_a_freed_one_was_gets_none_of_its_cached_answers():
    """Found by a test that built one policy requiring approval after another that allowed the
    same PREPARE: the decision cache keyed policies by id(), which CPython gives to the next
    object allocated at a freed one's address, so the new policy served the old one's allow."""
    from enforcer.policy import cachekeys

    class Policy:
        pass

    first = Policy()
    first_key = cachekeys.policy_key(first)
    del first
    # CPython usually gives one of these the freed address (and so the old id()); none may get its key
    successors = [Policy() for _ in range(50)]
    keys = [cachekeys.policy_key(p) for p in successors]
    assert first_key not in keys and len(set(keys)) == len(keys)
    assert [cachekeys.policy_key(p) for p in successors] == keys
