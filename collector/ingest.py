"""Enrollment and verified ingest: signature, chain continuity, evidence + index in
one transaction, idempotent retries, problems flagged on the agent (never hidden)."""
from __future__ import annotations

import base64
import hashlib
import time
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Connection, and_, insert, select, update

from collector.auth import consume_enrollment_token
from collector.indexer import build_index
from collector.storage.engine import Store
from collector.storage.schema import agent_problems, agents, batches, event_tables, events, sessions


class IngestRejected(Exception):
    """The batch is refused (nothing stored); status is the HTTP code to answer."""

    def __init__(self, status: int, reason: str, detail: str):
        super().__init__(detail)
        self.status, self.reason, self.detail = status, reason, detail


@dataclass
class IngestResult:
    duplicate: bool
    last_seq: int
    events: int
    problems: list[dict]


def _records():
    # Imported lazily: records/ is the shared reader/writer library.
    from records import batch as records_batch
    from records import codec, verifier
    return records_batch, codec, verifier


def enroll_agent(store: Store, *, token: str, agent_id: str, public_key_b64: str,
                 hostname: str | None, version: str | None = None) -> None:
    try:
        raw_key = base64.b64decode(public_key_b64, validate=True)
        Ed25519PublicKey.from_public_bytes(raw_key)
    except Exception:
        raise IngestRejected(400, "bad_public_key", "public_key must be base64 of a raw 32-byte Ed25519 key") from None
    if not agent_id or len(agent_id) > 200:
        raise IngestRejected(400, "bad_agent_id", "agent_id must be 1..200 characters")
    with store.write() as connection:
        consume_enrollment_token(connection, token, agent_id)
        existing = connection.execute(select(agents.c.public_key).where(agents.c.agent_id == agent_id)).first()
        now = time.time_ns()
        if existing is None:
            connection.execute(insert(agents).values(
                agent_id=agent_id, public_key=raw_key, hostname=hostname, version=version, enrolled_ns=now,
                last_seq=0, batches=0, events=0, chain_ok=True, problem_count=0))
        elif bytes(existing.public_key) != raw_key:
            # Re-enrollment with a fresh token rotates the key; the chain continues.
            connection.execute(update(agents).where(agents.c.agent_id == agent_id).values(
                public_key=raw_key, hostname=hostname, enrolled_ns=now))


def _problem_dict(problem) -> dict:
    return {"kind": problem.kind, "agent_id": problem.agent_id, "seq": problem.seq,
            "batch_index": problem.batch_index, "detail": problem.detail}


def _authentic(records_batch, batch, public_key) -> bool:
    """The agent signed exactly these events (hashes are recomputed on decode)."""
    if not records_batch.batch_signature_valid(batch, public_key, [ev["hash"] for ev in batch.events]):
        return False
    seqs = [int(ev["seq"]) for ev in batch.events]
    # A validly signed batch whose header disagrees with its events is a writer bug: refuse it too.
    return seqs == list(range(batch.first_seq, batch.last_seq + 1)) and batch.events[-1]["hash"] == batch.last_hash


def _forgery_detail(verifier, batch, public_key) -> str:
    located = [p for p in verifier.verify_batches([batch], public_key, start_seq=batch.first_seq,
                                                  start_hash=batch.prev_hash).problems]
    return "; ".join(f"{p.kind} at seq {p.seq}: {p.detail}" for p in located) or "signature does not verify"


def ingest_batch(store: Store, agent_id: str, raw: bytes) -> IngestResult:
    records_batch, codec, verifier = _records()
    try:
        batch = records_batch.decode_batch(raw)
    except records_batch.BatchFormatError as exc:
        raise IngestRejected(400, "bad_format", f"batch is not decodable: {exc}") from None
    if batch.agent_id != agent_id:
        raise IngestRejected(403, "agent_mismatch",
                             f"batch is from agent {batch.agent_id!r} but the token is for {agent_id!r}")
    if not batch.events:
        raise IngestRejected(400, "empty_batch", "batch has no events")
    now = time.time_ns()
    with store.write() as connection:
        agent_query = select(agents).where(agents.c.agent_id == agent_id)
        if not store.is_sqlite:
            agent_query = agent_query.with_for_update()  # serialize one agent's ingest across replicas
        agent = connection.execute(agent_query).first()
        if agent is None:
            raise IngestRejected(401, "not_enrolled", f"agent {agent_id!r} is not enrolled")
        public_key = Ed25519PublicKey.from_public_bytes(bytes(agent.public_key))

        same_range = connection.execute(select(batches.c.id, batches.c.last_hash).where(
            batches.c.agent_id == agent_id, batches.c.first_seq == batch.first_seq,
            batches.c.last_seq == batch.last_seq)).first()
        if same_range is not None:
            return _duplicate(connection, records_batch, verifier, agent, batch, public_key, same_range, now)

        if not _authentic(records_batch, batch, public_key):
            raise IngestRejected(422, "bad_signature", "batch refused, it is not what the agent signed: "
                                 + _forgery_detail(verifier, batch, public_key))
        prev_seq, prev_hash = _predecessor(connection, codec, agent, batch)
        problems = list(verifier.verify_continuation(prev_seq, prev_hash, batch, public_key))

        # Seqs already indexed (overlapping ranges) keep their first copy in the index.
        already = set(connection.execute(select(events.c.seq).where(
            events.c.agent_id == agent_id, events.c.seq >= batch.first_seq,
            events.c.seq <= batch.last_seq)).scalars())
        timestamps = [int(ev["ts"]) for ev in batch.events]
        batch_id = connection.execute(insert(batches).values(
            agent_id=agent_id, first_seq=batch.first_seq, last_seq=batch.last_seq,
            prev_hash=bytes(batch.prev_hash), last_hash=bytes(batch.last_hash), event_count=len(batch.events),
            first_ts=min(timestamps), last_ts=max(timestamps), received_ns=now, raw=raw,
            raw_sha256=hashlib.sha256(raw).hexdigest(), chain_ok=not problems,
        ).returning(batches.c.id)).scalar_one()
        if already and not any(p.kind == "inserted" for p in problems):
            problems.append(_overlap_problem(verifier, agent_id, batch, already))
        fresh_events = [ev for ev in batch.events if int(ev["seq"]) not in already]
        _store_index(connection, agent, batch_id, fresh_events)
        stored_problems = [_problem_dict(p) for p in problems]
        for problem in stored_problems:
            connection.execute(insert(agent_problems).values(
                agent_id=agent_id, detected_ns=now, kind=problem["kind"], seq=problem["seq"],
                batch_id=batch_id, detail=problem["detail"]))
        advance = batch.last_seq > agent.last_seq
        values = {
            "last_seen_ns": now, "batches": agents.c.batches + 1, "events": agents.c.events + len(fresh_events),
            "last_event_ns": max(agent.last_event_ns or 0, max(timestamps)),
        }
        if advance:
            values.update(last_seq=batch.last_seq, last_hash=bytes(batch.last_hash))
        if problems:
            values.update(chain_ok=False, problem_count=agents.c.problem_count + len(problems))
        connection.execute(update(agents).where(agents.c.agent_id == agent_id).values(**values))
        return IngestResult(duplicate=False, last_seq=max(batch.last_seq, agent.last_seq),
                            events=len(fresh_events), problems=stored_problems)


