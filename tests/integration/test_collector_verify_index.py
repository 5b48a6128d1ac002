"""`warden verify` against the real `warden-collector serve` (127.0.0.1, SQLite in a temp dir):
it recomputes the index from the stored evidence, so editing any derived data (the events rows'
identity, target, decision and summary, the tables-touched rows `warden events --table` reads,
the sessions rows `warden sessions list` reads) fails verification (exit 1) with the batch and
sequence number named, and the untampered store passes (exit 0)."""
from __future__ import annotations

import contextlib
import json
import os
import sqlite3

import httpx
import pytest

from collector.simulate import SimulatedAgent
from tests.collectorproc import CollectorProcess, cli

T0 = 1_714_530_900 * 10**9  # 2024-05-01T02:35:00Z


@pytest.fixture(scope="module")
def store():
    """A collector holding two agents' sessions; one spans two batches, one is denied."""
    collector = CollectorProcess().start()
    try:
        auditor = collector.token("auditor", "carol")
        agent = SimulatedAgent("web-1", hostname="web-1.internal")
        other = SimulatedAgent("web-2")
        for each in (agent, other):
            answer = httpx.post(f"{collector.url}/v1/agents/enroll", json=each.enroll_body(collector.enrollment()))
            assert answer.status_code == 200
        _, first = agent.session(identity="payments-api", target="customers-db", start_ns=T0,
                                 statements=[("SELECT * FROM public.customers", ["public.customers"]),
                                             ("UPDATE public.orders SET paid = true", ["public.orders"])])
        _, denied = agent.session(identity="nightly-etl", target="customers-db", start_ns=T0 + 60 * 10**9,
                                  statements=[("DELETE FROM public.customers", ["public.customers"])],
                                  decision="deny")
        _, elsewhere = other.session(identity="reports", target="dw", start_ns=T0,
                                     statements=[("SELECT 1 FROM sales", ["sales"])])
        for sender, events in ((agent, first[:3]), (agent, first[3:] + denied), (other, elsewhere)):
            answer = httpx.post(f"{collector.url}/v1/ingest", content=sender.batch_bytes(events),
                                headers=sender.headers())
            assert answer.status_code == 200 and answer.json()["accepted"]
        yield {"collector": collector, "env": collector.cli_env(auditor),
               "db": os.path.join(collector.work, "state", "collector.db")}
    finally:
        collector.cleanup()


def verify(store) -> tuple[int, dict]:
    result = cli("warden", "verify", "--json", env=store["env"], check=False)
    return result.returncode, json.loads(result.stdout)


