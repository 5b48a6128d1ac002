"""Retention: delete evidence and index older than `retention.days`, without breaking
verification of what remains.

Per agent, the purge removes the oldest run of batches (by sequence) whose newest event
is older than the cutoff. Before deleting, it re-verifies that run with the shared
verifier and stores a checkpoint signed with the collector's own key: the last purged
sequence number and the agent-signed chain hash at that point. `verify` then restarts
the chain from the checkpoint (after checking its signature) instead of from genesis.
Every purge writes an access-log row: who, when, which agent and which range.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import Connection, and_, delete, exists, insert, not_, select

from collector.storage.engine import Store
from collector.storage.schema import access_log, agents, batches, checkpoints, event_tables, events, sessions
from collector.timeparse import format_ns

DAY_NS = 86400 * 10**9
VERIFY_CHUNK = 200  # batches decoded and verified at a time while checking the purged range


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def checkpoint_message(agent_id: str, seq: int, chain_hash: bytes, before_ns: int, created_ns: int,
                       batches_: int, events_: int, problems: int, actor: str) -> bytes:
    return msgpack.packb(["warden.checkpoint", 1, agent_id, int(seq), bytes(chain_hash), int(before_ns),
                          int(created_ns), int(batches_), int(events_), int(problems), actor], use_bin_type=True)


def checkpoint_signature_ok(row, public_key: Ed25519PublicKey) -> bool:
    message = checkpoint_message(row.agent_id, row.seq, bytes(row.chain_hash), row.before_ns, row.created_ns,
                                 row.batches, row.events, row.problems, row.actor)
    try:
        public_key.verify(bytes(row.signature), message)
    except InvalidSignature:
        return False
    return True


def latest_checkpoint(connection: Connection, agent_id: str):
    return connection.execute(select(checkpoints).where(checkpoints.c.agent_id == agent_id)
                              .order_by(checkpoints.c.seq.desc(), checkpoints.c.id.desc()).limit(1)).first()


@dataclass
class AgentPurge:
    agent_id: str
    batches: int
    events: int
    sessions: int
    first_seq: int
    last_seq: int
    problems: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def purge(store: Store, private_key: Ed25519PrivateKey, *, days: int | None = None, before_ns: int | None = None,
          actor: str = "retention", now_ns: int | None = None) -> dict:
    """Purge everything older than `days` (or `before_ns`). Each agent is its own transaction."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    if before_ns is None:
        if days is None:
            raise ValueError("retention needs a number of days (retention.days in collector.yaml, or --days)")
        before_ns = now_ns - int(days) * DAY_NS
    with store.read() as connection:
        agent_ids = list(connection.execute(select(agents.c.agent_id).order_by(agents.c.agent_id)).scalars())
    purged = []
    for agent_id in agent_ids:
        result = _purge_agent(store, private_key, agent_id, before_ns, actor, now_ns)
        if result is not None:
            purged.append(result.as_dict())
    return {"before_ns": before_ns, "before": format_ns(before_ns), "actor": actor, "agents": purged,
            "batches": sum(p["batches"] for p in purged), "events": sum(p["events"] for p in purged),
            "sessions": sum(p["sessions"] for p in purged)}


