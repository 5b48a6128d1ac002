"""The index puts each decision on the statement or request it decided."""
from __future__ import annotations

from collector.indexer import EVENT_COLUMNS, build_index

DECISION = EVENT_COLUMNS.index("decision")
TYPE = EVENT_COLUMNS.index("type")


def _events(*items):
    out = []
    for seq, (event_type, fields) in enumerate(items, start=1):
        out.append({"type": event_type, "sid": "s1", "ts": 1_000 + seq, "seq": seq, "f": fields,
                    "hash": bytes([seq]) * 32})
    return out


def _decisions_of(index, event_type):
    return [row[DECISION] for row in index.event_rows if row[TYPE] == event_type]


def test_postgres_decision_before_its_statement_does_not_overwrite_the_previous_one():
    """Bug fix: Postgres records policy.decision before pg.statement, and the index copied each
    decision onto the previous statement, so an allowed SELECT showed the next DELETE's deny."""
    events = _events(
        ("session.start", {"identity": "svc", "target": "db"}),
        ("policy.decision", {"decision": "allow", "statement_index": 1}),
        ("pg.statement", {"text": "SELECT 1", "decision": "allow", "statement_index": 1}),
        ("pg.result", {"rows": 1, "statement_index": 1}),
        ("policy.decision", {"decision": "deny", "statement_index": 2}),
        ("pg.statement", {"text": "DELETE FROM t", "decision": "deny", "statement_index": 2}),
        ("pg.result", {"sqlstate": "42501", "statement_index": 2}),
    )
    index = build_index("agent", "host", 1, events, {})
    assert _decisions_of(index, "pg.statement") == ["allow", "deny"]
    # records of older agents: the deny is counted once, on its statement
    assert index.sessions["s1"].denied == 1


def test_http_decision_after_its_request_is_copied_onto_it():
    events = _events(
        ("session.start", {"identity": "svc", "target": "api"}),
        ("http.request", {"method": "GET", "path": "/a", "request_index": 1}),
        ("policy.decision", {"decision": "allow", "request_index": 1}),
        ("http.response", {"status": 200, "request_index": 1}),
        ("http.request", {"method": "DELETE", "path": "/a", "request_index": 2}),
        ("policy.decision", {"decision": "deny", "request_index": 2}),
    )
    index = build_index("agent", "host", 1, events, {})
    assert _decisions_of(index, "http.request") == ["allow", "deny"]
    assert index.sessions["s1"].denied == 1


def test_decisions_carried_by_statements_and_requests_are_indexed_and_counted_once():
    """What agents record now: the decision on the statement or request itself."""
    events = _events(
        ("session.start", {"identity": "svc", "target": "db"}),
        ("pg.statement", {"text": "SELECT 1", "decision": "allow", "statement_index": 1}),
        ("pg.result", {"rows": 1, "statement_index": 1}),
        ("pg.statement", {"text": "DELETE FROM t", "decision": "deny", "statement_index": 2}),
        ("pg.result", {"sqlstate": "42501", "statement_index": 2}),
        ("http.request", {"method": "DELETE", "path": "/a", "request_index": 1, "decision": "deny"}),
        ("http.response", {"status": 403, "request_index": 1}),
    )
    index = build_index("agent", "host", 1, events, {})
    assert _decisions_of(index, "pg.statement") == ["allow", "deny"]
    assert _decisions_of(index, "http.request") == ["deny"]
    assert index.sessions["s1"].denied == 2


def test_request_held_for_approval_gets_the_outcome_and_a_denial_counts_once():
    events = _events(
        ("session.start", {"identity": "svc", "target": "api"}),
        ("http.request", {"method": "POST", "path": "/pay", "request_index": 1, "decision": "approval"}),
        ("approval.requested", {"approval_id": "a1", "request_index": 1}),
        ("approval.decided", {"approval_id": "a1", "decision": "deny"}),
        ("policy.decision", {"decision": "deny", "policy_ids": ["pay-needs-approval"], "request_index": 1}),
        ("http.response", {"status": 403, "request_index": 1}),
        ("http.request", {"method": "POST", "path": "/pay", "request_index": 2, "decision": "approval"}),
        ("policy.decision", {"decision": "allow", "request_index": 2}),
    )
    index = build_index("agent", "host", 1, events, {})
    assert _decisions_of(index, "http.request") == ["deny", "allow"]
    assert index.sessions["s1"].denied == 1


def test_sni_only_decision_with_no_request_counts_its_denial():
    events = _events(
        ("session.start", {"identity": "svc", "target": "api"}),
        ("policy.decision", {"decision": "deny", "request_index": 1}),
        ("session.end", {"reason": "denied"}),
    )
    assert build_index("agent", "host", 1, events, {}).sessions["s1"].denied == 1
