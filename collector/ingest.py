"""Enrollment and verified ingest: signature, chain continuity, evidence + index in
one transaction, idempotent retries, problems flagged on the agent (never hidden)."""
from __future__ import annotations

import base64
import gc
import hashlib
import json
import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import BigInteger, Connection, String, Text, and_, bindparam, func, insert, or_, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

from collector.auth import consume_enrollment_token
from collector.indexer import (EVENT_COLUMNS, OPEN_DECISIONS, SESSION_END_COLUMNS, SESSION_START_COLUMNS,
                               TABLE_COLUMNS, LateDecision, build_index)
from collector.storage.engine import Store
from collector.storage.schema import access_log, agent_keys, agent_problems, agents, batches, events, sessions


log = logging.getLogger("warden.collector.ingest")

SESSION_COLUMNS = ("sid", "agent_id", "host", "identity", "target", "protocol", "process", "start_ns", "end_ns",
                   "event_count", "statement_count", "request_count", "denied_count",
                   *SESSION_START_COLUMNS, *SESSION_END_COLUMNS)
_NO_END = dict.fromkeys(SESSION_END_COLUMNS)


class IngestRejected(Exception):
    """The batch is refused (nothing stored); status is the HTTP code to answer."""

    def __init__(self, status: int, reason: str, detail: str):
        super().__init__(detail)
        self.status, self.reason, self.detail = status, reason, detail

    def __reduce__(self):  # raised in an ingest worker process, re-raised in the server
        return IngestRejected, (self.status, self.reason, self.detail)


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


class AgentKeyConflict(IngestRejected):
    """409: the agent id is enrolled with another key and the token may not replace it."""


def _key_id(raw_key: bytes) -> str:
    return hashlib.sha256(raw_key).hexdigest()


def enroll_agent(store: Store, *, token: str, agent_id: str, public_key_b64: str,
                 hostname: str | None, version: str | None = None) -> str:
    """Enroll an agent id with its key. An enrolled agent id keeps its key: re-enrolling it with
    another key is refused unless the token was created for that agent id as a rotation token
    (`warden-collector enroll create --agent ID --rotate`). A rotation keeps the old key in the
    agent's key history (agent_keys) for the sequence numbers it signed. Returns "enrolled",
    "rotated" or "unchanged" (the same key again)."""
    try:
        raw_key = base64.b64decode(public_key_b64, validate=True)
        Ed25519PublicKey.from_public_bytes(raw_key)
    except Exception:
        raise IngestRejected(400, "bad_public_key", "public_key must be base64 of a raw 32-byte Ed25519 key") from None
    if not agent_id or len(agent_id) > 200:
        raise IngestRejected(400, "bad_agent_id", "agent_id must be 1..200 characters")
    try:
        with store.write() as connection:
            grant = consume_enrollment_token(connection, token, agent_id)
            agent_query = select(agents).where(agents.c.agent_id == agent_id)
            if not store.is_sqlite:
                agent_query = agent_query.with_for_update()  # serialized with this agent's ingest
            existing = connection.execute(agent_query).first()
            now = time.time_ns()
            key_row = dict(agent_id=agent_id, public_key=raw_key, key_id=_key_id(raw_key), enrolled_ns=now,
                           hostname=hostname, token_id=grant.token_id, minted_by=grant.created_by)
            if existing is None:
                connection.execute(insert(agents).values(
                    agent_id=agent_id, public_key=raw_key, hostname=hostname, version=version, enrolled_ns=now,
                    last_seq=0, batches=0, events=0, chain_ok=True, problem_count=0, key_from_seq=1))
                connection.execute(insert(agent_keys).values(valid_from_seq=1, rotation=False, **key_row))
                _audit(connection, now, "ENROLL", agent_id, grant, raw_key, hostname)
                return "enrolled"
            if bytes(existing.public_key) == raw_key:
                return "unchanged"  # the same key again (e.g. the agent lost its enrollment state)
            if not (grant.rotate and grant.agent_id == agent_id):
                raise AgentKeyConflict(
                    409, "already_enrolled",
                    f"agent {agent_id!r} is already enrolled with another key; an enrollment token cannot replace "
                    f"it. To rotate its key, an admin creates a rotation token: "
                    f"warden-collector enroll create --agent {agent_id} --rotate")
            _rotate(connection, existing, now, key_row, version)
            _audit(connection, now, "ROTATE", agent_id, grant, raw_key, hostname,
                   previous_key_id=_key_id(bytes(existing.public_key)), last_seq=existing.last_seq)
    except IntegrityError:
        # Two first enrollments of one agent id at once (PostgreSQL): the other one won.
        raise AgentKeyConflict(409, "already_enrolled", f"agent {agent_id!r} was enrolled concurrently") from None
    store.agent_identities.pop(agent_id, None)
    log.warning("agent %s: key rotated (token created by %s)", agent_id, grant.created_by or "?")
    return "rotated"


