"""Re-verify the stored evidence: decode each raw batch as stored, check signatures (each batch
with the key its agent had for that batch's sequence numbers) and the per-agent chain with
records' verifier, and recompute the index (events, tables touched, sessions) from the evidence
exactly as ingest derived it, comparing every derived column with what is stored.
Every finding names the agent, the batch (id and seq range) and the seq.

Batches are read and checked a chunk at a time in sequence order; the index is recomputed per
batch, carrying only what ingest carries between batches (the open sessions, index rows a later
batch may still complete), so memory stays bounded by the open sessions, not the store."""
from __future__ import annotations

from typing import NamedTuple

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Connection, and_, exists, func, not_, or_, select

from collector.indexer import (EVENT_COLUMNS, OPEN_DECISIONS, SESSION_END_COLUMNS, SESSION_START_COLUMNS,
                               TABLE_COLUMNS, build_index)
from collector.ingest import SESSION_COLUMNS   # the sessions columns ingest fills
from collector.retention import checkpoint_signature_ok, key_id, latest_checkpoint
from collector.storage.schema import agent_keys, agents, batches, event_tables, events, sessions
from collector.timeparse import format_ns

VERIFY_CHUNK = 64          # batches read and checked at a time...
VERIFY_CHUNK_EVENTS = 50_000   # ...or fewer, to hold at most about this many events
_SESSIONS_PER_QUERY = 500
_NO_END = dict.fromkeys(SESSION_END_COLUMNS)
_NO_COUNTS = {"event_count": 0, "statement_count": 0, "request_count": 0, "denied_count": 0}
_IDENTITY, _TARGET = EVENT_COLUMNS.index("identity"), EVENT_COLUMNS.index("target")
_DECISION, _TYPE, _SID = EVENT_COLUMNS.index("decision"), EVENT_COLUMNS.index("type"), EVENT_COLUMNS.index("sid")


def _records():
    from records import batch as records_batch
    from records import codec, verifier
    return records_batch, codec, verifier


class BatchRef(NamedTuple):
    id: int
    first_seq: int
    last_seq: int


class KeyRange(NamedTuple):
    valid_from: int
    public_key: Ed25519PublicKey
    hostname: str | None


def verify_store(connection: Connection, *, agent_id: str | None = None, since_ns: int | None = None,
                 until_ns: int | None = None, check_index: bool = True,
                 checkpoint_key: Ed25519PublicKey | None = None) -> dict:
    """checkpoint_key: the collector's public key, which signs retention checkpoints."""
    query = select(agents)
    if agent_id:
        query = query.where(agents.c.agent_id == agent_id)
    reports = [_verify_agent(connection, row, since_ns, until_ns, check_index, checkpoint_key)
               for row in connection.execute(query.order_by(agents.c.agent_id)).fetchall()]
    problems = [p for r in reports for p in r["problems"]]
    if agent_id and not reports:
        # A named agent with nothing stored (a typo, or one that never enrolled here) has no
        # evidence to vouch for: that is a failure, not an empty success.
        problems.append(_problem("unknown_agent", agent_id, detail=f"no agent {agent_id!r} is enrolled at this "
                                                                   f"collector: no evidence to verify"))
    return {
        "ok": all(r["ok"] for r in reports) and not problems,
        "agents": reports,
        "problems": problems,
        "batches_checked": sum(r["batches_checked"] for r in reports),
        "events_checked": sum(r["events_checked"] for r in reports),
    }


def _problem(kind, agent_id, seq=None, batch=None, detail=""):
    return {"kind": kind, "agent_id": agent_id, "seq": seq,
            "batch_id": batch.id if batch is not None else None,
            "batch_seq": f"{batch.first_seq}..{batch.last_seq}" if batch is not None else None,
            "detail": detail}