def _purge_agent(store: Store, private_key: Ed25519PrivateKey, agent_id: str, before_ns: int, actor: str,
                 now_ns: int) -> AgentPurge | None:
    from records import batch as records_batch
    from records import codec, verifier

    with store.write() as connection:
        agent_query = select(agents.c.agent_id, agents.c.public_key, agents.c.hostname).where(
            agents.c.agent_id == agent_id)
        if not store.is_sqlite:
            agent_query = agent_query.with_for_update()  # no ingest of this agent while its chain start moves
        agent = connection.execute(agent_query).first()
        if agent is None:
            return None
        # The oldest run of batches that are entirely older than the cutoff.
        prefix = []
        for row in connection.execute(select(batches.c.id, batches.c.first_seq, batches.c.last_seq, batches.c.last_ts)
                                      .where(batches.c.agent_id == agent_id)
                                      .order_by(batches.c.first_seq, batches.c.id)):
            if row.last_ts is None or row.last_ts >= before_ns:
                break
            prefix.append(row)
        if not prefix:
            return None

        previous = latest_checkpoint(connection, agent_id)
        start_seq, start_hash = ((previous.seq + 1, bytes(previous.chain_hash)) if previous is not None
                                 else (1, codec.GENESIS_HASH))
        # each batch is checked with the key the agent had for its sequence numbers (rotations)
        from collector.integrity import key_ranges, range_for
        ranges = key_ranges(connection, agent, [])
        problems, events_count = 0, 0
        last_seq, last_hash = start_seq - 1, start_hash
        ids = [row.id for row in prefix]
        runs: list[tuple[int, list[int]]] = []          # (key index, batch ids), in chain order
        for row in prefix:
            key_index = range_for(ranges, int(row.first_seq))
            if not runs or runs[-1][0] != key_index or len(runs[-1][1]) >= VERIFY_CHUNK:
                runs.append((key_index, []))
            runs[-1][1].append(row.id)
        for key_index, chunk in runs:
            raws = connection.execute(select(batches.c.raw).where(batches.c.id.in_(chunk))
                                      .order_by(batches.c.first_seq, batches.c.id)).scalars()
            report = verifier.verify_batches([bytes(raw) for raw in raws], ranges[key_index].public_key,
                                             start_seq=last_seq + 1, start_hash=last_hash)
            problems += len(report.problems)
            events_count += report.events_checked
            last_seq, last_hash = report.last_seq, report.last_hash
        purged_to = max(row.last_seq for row in prefix)
        if last_seq != purged_to:
            # The range did not verify up to its end (e.g. an undecodable last batch): take the
            # agent-signed head of the last stored batch, the problems are already counted.
            last = max(prefix, key=lambda r: (r.last_seq, r.id))
            try:
                last_hash = bytes(records_batch.decode_batch(bytes(connection.execute(
                    select(batches.c.raw).where(batches.c.id == last.id)).scalar_one())).last_hash)
            except records_batch.BatchFormatError:
                last_hash = bytes(connection.execute(select(batches.c.last_hash)
                                                     .where(batches.c.id == last.id)).scalar_one())
            problems += 1

        signature = private_key.sign(checkpoint_message(agent_id, purged_to, last_hash, before_ns, now_ns,
                                                        len(prefix), events_count, problems, actor))
        connection.execute(insert(checkpoints).values(
            agent_id=agent_id, seq=purged_to, chain_hash=last_hash, before_ns=before_ns, created_ns=now_ns,
            batches=len(prefix), events=events_count, problems=problems, actor=actor,
            key_id=key_id(private_key.public_key()), signature=signature))

        connection.execute(delete(event_tables).where(event_tables.c.agent_id == agent_id,
                                                      event_tables.c.seq <= purged_to))
        deleted_events = connection.execute(delete(events).where(events.c.agent_id == agent_id,
                                                                 events.c.seq <= purged_to)).rowcount
        for chunk_start in range(0, len(ids), 500):
            connection.execute(delete(batches).where(batches.c.id.in_(ids[chunk_start:chunk_start + 500])))
        # Sessions that started before the cutoff and have no event left.
        deleted_sessions = connection.execute(delete(sessions).where(
            sessions.c.agent_id == agent_id, sessions.c.start_ns < before_ns,
            not_(exists().where(and_(events.c.sid == sessions.c.sid))))).rowcount
        result = AgentPurge(agent_id=agent_id, batches=len(prefix), events=deleted_events,
                            sessions=deleted_sessions, first_seq=start_seq, last_seq=purged_to, problems=problems)
        connection.execute(insert(access_log).values(
            ts=now_ns, subject=actor, role="admin", method="PURGE", path="/v1/retention",
            query=json.dumps({"agent": agent_id, "before": format_ns(before_ns), "seq": f"{start_seq}..{purged_to}",
                              "batches": len(prefix), "events": deleted_events, "sessions": deleted_sessions,
                              "verify_problems": problems}, sort_keys=True),
            status=200))
        return result