def _rotate(connection: Connection, existing, now: int, key_row: dict, version: str | None) -> None:
    """Replace the agent's key; the old one stays in agent_keys for the sequence numbers it
    signed. The new key's range starts at its first batch (ingest fixes valid_from_seq then):
    until then the old key's batches the agent had not delivered are still taken."""
    agent_id = existing.agent_id
    history = connection.execute(select(agent_keys.c.id).where(agent_keys.c.agent_id == agent_id)).first()
    if history is None:  # enrolled before key history existed, or inserted directly
        connection.execute(insert(agent_keys).values(
            agent_id=agent_id, public_key=bytes(existing.public_key), key_id=_key_id(bytes(existing.public_key)),
            valid_from_seq=existing.key_from_seq if existing.key_from_seq is not None else 1,
            enrolled_ns=existing.enrolled_ns, hostname=existing.hostname, rotation=False))
    connection.execute(update(agent_keys).where(agent_keys.c.agent_id == agent_id,
                                                agent_keys.c.replaced_ns.is_(None)).values(replaced_ns=now))
    connection.execute(insert(agent_keys).values(valid_from_seq=None, rotation=True, **key_row))
    values = dict(public_key=key_row["public_key"], hostname=key_row["hostname"], key_from_seq=None)
    if version is not None:
        values["version"] = version
    connection.execute(update(agents).where(agents.c.agent_id == agent_id).values(**values))


def _audit(connection: Connection, now: int, what: str, agent_id: str, grant, raw_key: bytes,
           hostname: str | None, **extra) -> None:
    """Enrollments and key rotations go to the access log (admins: GET /v1/access-log)."""
    detail = {"agent": agent_id, "key_id": _key_id(raw_key), "hostname": hostname,
              "token_created_by": grant.created_by, "token_for_agent": grant.agent_id,
              "token_rotate": grant.rotate, **extra}
    connection.execute(insert(access_log).values(
        ts=now, subject=f"agent:{agent_id}"[:255], role="agent", method=what, path="/v1/agents/enroll",
        query=json.dumps(detail, sort_keys=True), status=200))


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


# --- ingest worker processes ------------------------------------------------------------
# Decoding, hashing every event, checking the signature and building index rows is pure
# Python; in one process the GIL serializes it, and on SQLite the writer holding the
# lock is slowed by the threads preparing the next batches. Large batches are therefore
# ingested whole (the same verify + decode + store path, same transaction) by worker
# processes, each with its own connections; the server process only passes bytes.
# WARDEN_INGEST_WORKERS sets their number (0: ingest in the calling thread; default two
# per CPU).
_OFFLOAD_MIN_BYTES = 2048   # smaller batches cost more to hand over than to ingest here
_SERVER_WATCH_SECONDS = 0.5  # how soon a worker notices that the server is gone
_pool_lock = threading.Lock()
_pool = None
_pool_workers = None        # None: not decided yet
_worker_stores: dict[str, Store] = {}


def _default_workers() -> int:
    setting = os.environ.get("WARDEN_INGEST_WORKERS", "").strip()
    if setting:
        return max(0, int(setting))
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux, or a seccomp filter refuses it
        cpus = os.cpu_count() or 1
    # Two per CPU: a worker spends much of a batch waiting (for the SQLite write lock, the
    # database, an fsync), so one per CPU leaves CPUs idle (measured with 2 CPUs on SQLite:
    # 2 workers 53.6k events/s, 4 workers 57.3k). One CPU gains nothing: ingest in place.
    return min(2 * cpus, 16) if cpus > 1 else 0


def set_ingest_workers(count: int | None) -> None:
    """Use count worker processes from now on (0: none; None: the default); stops the current ones."""
    global _pool_workers
    shutdown_ingest_workers()
    with _pool_lock:
        _pool_workers = count


