"""Re-verify the stored evidence: decode each raw batch as stored, check signatures and
the per-agent chain with records' verifier, and cross-check the index against it.
Every finding names the agent, the batch (id and seq range) and the seq."""
from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Connection, and_, func, not_, select, exists

from collector.indexer import index_fingerprint
from collector.retention import checkpoint_signature_ok, key_id, latest_checkpoint
from collector.timeparse import format_ns
from collector.storage.schema import agents, batches, events


def _records():
    from records import batch as records_batch
    from records import codec, verifier
    return records_batch, codec, verifier


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


def _verify_agent(connection: Connection, agent, since_ns, until_ns, check_index, checkpoint_key) -> dict:
    records_batch, codec, verifier = _records()
    public_key = Ed25519PublicKey.from_public_bytes(bytes(agent.public_key))
    query = select(batches).where(batches.c.agent_id == agent.agent_id)
    ranged = since_ns is not None or until_ns is not None
    if since_ns is not None:
        query = query.where(batches.c.last_ts >= since_ns)
    if until_ns is not None:
        query = query.where(batches.c.first_ts <= until_ns)
    rows = connection.execute(query.order_by(batches.c.first_seq, batches.c.id)).fetchall()
    problems: list[dict] = []
    chain_start, checkpoint = _checkpoint_start(connection, agent.agent_id, checkpoint_key, problems)
    events_checked = 0
    segment: list = []       # consecutive decodable batches: (row, Batch)
    segment_start = None     # (seq, hash) the segment must continue from

    def flush():
        nonlocal events_checked
        if not segment:
            return
        start_seq, start_hash = segment_start
        report = verifier.verify_batches([b for _, b in segment], public_key,
                                         start_seq=start_seq, start_hash=start_hash)
        events_checked += report.events_checked
        for p in report.problems:
            row = segment[p.batch_index][0] if p.batch_index is not None and 0 <= p.batch_index < len(segment) else None
            problems.append(_problem(p.kind, agent.agent_id, p.seq, row, p.detail))
        segment.clear()

    for position, row in enumerate(rows):
        try:
            batch = records_batch.decode_batch(bytes(row.raw))
        except records_batch.BatchFormatError as exc:
            flush()
            problems.append(_problem("batch_undecodable", agent.agent_id, row.first_seq, row,
                                     f"stored bytes no longer decode: {exc}"))
            continue
        if (batch.agent_id, batch.first_seq, batch.last_seq) != (agent.agent_id, row.first_seq, row.last_seq):
            problems.append(_problem("index_mismatch", agent.agent_id, row.first_seq, row,
                                     f"stored batch says {batch.agent_id} {batch.first_seq}..{batch.last_seq}"))
        if not segment:
            # Full history starts at genesis or at the retention checkpoint; a range (or after
            # an unreadable batch, or an untrusted checkpoint) continues from the batch's own
            # signed prev_hash.
            if position == 0 and not ranged and chain_start is not None:
                segment_start = chain_start
            else:
                segment_start = (batch.first_seq, bytes(batch.prev_hash))
        segment.append((row, batch))
        if check_index:
            problems.extend(_cross_check(connection, agent.agent_id, row, batch))
    flush()
    if not ranged:
        stored_max = max([r.last_seq for r in rows] + [checkpoint["seq"] if checkpoint else 0])
        if stored_max < agent.last_seq:
            problems.append(_problem("missing_tail", agent.agent_id, stored_max + 1, None,
                                     f"agent reached seq {agent.last_seq} but stored evidence ends at {stored_max}"))
        if check_index:
            problems.extend(_orphans(connection, agent.agent_id))
    return {"agent_id": agent.agent_id, "ok": not problems, "problems": problems, "checkpoint": checkpoint,
            "batches_checked": len(rows), "events_checked": events_checked}


def _cross_check(connection: Connection, agent_id: str, row, batch) -> list[dict]:
    indexed = {r.seq: r for r in connection.execute(select(events).where(
        events.c.agent_id == agent_id, events.c.seq >= batch.first_seq, events.c.seq <= batch.last_seq))}
    found = []
    for event in batch.events:
        seq = int(event["seq"])
        index_row = indexed.get(seq)
        if index_row is None:
            found.append(_problem("index_missing", agent_id, seq, row, "event is in the evidence but not in the index"))
            continue
        if index_row.batch_id != row.id:
            continue  # indexed from an earlier overlapping batch; that batch is checked itself
        expected = index_fingerprint(event)
        actual = (index_row.ts, index_row.sid, index_row.type, index_row.event_hash, index_row.fields)
        if expected != actual:
            names = ("ts", "sid", "type", "hash", "fields")
            differing = [n for n, a, b in zip(names, expected, actual) if a != b]
            found.append(_problem("index_mismatch", agent_id, seq, row,
                                  f"index row differs from the evidence in: {', '.join(differing)}"))
    return found


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