def _checkpoint_start(connection: Connection, agent_id: str, checkpoint_key, problems: list) -> tuple:
    """Where the full chain must start: (seq, hash) after the latest retention checkpoint,
    genesis without one, None when the checkpoint cannot be trusted; plus its description."""
    _, codec, _ = _records()
    checkpoint = latest_checkpoint(connection, agent_id)
    if checkpoint is None:
        return (1, codec.GENESIS_HASH), None
    info = {"seq": checkpoint.seq, "chain_hash": bytes(checkpoint.chain_hash).hex(),
            "purged_before": format_ns(checkpoint.before_ns), "created": format_ns(checkpoint.created_ns),
            "actor": checkpoint.actor, "problems_in_purged_range": checkpoint.problems, "signature_ok": False}
    if checkpoint_key is None:
        problems.append(_problem("checkpoint_unverifiable", agent_id, checkpoint.seq, None,
                                 "a retention checkpoint exists but no collector key was given to check it"))
        return None, info
    if checkpoint.key_id != key_id(checkpoint_key) or not checkpoint_signature_ok(checkpoint, checkpoint_key):
        problems.append(_problem("checkpoint_invalid", agent_id, checkpoint.seq, None,
                                 f"retention checkpoint {checkpoint.id} (seq {checkpoint.seq}) does not verify with "
                                 f"the collector's key: it was edited, or signed by another key"))
        return None, info
    info["signature_ok"] = True
    return (checkpoint.seq + 1, bytes(checkpoint.chain_hash)), info


def key_ranges(connection: Connection, agent, problems: list) -> list[KeyRange]:
    """The agent's keys by the sequence numbers they signed, oldest first (agent_keys); an agent
    without key history has its one key from seq 1."""
    rows = connection.execute(select(agent_keys).where(agent_keys.c.agent_id == agent.agent_id)
                              .order_by(agent_keys.c.id)).fetchall()
    if rows:
        current = [r for r in rows if r.replaced_ns is None]
        if len(current) != 1 or bytes(current[0].public_key) != bytes(agent.public_key):
            problems.append(_problem("key_mismatch", agent.agent_id, detail=(
                "the agent's enrolled key is not the current key of its key history (agent_keys): "
                "the agents or agent_keys table was edited")))
    ranged = sorted((r for r in rows if r.valid_from_seq is not None), key=lambda r: (r.valid_from_seq, r.id))
    if not ranged:
        return [KeyRange(1, Ed25519PublicKey.from_public_bytes(bytes(agent.public_key)), agent.hostname)]
    return [KeyRange(int(r.valid_from_seq), Ed25519PublicKey.from_public_bytes(bytes(r.public_key)), r.hostname)
            for r in ranged]


def range_for(ranges: list[KeyRange], seq: int) -> int:
    """Index of the key whose range holds seq (the first key for anything before it)."""
    found = 0
    for position, key_range in enumerate(ranges):
        if key_range.valid_from <= seq:
            found = position
        else:
            break
    return found