def shutdown_ingest_workers() -> None:
    global _pool
    with _pool_lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=False)


def _worker_pool():
    global _pool, _pool_workers
    with _pool_lock:
        if _pool_workers is None:
            _pool_workers = _default_workers()
        if _pool is None and _pool_workers > 0:
            # spawn: a fresh interpreter, not a fork of a threaded server holding connections
            _pool = ProcessPoolExecutor(_pool_workers, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_worker_init, initargs=(os.getpid(),))
        return _pool


def start_ingest_workers() -> list[int]:
    """Start the worker processes now (rather than at the first large batch); their pids."""
    pool = _worker_pool()
    if pool is None:
        return []
    for future in [pool.submit(os.getpid) for _ in range(_pool_workers * 2)]:
        future.result()
    return ingest_worker_pids()


def ingest_worker_pids() -> list[int]:
    with _pool_lock:
        processes = getattr(_pool, "_processes", None) or {}
        return sorted(processes)


def _worker_init(server_pid: int) -> None:
    # A worker only runs ingests, which allocate many short-lived, acyclic containers
    # (event dicts, index rows): collect less often, and never scan the imports again.
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    # The pool's queue pipes are shared by all its workers, so a worker never reads EOF when
    # the server dies without shutting the pool down (kill -9, OOM): it would linger with the
    # database open. It leaves once it is no longer the server's child.
    threading.Thread(target=_leave_with_server, args=(server_pid,), name="ingest-server-watch",
                     daemon=True).start()


def _leave_with_server(server_pid: int) -> None:
    while os.getppid() == server_pid:
        time.sleep(_SERVER_WATCH_SECONDS)
    # an ingest running now is one transaction: it is rolled back with the process
    os._exit(0)


def _ingest_in_worker(url: str, agent_id: str, raw: bytes) -> IngestResult:
    store = _worker_stores.get(url)
    if store is None:
        store = _worker_stores[url] = Store(url)
    return _ingest_here(store, agent_id, raw)


def _shareable(store: Store) -> bool:
    """Other processes can open the same database (not an in-memory SQLite)."""
    if not store.is_sqlite:
        return True
    database = make_url(store.url).database
    return bool(database) and database != ":memory:" and not database.startswith("file::memory:")


def ingest_batch(store: Store, agent_id: str, raw: bytes) -> IngestResult:
    """Verify and store one batch; returns once evidence and index are committed."""
    if len(raw) >= _OFFLOAD_MIN_BYTES and _shareable(store):
        pool = _worker_pool()
        if pool is not None:
            try:
                return pool.submit(_ingest_in_worker, store.url, agent_id, raw).result()
            except BrokenProcessPool:
                # A worker died (e.g. killed). Its transaction committed entirely or not at
                # all; ingesting here is then a first store or an idempotent retry. Fresh
                # workers start with the next large batch.
                log.warning("an ingest worker process died; ingesting this batch in the server process")
                shutdown_ingest_workers()
            except OSError as exc:  # no new processes here (a sandbox, a process limit)
                log.warning("cannot start ingest worker processes (%s); ingesting in the server process", exc)
                set_ingest_workers(0)
    return _ingest_here(store, agent_id, raw)