def _duplicate(connection: Connection, records_batch, verifier, agent, batch, public_key, same_range,
               now) -> IngestResult:
    # A retry must carry the same signed content; anything else is a fork, refused.
    if bytes(same_range.last_hash) != bytes(batch.last_hash):
        raise IngestRejected(409, "conflicting_batch",
                             f"seq {batch.first_seq}..{batch.last_seq} is already stored with a different hash")
    if not _authentic(records_batch, batch, public_key):
        raise IngestRejected(422, "bad_signature", "retry refused, it is not what the agent signed: "
                             + _forgery_detail(verifier, batch, public_key))
    connection.execute(update(agents).where(agents.c.agent_id == agent.agent_id).values(last_seen_ns=now))
    return IngestResult(duplicate=True, last_seq=agent.last_seq, events=0, problems=[])


def _predecessor(connection: Connection, codec, agent, batch) -> tuple[int, bytes]:
    """The stored batch ending just before this one, else the agent's chain head."""
    if batch.first_seq == 1:
        return 0, codec.GENESIS_HASH
    row = connection.execute(select(batches.c.last_seq, batches.c.last_hash).where(
        batches.c.agent_id == agent.agent_id, batches.c.last_seq == batch.first_seq - 1)
        .order_by(batches.c.id).limit(1)).first()
    if row is not None:
        return int(row.last_seq), bytes(row.last_hash)
    if agent.last_seq == 0:
        return 0, codec.GENESIS_HASH
    return int(agent.last_seq), bytes(agent.last_hash)


def _overlap_problem(verifier, agent_id, batch, already):
    return verifier.Problem(kind="overlap", agent_id=agent_id, seq=min(already), batch_index=0,
                            detail=f"{len(already)} event(s) in seq {min(already)}..{max(already)} were already stored")


def _store_index(connection: Connection, agent, batch_id: int, new_events: list[dict]) -> None:
    sids = {ev.get("sid") for ev in new_events if ev.get("sid") is not None}
    known: dict[str, tuple] = {}
    existing_sessions: set[str] = set()
    if sids:
        for row in connection.execute(select(sessions.c.sid, sessions.c.identity, sessions.c.target)
                                      .where(sessions.c.sid.in_(sids))):
            known[row.sid] = (row.identity, row.target)
            existing_sessions.add(row.sid)
    index = build_index(agent.agent_id, agent.hostname, batch_id, new_events, known)
    if index.event_rows:
        connection.execute(insert(events), index.event_rows)
    if index.table_rows:
        connection.execute(insert(event_tables), index.table_rows)
    for sid, delta in index.sessions.items():
        counts = {"event_count": delta.events, "statement_count": delta.statements,
                  "request_count": delta.requests, "denied_count": delta.denied}
        if sid not in existing_sessions:
            row = {"sid": sid, "agent_id": agent.agent_id, "host": agent.hostname,
                   "start_ns": delta.first_ts, "end_ns": delta.end_ns, **counts}
            row.update(delta.start or {})
            connection.execute(insert(sessions).values(**row))
            continue
        values = {key: getattr(sessions.c, key) + amount for key, amount in counts.items()}
        if delta.end_ns is not None:
            values["end_ns"] = delta.end_ns
        if delta.start:
            values.update(delta.start)
        connection.execute(update(sessions).where(sessions.c.sid == sid).values(**values))
    # Events stored before their session.start inherit identity/target now.
    for sid, delta in index.sessions.items():
        if delta.start and sid in existing_sessions:
            connection.execute(update(events).where(
                and_(events.c.sid == sid, events.c.identity.is_(None))).values(
                identity=delta.start["identity"], target=delta.start["target"]))