def _verify_agent(connection: Connection, agent, since_ns, until_ns, check_index, checkpoint_key) -> dict:
    records_batch, codec, verifier = _records()
    problems: list[dict] = []
    ranges = key_ranges(connection, agent, problems)
    query = select(batches.c.id, batches.c.first_seq, batches.c.last_seq, batches.c.event_count).where(
        batches.c.agent_id == agent.agent_id)
    ranged = since_ns is not None or until_ns is not None
    if since_ns is not None:
        query = query.where(batches.c.last_ts >= since_ns)
    if until_ns is not None:
        query = query.where(batches.c.first_ts <= until_ns)
    rows = connection.execute(query.order_by(batches.c.first_seq, batches.c.id)).fetchall()
    refs = [BatchRef(int(r.id), int(r.first_seq), int(r.last_seq)) for r in rows]
    chain_start, checkpoint = _checkpoint_start(connection, agent.agent_id, checkpoint_key, problems)
    replay = _IndexReplay(connection, agent.agent_id, problems, head_complete=not ranged and checkpoint is None,
                          tail_complete=until_ns is None) if check_index else None
    events_checked = 0
    segment: list = []       # consecutive decodable batches signed by one key: (BatchRef, Batch)
    segment_start = None     # (seq, hash) the segment must continue from
    segment_key = None       # index into ranges
    carry = None             # (seq, hash) where the previous segment left the chain

    def flush():
        nonlocal events_checked, carry
        if not segment:
            return
        start_seq, start_hash = segment_start
        report = verifier.verify_batches([b for _, b in segment], ranges[segment_key].public_key,
                                         start_seq=start_seq, start_hash=start_hash)
        events_checked += report.events_checked
        for p in report.problems:
            ref = segment[p.batch_index][0] if p.batch_index is not None and 0 <= p.batch_index < len(segment) else None
            problems.append(_problem(p.kind, agent.agent_id, p.seq, ref, p.detail))
        carry = (report.last_seq + 1, bytes(report.last_hash))
        segment.clear()

    position = 0
    for chunk in _chunks(refs, [r.event_count for r in rows]):
        raws = dict(connection.execute(select(batches.c.id, batches.c.raw)
                                       .where(batches.c.id.in_([ref.id for ref in chunk]))).all())
        if replay is not None:
            replay.prefetch(chunk)
        for ref in chunk:
            first = position == 0
            position += 1
            try:
                batch = records_batch.decode_batch(bytes(raws[ref.id]))
            except (records_batch.BatchFormatError, KeyError) as exc:
                flush()
                carry = None  # the chain resumes from the next batch's own signed prev_hash
                problems.append(_problem("batch_undecodable", agent.agent_id, ref.first_seq, ref,
                                         f"stored bytes no longer decode: {exc}"))
                if replay is not None:
                    replay.lost(ref)
                continue
            if (batch.agent_id, batch.first_seq, batch.last_seq) != (agent.agent_id, ref.first_seq, ref.last_seq):
                problems.append(_problem("index_mismatch", agent.agent_id, ref.first_seq, ref,
                                         f"stored batch says {batch.agent_id} {batch.first_seq}..{batch.last_seq}"))
            key = range_for(ranges, batch.first_seq)
            if segment and key != segment_key:
                flush()  # the chain continues across a key rotation, checked with the next key
            if not segment:
                # Full history starts at genesis or at the retention checkpoint; a range (or after
                # an unreadable batch, or an untrusted checkpoint) continues from the batch's own
                # signed prev_hash.
                if first and not ranged and chain_start is not None:
                    segment_start = chain_start
                elif carry is not None:
                    segment_start = carry
                else:
                    segment_start = (batch.first_seq, bytes(batch.prev_hash))
                segment_key = key
            segment.append((ref, batch))
            if replay is not None:
                replay.batch(ref, batch, ranges[key].hostname)
        flush()
        if replay is not None:
            replay.end_chunk()
    if replay is not None:
        replay.finish()
    if not ranged:
        stored_max = max([r.last_seq for r in refs] + [checkpoint["seq"] if checkpoint else 0])
        if stored_max < agent.last_seq:
            problems.append(_problem("missing_tail", agent.agent_id, stored_max + 1, None,
                                     f"agent reached seq {agent.last_seq} but stored evidence ends at {stored_max}"))
        if check_index:
            problems.extend(_orphans(connection, agent.agent_id))
            problems.extend(_unbacked_index_rows(connection, agent.agent_id))
    return {"agent_id": agent.agent_id, "ok": not problems, "problems": problems, "checkpoint": checkpoint,
            "batches_checked": len(refs), "events_checked": events_checked}


def _chunks(refs: list[BatchRef], counts: list[int]):
    """Consecutive runs of at most VERIFY_CHUNK batches and about VERIFY_CHUNK_EVENTS events."""
    chunk, events_in = [], 0
    for ref, count in zip(refs, counts):
        if chunk and (len(chunk) >= VERIFY_CHUNK or events_in + (count or 0) > VERIFY_CHUNK_EVENTS):
            yield chunk
            chunk, events_in = [], 0
        chunk.append(ref)
        events_in += count or 0
    if chunk:
        yield chunk


class _Session:
    """A sessions row as ingest made it from the batches replayed so far."""
    __slots__ = ("values", "partial", "ended_in", "first_seq", "batch")

    def __init__(self, values: dict, partial: bool, first_seq: int | None, batch: BatchRef | None):
        self.values, self.partial, self.ended_in, self.first_seq, self.batch = values, partial, None, first_seq, batch


class _Pending:
    """An events row a later batch may still change (ingest gives identity/target of a session
    whose session.start comes later, and a decision to a request held for approval): compared
    once that is settled."""
    __slots__ = ("seq", "batch", "expected", "stored", "columns")

    def __init__(self, seq: int, batch: BatchRef, columns: tuple[str, ...], expected: list, stored: tuple):
        self.seq, self.batch, self.columns, self.expected, self.stored = seq, batch, columns, expected, stored