def _ingest_here(store: Store, agent_id: str, raw: bytes) -> IngestResult:
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
    # Decoding, the signature check and building the index rows are most of the work and
    # need no lock: do them before the write transaction so concurrent agents overlap.
    # The key comes from a per-process cache (one transaction less per batch); the write
    # transaction below reads the agent row again and re-checks if the key changed.
    known_agent = store.agent_identities.get(agent_id)
    if known_agent is None:
        with store.read() as connection:
            row = connection.execute(select(agents.c.public_key, agents.c.hostname)
                                     .where(agents.c.agent_id == agent_id)).first()
        if row is None:
            raise IngestRejected(401, "not_enrolled", f"agent {agent_id!r} is not enrolled")
        known_agent = store.agent_identities[agent_id] = (bytes(row.public_key), row.hostname)
    checked_key, checked_hostname = known_agent
    signed = _authentic(records_batch, batch, Ed25519PublicKey.from_public_bytes(checked_key))
    prepared = build_index(agent_id, checked_hostname, 0, batch.events, {}) if signed else None

    now = time.time_ns()
    with store.write() as connection:
        agent_query = select(agents).where(agents.c.agent_id == agent_id)
        if not store.is_sqlite:
            agent_query = agent_query.with_for_update()  # serialize one agent's ingest across replicas
        agent = connection.execute(agent_query).first()
        if agent is None:
            store.agent_identities.pop(agent_id, None)
            raise IngestRejected(401, "not_enrolled", f"agent {agent_id!r} is not enrolled")
        public_key = Ed25519PublicKey.from_public_bytes(bytes(agent.public_key))
        if bytes(agent.public_key) != checked_key or agent.hostname != checked_hostname:
            # Re-enrolled meanwhile: check against the key that is current now.
            store.agent_identities[agent_id] = (bytes(agent.public_key), agent.hostname)
            signed = _authentic(records_batch, batch, public_key)
            prepared = build_index(agent_id, agent.hostname, 0, batch.events, {}) if signed else None
        index_hostname = agent.hostname
        earlier = None
        if not signed:
            # Signed by the key this agent had before a rotation? Taken for that key's sequence
            # range only (the request itself is authenticated by the current key).
            earlier = _earlier_key(connection, records_batch, agent, batch)
            if earlier is not None:
                public_key, index_hostname = earlier
                signed = True
                prepared = build_index(agent_id, index_hostname, 0, batch.events, {})

        # agent.last_seq is the highest seq ever stored for this agent (it only grows, in the
        # same transaction as each batch), so a batch starting right after it can neither
        # repeat a stored range nor overlap stored events: skip those two lookups.
        continues = batch.first_seq == agent.last_seq + 1
        if not continues:
            same_range = connection.execute(select(batches.c.id, batches.c.last_hash).where(
                batches.c.agent_id == agent_id, batches.c.first_seq == batch.first_seq,
                batches.c.last_seq == batch.last_seq)).first()
            if same_range is not None:
                return _duplicate(connection, verifier, agent, batch, public_key, same_range, now, signed)

        if not signed:
            raise IngestRejected(422, "bad_signature", "batch refused, it is not what the agent signed: "
                                 + _forgery_detail(verifier, batch, public_key))
        starts_key_range = False
        if earlier is None and agent.key_from_seq is None:
            # The first batch of a rotated-in key: its range starts here, above everything stored.
            starts_key_range = _start_key_range(connection, agent, batch)
        elif earlier is None and batch.first_seq < agent.key_from_seq:
            raise IngestRejected(422, "predates_key",
                                 f"batch seq {batch.first_seq}..{batch.last_seq} is signed by agent {agent_id!r}'s "
                                 f"current key, which took over at seq {agent.key_from_seq} (key rotation): "
                                 f"refused, earlier sequence numbers belong to the previous key")
        prev_seq, prev_hash = _predecessor(connection, codec, agent, batch)
        if batch.first_seq == prev_seq + 1 and bytes(batch.prev_hash) == prev_hash:
            # The signature already covers every event hash (checked above), so a batch
            # that links to its predecessor is a clean continuation; the shared verifier
            # (which re-encodes every event) is only needed to describe a problem.
            problems = []
        else:
            problems = list(verifier.verify_continuation(prev_seq, prev_hash, batch, public_key))

        # Seqs already indexed (overlapping ranges) keep their first copy in the index.
        already = set() if continues else set(connection.execute(select(events.c.seq).where(
            events.c.agent_id == agent_id, events.c.seq >= batch.first_seq,
            events.c.seq <= batch.last_seq)).scalars())
        timestamps = [ev["ts"] for ev in batch.events]
        batch_id = connection.execute(insert(batches).values(
            agent_id=agent_id, first_seq=batch.first_seq, last_seq=batch.last_seq,
            prev_hash=bytes(batch.prev_hash), last_hash=bytes(batch.last_hash), event_count=len(batch.events),
            first_ts=min(timestamps), last_ts=max(timestamps), received_ns=now, raw=raw,
            raw_sha256=hashlib.sha256(raw).hexdigest(), chain_ok=not problems,
        ).returning(batches.c.id)).scalar_one()
        if already and not any(p.kind == "inserted" for p in problems):
            problems.append(_overlap_problem(verifier, agent_id, batch, already))
        fresh_events = batch.events
        if already:
            fresh_events = [ev for ev in batch.events if ev["seq"] not in already]
            prepared = build_index(agent_id, index_hostname, 0, fresh_events, {})
        _store_index(store, connection, agent, batch_id, prepared, index_hostname)
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
        if starts_key_range:
            values["key_from_seq"] = batch.first_seq
        if problems:
            values.update(chain_ok=False, problem_count=agents.c.problem_count + len(problems))
        connection.execute(update(agents).where(agents.c.agent_id == agent_id).values(**values))
        return IngestResult(duplicate=False, last_seq=max(batch.last_seq, agent.last_seq),
                            events=len(fresh_events), problems=stored_problems)