@contextlib.contextmanager
def tampered(store, table: str, where: str, changes: dict | None = None, *, delete: bool = False,
             insert: dict | None = None):
    """Change rows of the running collector's database directly, then put them back."""
    db = sqlite3.connect(store["db"])
    db.row_factory = sqlite3.Row
    try:
        saved = [dict(row) for row in db.execute(f"SELECT * FROM {table} WHERE {where}")] if where else []
        assert saved or insert, f"nothing in {table} matches {where}"
        with db:
            if insert is not None:
                db.execute(f"INSERT INTO {table} ({', '.join(insert)}) VALUES ({', '.join('?' * len(insert))})",
                           list(insert.values()))
            elif delete:
                db.execute(f"DELETE FROM {table} WHERE {where}")
            else:
                db.execute(f"UPDATE {table} SET {', '.join(f'{k} = ?' for k in changes)} WHERE {where}",
                           list(changes.values()))
        yield saved
    finally:
        with db:
            if insert is not None:
                db.execute(f"DELETE FROM {table} WHERE {' AND '.join(f'{k} IS ?' for k in insert)}",
                           list(insert.values()))
            elif delete:
                for row in saved:
                    db.execute(f"INSERT INTO {table} ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                               list(row.values()))
            else:
                for row in saved:
                    keys = [k for k in row if k not in changes]
                    db.execute(f"UPDATE {table} SET {', '.join(f'{k} = ?' for k in changes)} "
                               f"WHERE {' AND '.join(f'{k} IS ?' for k in keys)}",
                               [row[k] for k in changes] + [row[k] for k in keys])
        db.close()


def statement_seq(store, text: str) -> tuple[int, int]:
    """(seq, batch id) of the pg.statement with this text."""
    with sqlite3.connect(store["db"]) as db:
        return db.execute("SELECT seq, batch_id FROM events WHERE type = 'pg.statement' AND summary = ?",
                          (text,)).fetchone()


def session_of(store, identity: str) -> str:
    with sqlite3.connect(store["db"]) as db:
        return db.execute("SELECT sid FROM sessions WHERE identity = ?", (identity,)).fetchone()[0]


def assert_fails(store, *, seq: int | None, batch_id: int | None, words: tuple[str, ...]) -> None:
    code, report = verify(store)
    assert code == 1 and report["ok"] is False, report
    mismatches = [p for p in report["problems"] if p["kind"] in ("index_mismatch", "index_missing")]
    assert mismatches, report["problems"]
    found = [p for p in mismatches if p["seq"] == seq and p["batch_id"] == batch_id
             and all(word in p["detail"] for word in words)]
    assert found, (seq, batch_id, words, mismatches)
    assert all(p["agent_id"] == "web-1" for p in report["problems"])   # web-2 stays intact
    if batch_id is not None:
        assert found[0]["batch_seq"]


def test_untampered_store_passes(store):
    code, report = verify(store)
    assert code == 0 and report["ok"] is True and report["problems"] == []
    assert {a["agent_id"] for a in report["agents"]} == {"web-1", "web-2"}
    assert "intact" in cli("warden", "verify", env=store["env"]).stdout


@pytest.mark.parametrize("column,value", [("identity", "nightly-etl"), ("target", "other-db"),
                                          ("decision", "deny"), ("summary", "SELECT 1"),
                                          ("fields", '{"text":"SELECT 1"}'), ("sid", "another-session")])
def test_edited_events_row_fails(store, column, value):
    seq, batch_id = statement_seq(store, "SELECT * FROM public.customers")
    with tampered(store, "events", f"agent_id = 'web-1' AND seq = {seq}", {column: value}):
        assert_fails(store, seq=seq, batch_id=batch_id, words=("index row differs", column))
    assert verify(store)[0] == 0


def test_deleted_events_row_fails(store):
    seq, batch_id = statement_seq(store, "UPDATE public.orders SET paid = true")
    with tampered(store, "events", f"agent_id = 'web-1' AND seq = {seq}", delete=True):
        assert_fails(store, seq=seq, batch_id=batch_id, words=("not in the index",))
    assert verify(store)[0] == 0


def test_tables_touched_rows_fail(store):
    seq, batch_id = statement_seq(store, "DELETE FROM public.customers")
    where = f"agent_id = 'web-1' AND seq = {seq}"
    # `warden events --table customers` would no longer show the DELETE
    with tampered(store, "event_tables", where, delete=True):
        assert_fails(store, seq=seq, batch_id=batch_id, words=("'public.customers' is missing from the index",))
    with tampered(store, "event_tables", where, {"table_name": "public.invoices", "table_base": "invoices"}):
        assert_fails(store, seq=seq, batch_id=batch_id, words=("'public.invoices' is in the index but not",))
    with tampered(store, "event_tables", where, {"table_base": "orders"}):
        assert_fails(store, seq=seq, batch_id=batch_id, words=("'public.customers' differs in table_base",))
    select_seq, select_batch = statement_seq(store, "SELECT * FROM public.customers")
    with tampered(store, "event_tables", "", insert={"agent_id": "web-1", "seq": select_seq, "table_name": "secrets",
                                                     "table_base": "secrets", "ts": T0, "sid": None}):
        assert_fails(store, seq=select_seq, batch_id=select_batch, words=("'secrets' is in the index but not",))
    # a tables-touched row for an event that does not exist at all
    with tampered(store, "event_tables", "", insert={"agent_id": "web-1", "seq": 999, "table_name": "secrets",
                                                     "table_base": "secrets", "ts": T0, "sid": None}):
        assert_fails(store, seq=999, batch_id=None, words=("has no event",))
    assert verify(store)[0] == 0


@pytest.mark.parametrize("column,value", [("identity", "payments-api"), ("target", "other-db"),
                                          ("denied_count", 0), ("event_count", 3), ("host", "elsewhere"),
                                          ("auth_user", "postgres"), ("end_reason", "admin_kill"),
                                          ("process", None), ("start_ns", T0)])
def test_edited_sessions_row_fails(store, column, value):
    sid = session_of(store, "nightly-etl")
    with tampered(store, "sessions", f"sid = '{sid}'", {column: value}):
        code, report = verify(store)
        assert code == 1, report
        found = [p for p in report["problems"] if p["kind"] == "index_mismatch" and sid in p["detail"]]
        assert found and column in found[0]["detail"] and found[0]["seq"] is not None and found[0]["batch_id"]
    assert verify(store)[0] == 0


def test_sessions_rows_deleted_or_invented_fail(store):
    sid = session_of(store, "payments-api")   # spans both batches of web-1
    with tampered(store, "sessions", f"sid = '{sid}'", delete=True):
        code, report = verify(store)
        assert code == 1 and any(p["kind"] == "index_missing" and sid in p["detail"] for p in report["problems"])
    with tampered(store, "sessions", "", insert={"sid": "invented", "agent_id": "web-1", "identity": "root",
                                                 "event_count": 1, "statement_count": 0, "request_count": 0,
                                                 "denied_count": 0}):
        code, report = verify(store)
        assert code == 1 and any("session invented is in the index but has no event" in p["detail"]
                                 for p in report["problems"])
    assert verify(store)[0] == 0