class _IndexReplay:
    """Derive the index from the evidence as ingest did (collector/ingest.py _ingest_here and
    _store_index: build_index per batch, sessions created or incremented, a late session.start
    filling identity/target, a late policy.decision deciding its request) and compare it, batch
    by batch, with the stored events, event_tables and sessions rows."""

    def __init__(self, connection: Connection, agent_id: str, problems: list, *, head_complete: bool,
                 tail_complete: bool):
        self.connection, self.agent_id, self.problems = connection, agent_id, problems
        # head_complete: the replay starts at the agent's first event, so a session it has not
        # seen did not exist yet; tail_complete: it ends at the agent's last stored batch.
        self.head_complete, self.tail_complete = head_complete, tail_complete
        self.sessions: dict[str, _Session] = {}
        self.anonymous: dict[str, list[_Pending]] = {}            # sid -> rows without identity yet
        self.undecided: dict[tuple, list[_Pending]] = {}          # (sid, request_index) -> open http.requests
        self.indexed_to = 0     # highest seq replayed
        self.batch_no = 0
        # the stored events and tables-touched rows of the current chunk's sequence range
        self.stored_range = (0, -1)
        self.stored_events: dict[int, tuple] = {}
        self.stored_tables: dict[int, list[tuple]] = {}

    def prefetch(self, chunk: list[BatchRef]) -> None:
        """Read the stored index rows of a chunk of batches in two queries."""
        low, high = min(ref.first_seq for ref in chunk), max(ref.last_seq for ref in chunk)
        self.stored_range = (low, high)
        self.stored_events, self.stored_tables = self._read_rows(low, high)

    def _read_rows(self, low: int, high: int) -> tuple[dict, dict]:
        stored_events = {int(r.seq): tuple(r) for r in self.connection.execute(
            select(*[events.c[name] for name in EVENT_COLUMNS]).where(
                events.c.agent_id == self.agent_id, events.c.seq >= low, events.c.seq <= high))}
        stored_tables: dict[int, list[tuple]] = {}
        for row in self.connection.execute(select(*[event_tables.c[name] for name in TABLE_COLUMNS]).where(
                event_tables.c.agent_id == self.agent_id, event_tables.c.seq >= low, event_tables.c.seq <= high)):
            stored_tables.setdefault(int(row.seq), []).append(tuple(row))
        return stored_events, stored_tables

    def end_chunk(self) -> None:
        self._flush_sessions(lambda s: s.ended_in is not None and s.ended_in < self.batch_no)
        self.stored_events, self.stored_tables, self.stored_range = {}, {}, (0, -1)

    # -- per batch ---------------------------------------------------------------------------

    def lost(self, ref: BatchRef) -> None:
        """An unreadable batch: what it added to the index is unknown from here on."""
        self._history_gap()
        self.indexed_to = max(self.indexed_to, ref.last_seq)

    def batch(self, ref: BatchRef, batch, hostname: str | None) -> None:
        self.batch_no += 1
        # Seqs already indexed from an earlier batch (an overlapping range) keep that copy.
        fresh = [ev for ev in batch.events if int(ev["seq"]) > self.indexed_to]
        if fresh:
            seqs = [int(ev["seq"]) for ev in fresh]
            low, high = min(seqs), max(seqs)
            if low > self.indexed_to + 1 and (self.indexed_to or self.head_complete):
                self._history_gap()   # missing evidence before this batch (the chain check reports it)
            self.indexed_to = max(self.indexed_to, high)
            index = build_index(self.agent_id, hostname, ref.id, fresh, {})
            existing = self._existing_sessions(index, fresh, low)
            index.resolve({sid: (s.values["identity"], s.values["target"]) for sid, s in existing.items()})
            late_starts = self._apply_sessions(index, existing, fresh, ref, hostname)
            self._late_updates(index, fresh, late_starts)
            self._compare_events(ref, index, fresh, low, high)
        self.indexed_to = max(self.indexed_to, batch.last_seq)

    def _history_gap(self) -> None:
        """Evidence is missing here: sessions open across it and rows a missing batch might have
        completed can no longer be recomputed (the gap itself is reported)."""
        for session in self.sessions.values():
            session.partial = True
        self.anonymous.clear()
        self.undecided.clear()
        self.head_complete = False

    def _existing_sessions(self, index, fresh: list[dict], low: int) -> dict[str, _Session]:
        """The sessions that had a row before this batch (ingest: sessions_by_sid)."""
        existing = {sid: self.sessions[sid] for sid in index.sessions if sid in self.sessions}
        if self.head_complete:
            return existing   # a session not seen yet had no row yet
        # The replay started after the agent's first event (--since, a retention checkpoint, a
        # gap): a session this batch does not start, or with indexed events before this batch,
        # began earlier. Its row is taken as stored, to resolve identity/target as ingest did,
        # and not compared: not all of its evidence is replayed. (Not recognized: a session
        # whose session.start was sealed after some of its events, when retention purged those
        # events; enforcers emit session.start first.)
        unknown = [sid for sid in index.sessions if sid not in existing]
        started = {ev.get("sid") for ev in fresh if ev["type"] == "session.start"}
        for start in range(0, len(unknown), _SESSIONS_PER_QUERY):
            chunk = unknown[start:start + _SESSIONS_PER_QUERY]
            stored = {row.sid: dict(row._mapping) for row in self.connection.execute(
                select(sessions).where(sessions.c.sid.in_(chunk)))}
            earlier = {sid for sid in chunk if sid in stored and sid not in started}
            maybe = [sid for sid in chunk if sid in started]
            if maybe:
                earlier |= set(self.connection.execute(select(events.c.sid).where(
                    events.c.sid.in_(maybe), events.c.agent_id == self.agent_id, events.c.seq < low)
                    .distinct()).scalars())
            for sid in earlier:
                values = stored.get(sid) or {**dict.fromkeys(SESSION_COLUMNS), **_NO_COUNTS}
                existing[sid] = self.sessions[sid] = _Session(values, True, None, None)
        return existing

    def _apply_sessions(self, index, existing: dict[str, _Session], fresh: list[dict], ref: BatchRef,
                        hostname: str | None) -> dict[str, dict]:
        """Sessions rows created or incremented as ingest does; the late session.starts by sid."""
        late_starts = {}
        first_seq: dict[str, int] = {}
        for ev in fresh:
            if ev.get("sid") is not None:
                first_seq.setdefault(ev["sid"], int(ev["seq"]))
        for sid, delta in index.sessions.items():
            end = delta.end or _NO_END
            session = existing.get(sid)
            if session is None:
                start = delta.start or {}
                values = {"sid": sid, "agent_id": self.agent_id, "host": start.get("host", hostname),
                          "identity": start.get("identity"), "target": start.get("target"),
                          "protocol": start.get("protocol"), "process": start.get("process"),
                          "start_ns": start.get("start_ns", delta.first_ts), "end_ns": delta.end_ns,
                          "event_count": delta.events, "statement_count": delta.statements,
                          "request_count": delta.requests, "denied_count": delta.denied,
                          **{name: start.get(name) for name in SESSION_START_COLUMNS},
                          **{name: end[name] for name in SESSION_END_COLUMNS}}
                session = self.sessions[sid] = _Session(values, False, first_seq.get(sid), ref)
            else:
                values = session.values
                values["event_count"] += delta.events
                values["statement_count"] += delta.statements
                values["request_count"] += delta.requests
                values["denied_count"] += delta.denied
                if delta.end_ns is not None:
                    values["end_ns"] = delta.end_ns
                for name in SESSION_END_COLUMNS:
                    if end[name] is not None:
                        values[name] = end[name]
                if delta.start:
                    values.update(delta.start)
                    late_starts[sid] = delta.start
            if delta.end_ns is not None:
                session.ended_in = self.batch_no
        return late_starts

    def _late_updates(self, index, fresh: list[dict], late_starts: dict[str, dict]) -> None:
        """Apply what ingest changes after inserting a batch's rows (a late session.start's
        identity/target, late decisions) to this batch's rows and to earlier rows still pending."""
        rows = index.event_rows
        for sid, start in late_starts.items():
            for row in rows:
                if row[_SID] == sid and row[_IDENTITY] is None:
                    row[_IDENTITY], row[_TARGET] = start["identity"], start["target"]
            for item in self.anonymous.pop(sid, []):
                item.expected = [start["identity"], start["target"]]
                if start["identity"] is not None:
                    self._settle(item)
                else:   # still without identity: a later session.start may yet set it
                    self.anonymous.setdefault(sid, []).append(item)
        wanted = {(d.sid, d.request_index): d.decision for d in index.late_decisions}
        if wanted:
            for position, row in enumerate(rows):
                if row[_TYPE] == "http.request" and row[_DECISION] in OPEN_DECISIONS:
                    decision = wanted.get((row[_SID], _request_index(fresh[position])))
                    if decision is not None:
                        row[_DECISION] = decision
            for key, decision in wanted.items():
                for item in self.undecided.pop(key, []):
                    item.expected = [decision]
                    if decision in OPEN_DECISIONS:   # held for approval again: still open
                        self.undecided.setdefault(key, []).append(item)
                    else:
                        self._settle(item)

    def _compare_events(self, ref: BatchRef, index, fresh: list[dict], low: int, high: int) -> None:
        agent_id = self.agent_id
        if self.stored_range[0] <= low and high <= self.stored_range[1]:
            stored, stored_tables = self.stored_events, self.stored_tables
        else:   # events outside the batch's signed range (the chain check reports that)
            stored, stored_tables = self._read_rows(low, high)
        findings: dict[int, list[str]] = {}
        seqs = set()
        for position, expected in enumerate(index.event_rows):
            seq = expected[1]
            seqs.add(seq)
            row = stored.get(seq)
            if row is None:
                self.problems.append(_problem("index_missing", agent_id, seq, ref,
                                              "event is in the evidence but not in the index"))
                continue
            deferred = ()
            sid = expected[_SID]
            if sid is not None and expected[_IDENTITY] is None:
                # identity/target may still come from a later session.start
                item = _Pending(seq, ref, ("identity", "target"), [None, expected[_TARGET]],
                                (row[_IDENTITY], row[_TARGET]))
                self.anonymous.setdefault(sid, []).append(item)
                deferred = (_IDENTITY, _TARGET)
            request_index = _request_index(fresh[position])
            if expected[_TYPE] == "http.request" and expected[_DECISION] in OPEN_DECISIONS and sid is not None \
                    and request_index is not None:
                # a later policy.decision may still decide it
                item = _Pending(seq, ref, ("decision",), [expected[_DECISION]], (row[_DECISION],))
                self.undecided.setdefault((sid, request_index), []).append(item)
                deferred = (*deferred, _DECISION)
            differing = [name for column, name in enumerate(EVENT_COLUMNS)
                         if column not in deferred and expected[column] != row[column]]
            if differing:
                findings.setdefault(seq, []).append(f"index row differs from the evidence in: {', '.join(differing)}")
        self._compare_tables(index, seqs, stored_tables, findings)
        for seq in sorted(findings):
            self.problems.append(_problem("index_mismatch", agent_id, seq, ref, "; ".join(findings[seq])))

    def _compare_tables(self, index, seqs: set[int], stored_tables: dict[int, list[tuple]], findings: dict) -> None:
        expected = {(row[1], row[2]): row for row in index.table_rows}
        stored = {(seq, row[2]): row for seq in seqs for row in stored_tables.get(seq, ())}
        for key in sorted(expected.keys() | stored.keys(), key=lambda k: (k[0], str(k[1]))):
            seq, name = key
            if key not in stored:
                note = f"tables touched: {name!r} is missing from the index"
            elif key not in expected:
                note = f"tables touched: {name!r} is in the index but not in the evidence"
            elif tuple(expected[key]) != stored[key]:
                differing = [column for column, a, b in zip(TABLE_COLUMNS, expected[key], stored[key]) if a != b]
                note = f"tables touched: {name!r} differs in {', '.join(differing)}"
            else:
                continue
            findings.setdefault(seq, []).append(note)

    # -- settling what later batches complete -------------------------------------------------

    def _settle(self, item: _Pending) -> None:
        differing = [name for name, expected, stored in zip(item.columns, item.expected, item.stored)
                     if expected != stored]
        if differing:
            self.problems.append(_problem("index_mismatch", self.agent_id, item.seq, item.batch,
                                          f"index row differs from the evidence in: {', '.join(differing)}"))

    def _flush_sessions(self, due) -> None:
        """Compare the sessions rows that no later batch changes (ended in an earlier batch) and
        forget them."""
        sids = [sid for sid, session in self.sessions.items() if due(session)]
        for start in range(0, len(sids), _SESSIONS_PER_QUERY):
            chunk = sids[start:start + _SESSIONS_PER_QUERY]
            stored = {row.sid: row._mapping for row in self.connection.execute(
                select(sessions).where(sessions.c.sid.in_(chunk)))}
            for sid in chunk:
                session = self.sessions.pop(sid)
                if session.partial:
                    continue  # began before the replayed evidence: not all of it is here
                row = stored.get(sid)
                if row is None:
                    self.problems.append(_problem("index_missing", self.agent_id, session.first_seq, session.batch,
                                                  f"session {sid} is in the evidence but has no sessions row"))
                    continue
                differing = [name for name in SESSION_COLUMNS if session.values[name] != row[name]]
                if differing:
                    self.problems.append(_problem(
                        "index_mismatch", self.agent_id, session.first_seq, session.batch,
                        f"session {sid}: sessions row differs from the evidence in: {', '.join(differing)}"))

    def finish(self) -> None:
        if not self.tail_complete:
            # Evidence after the range may still end a session or settle a row: only what is settled.
            self._flush_sessions(lambda s: s.ended_in is not None)
            return
        self._flush_sessions(lambda s: True)
        for pending in (*self.anonymous.values(), *self.undecided.values()):
            for item in pending:
                self._settle(item)
        self.anonymous.clear()
        self.undecided.clear()