def _duplicate(connection: Connection, verifier, agent, batch, public_key, same_range,
               now, signed: bool) -> IngestResult:
    # A retry must carry the same signed content; anything else is a fork, refused.
    if bytes(same_range.last_hash) != bytes(batch.last_hash):
        raise IngestRejected(409, "conflicting_batch",
                             f"seq {batch.first_seq}..{batch.last_seq} is already stored with a different hash")
    if not signed:
        raise IngestRejected(422, "bad_signature", "retry refused, it is not what the agent signed: "
                             + _forgery_detail(verifier, batch, public_key))
    connection.execute(update(agents).where(agents.c.agent_id == agent.agent_id).values(last_seen_ns=now))
    return IngestResult(duplicate=True, last_seq=agent.last_seq, events=0, problems=[])


def _key_ranges(connection: Connection, agent_id: str) -> list:
    """The agent's keys that signed batches, oldest first: rows (valid_from_seq, public_key, hostname)."""
    return connection.execute(select(agent_keys.c.valid_from_seq, agent_keys.c.public_key, agent_keys.c.hostname)
                              .where(agent_keys.c.agent_id == agent_id, agent_keys.c.valid_from_seq.is_not(None))
                              .order_by(agent_keys.c.valid_from_seq, agent_keys.c.id)).fetchall()


def _earlier_key(connection: Connection, records_batch, agent, batch):
    """(public key, hostname) of an earlier key of this agent that signed this batch, when the
    batch lies entirely in that key's sequence range; else None. A key's range ends where the
    next key's first batch starts (the previous key's range stays open while a rotated-in key
    has signed nothing yet)."""
    ranges = _key_ranges(connection, agent.agent_id)
    current = bytes(agent.public_key)
    for position, (valid_from, raw_key, hostname) in enumerate(ranges):
        valid_to = ranges[position + 1].valid_from_seq - 1 if position + 1 < len(ranges) else None
        if bytes(raw_key) == current or batch.first_seq < valid_from \
                or (valid_to is not None and batch.first_seq > valid_to):
            continue
        if valid_to is not None and batch.last_seq > valid_to:
            return None
        key = Ed25519PublicKey.from_public_bytes(bytes(raw_key))
        return (key, hostname) if _authentic(records_batch, batch, key) else None
    return None


def _start_key_range(connection: Connection, agent, batch) -> bool:
    """Fix where a rotated-in key's range starts (its first batch) and where the previous one's
    ends. False for an agent without a pending key in agent_keys (nothing to fix)."""
    agent_id = agent.agent_id
    pending = connection.execute(select(agent_keys.c.id).where(
        agent_keys.c.agent_id == agent_id, agent_keys.c.replaced_ns.is_(None),
        agent_keys.c.valid_from_seq.is_(None))).first()
    if pending is None:
        return False
    if batch.first_seq <= agent.last_seq:
        raise IngestRejected(422, "predates_key",
                             f"batch seq {batch.first_seq}..{batch.last_seq} is the first signed by agent "
                             f"{agent_id!r}'s new key (rotation), but seq {agent.last_seq} is already stored: a new "
                             f"key's range must start after everything the previous key signed")
    connection.execute(update(agent_keys).where(
        agent_keys.c.agent_id == agent_id, agent_keys.c.valid_from_seq.is_not(None),
        agent_keys.c.valid_to_seq.is_(None), agent_keys.c.replaced_ns.is_not(None))
        .values(valid_to_seq=batch.first_seq - 1))
    connection.execute(update(agent_keys).where(agent_keys.c.id == pending.id)
                       .values(valid_from_seq=batch.first_seq))
    return True


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


def _store_index(store: Store, connection: Connection, agent, batch_id: int, index, hostname: str | None) -> None:
    """hostname: the one enrolled with the key that signed the batch (the agent's, unless an
    earlier key signed it); a session with no session.start in the batch gets it."""
    known = store.sessions_by_sid(connection, list(index.sessions))
    existing_sessions = set(known)
    index.resolve(known)
    index.set_batch_id(batch_id)
    store.bulk_insert(connection, "events", EVENT_COLUMNS, index.event_rows)
    store.bulk_insert(connection, "event_tables", TABLE_COLUMNS, index.table_rows)

    new_rows, increments, late_starts = [], [], []
    for sid, delta in index.sessions.items():
        end = delta.end or _NO_END
        if sid not in existing_sessions:
            start = delta.start or {}
            new_rows.append((sid, agent.agent_id, start.get("host", hostname), start.get("identity"),
                             start.get("target"), start.get("protocol"), start.get("process"),
                             start.get("start_ns", delta.first_ts), delta.end_ns, delta.events, delta.statements,
                             delta.requests, delta.denied, *[start.get(name) for name in SESSION_START_COLUMNS],
                             *[end[name] for name in SESSION_END_COLUMNS]))
            continue
        increments.append({"b_sid": sid, "b_events": delta.events, "b_statements": delta.statements,
                           "b_requests": delta.requests, "b_denied": delta.denied, "b_end": delta.end_ns,
                           "b_end_reason": end["end_reason"], "b_end_error": end["end_error"],
                           "b_end_sqlstate": end["end_sqlstate"]})
        if delta.start:
            late_starts.append((sid, delta.start))
    store.bulk_insert(connection, "sessions", SESSION_COLUMNS, new_rows)
    if increments:
        c = sessions.c
        connection.execute(update(sessions).where(c.sid == bindparam("b_sid")).values(
            event_count=c.event_count + bindparam("b_events"),
            statement_count=c.statement_count + bindparam("b_statements"),
            request_count=c.request_count + bindparam("b_requests"),
            denied_count=c.denied_count + bindparam("b_denied"),
            end_ns=func.coalesce(bindparam("b_end", type_=BigInteger), c.end_ns),
            # a session.end in a later batch than the session's first events (the usual case
            # for a long session) says how it ended
            end_reason=func.coalesce(bindparam("b_end_reason", type_=String), c.end_reason),
            end_error=func.coalesce(bindparam("b_end_error", type_=Text), c.end_error),
            end_sqlstate=func.coalesce(bindparam("b_end_sqlstate", type_=String), c.end_sqlstate)), increments)
    # A session.start that arrives after some of its events (rare): fill the session row
    # (identity, target, process and how it connected) and let the earlier events inherit
    # identity/target.
    for sid, start in late_starts:
        connection.execute(update(sessions).where(sessions.c.sid == sid).values(**start))
        connection.execute(update(events).where(
            and_(events.c.sid == sid, events.c.identity.is_(None))).values(
            identity=start["identity"], target=start["target"]))
    if index.late_decisions:
        _apply_late_decisions(connection, agent.agent_id, index.late_decisions)


_LATE_SIDS_PER_QUERY = 500


def _apply_late_decisions(connection: Connection, agent_id: str, decisions: list[LateDecision]) -> None:
    """Put each decision on the stored http.request it decided (same agent, session and
    request_index) while that one is still open; runs after this batch's rows are inserted,
    so a request earlier in the same batch is found too. Only the index's decision column
    changes: the fields are the evidence and stay as recorded."""
    wanted = {(d.sid, d.request_index): d.decision for d in decisions}
    sids = sorted({d.sid for d in decisions})
    still_open = or_(events.c.decision.is_(None), events.c.decision.in_([d for d in OPEN_DECISIONS if d]))
    changes = []
    for start in range(0, len(sids), _LATE_SIDS_PER_QUERY):
        # ix_events_sid finds a session's rows; few of them are open requests
        rows = connection.execute(select(events.c.seq, events.c.sid, events.c.fields).where(
            events.c.agent_id == agent_id, events.c.sid.in_(sids[start:start + _LATE_SIDS_PER_QUERY]),
            events.c.type == "http.request", still_open))
        for row in rows:
            decision = wanted.get((row.sid, json.loads(row.fields).get("request_index")))
            if decision is not None:
                changes.append({"b_seq": row.seq, "b_decision": decision})
    if changes:
        connection.execute(update(events).where(events.c.agent_id == agent_id, events.c.seq == bindparam("b_seq"))
                           .values(decision=bindparam("b_decision")), changes)