def _request_index(event: dict):
    """The request_index a late decision is matched on (ingest: the row's fields), if usable."""
    value = (event.get("f") or {}).get("request_index")
    try:
        hash(value)
    except TypeError:
        return None
    return value


def _orphans(connection: Connection, agent_id: str) -> list[dict]:
    """Index rows whose evidence batch is gone (a deleted batch row)."""
    orphan_query = select(events.c.seq, events.c.batch_id).where(
        events.c.agent_id == agent_id,
        not_(exists().where(and_(batches.c.id == events.c.batch_id)))).order_by(events.c.seq)
    orphans = connection.execute(orphan_query.limit(1000)).fetchall()
    if not orphans:
        return []
    total = connection.execute(select(func.count()).select_from(orphan_query.subquery())).scalar_one()
    first, last = orphans[0], orphans[-1]
    return [{"kind": "evidence_missing", "agent_id": agent_id, "seq": first.seq, "batch_id": first.batch_id,
             "batch_seq": None,
             "detail": f"{total} indexed event(s) (seq {first.seq}..{last.seq}) have no stored evidence batch "
                       f"(batch id {first.batch_id} deleted?)"}]


def _unbacked_index_rows(connection: Connection, agent_id: str) -> list[dict]:
    """Index rows no evidence accounts for: events rows outside the range of the batch they name,
    tables-touched rows without their event, sessions rows without any event."""
    found = []
    outside = connection.execute(
        select(events.c.seq, events.c.batch_id).join(batches, batches.c.id == events.c.batch_id).where(
            events.c.agent_id == agent_id,
            or_(batches.c.agent_id != events.c.agent_id, events.c.seq < batches.c.first_seq,
                events.c.seq > batches.c.last_seq)).order_by(events.c.seq).limit(100)).fetchall()
    for row in outside:
        found.append({"kind": "index_mismatch", "agent_id": agent_id, "seq": row.seq, "batch_id": row.batch_id,
                      "batch_seq": None, "detail": f"indexed event seq {row.seq} is not in the evidence batch "
                                                   f"{row.batch_id} it names"})
    no_event = connection.execute(
        select(event_tables.c.seq, event_tables.c.table_name).where(
            event_tables.c.agent_id == agent_id,
            not_(exists().where(and_(events.c.agent_id == event_tables.c.agent_id,
                                     events.c.seq == event_tables.c.seq))))
        .order_by(event_tables.c.seq).limit(100)).fetchall()
    for row in no_event:
        found.append({"kind": "index_mismatch", "agent_id": agent_id, "seq": row.seq, "batch_id": None,
                      "batch_seq": None, "detail": f"tables touched: {row.table_name!r} at seq {row.seq} has no "
                                                   f"event in the index or the evidence"})
    no_events = connection.execute(
        select(sessions.c.sid).where(sessions.c.agent_id == agent_id,
                                     not_(exists().where(events.c.sid == sessions.c.sid)))
        .order_by(sessions.c.sid).limit(100)).fetchall()
    for row in no_events:
        found.append({"kind": "index_mismatch", "agent_id": agent_id, "seq": None, "batch_id": None,
                      "batch_seq": None, "detail": f"session {row.sid} is in the index but has no event in the "
                                                   f"evidence"})
    return found
