"""Check a chain of signed batches and say exactly what is wrong with it.

A batch whose signature verifies is authentic as a whole, so only its place in the
chain (sequence continuity, previous hash) is checked. When the signature fails, the
verifier locates the damage, in this order:

1. reordered: sorting the events by sequence number makes the signature verify;
2. inserted: removing one event (a duplicate or out-of-range sequence number, an event
   whose content tag does not match, or, for a batch with one event too many, any
   event) makes the signature verify;
3. otherwise it lists events whose content no longer matches their tag (modified),
   sequence numbers absent from the signed range (missing), duplicates (inserted) and
   out-of-order events (reordered); when nothing can be located the batch is reported
   as bad_signature (re-signed with another key, or its header edited).

Across batches: a gap in sequence numbers is "missing" (e.g. a deleted batch), a batch
covering numbers already covered is "inserted", batches out of order are "reordered",
and a previous-hash that does not link while the numbers continue is "gap".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import (Ed25519PrivateKey,
                                                               Ed25519PublicKey)

from records.batch import (TAG_BYTES, Batch, BatchFormatError, batch_signature_valid,
                           content_tag, decode_batch)
from records.codec import GENESIS_HASH, canonical_encode, event_hash
from records.signing import public_key_from_bytes

PROBLEM_KINDS = ("bad_signature", "modified", "missing", "reordered", "inserted", "gap",
                 "bad_format", "unknown_key")
# Trying every event for removal costs O(n^2) hashing; bound it.
_MAX_REMOVAL_SEARCH = 4096


@dataclass
class Problem:
    kind: str
    agent_id: str
    seq: int | None
    batch_index: int | None
    detail: str


@dataclass
class VerifyReport:
    ok: bool
    problems: list[Problem] = field(default_factory=list)
    events_checked: int = 0
    batches_checked: int = 0
    last_seq: int = 0
    last_hash: bytes = GENESIS_HASH


KeySource = Ed25519PublicKey | Ed25519PrivateKey | bytes | Mapping | None


def _resolve_key(public_key: KeySource, agent_id: str) -> Ed25519PublicKey | None:
    if isinstance(public_key, Mapping):
        public_key = public_key.get(agent_id)
    if public_key is None:
        return None
    if isinstance(public_key, (bytes, bytearray)):
        return public_key_from_bytes(bytes(public_key))
    if isinstance(public_key, Ed25519PrivateKey):
        return public_key.public_key()
    return public_key


def _chain_hashes(prev_hash: bytes, encodings: list[bytes]) -> list[bytes]:
    hashes = []
    previous = prev_hash
    for encoded in encodings:
        previous = event_hash(previous, encoded)
        hashes.append(previous)
    return hashes


@dataclass
class _Checked:
    index: int
    batch: Batch
    signature_ok: bool
    problems: list[Problem]


def _check_batch(index: int, batch: Batch, key: Ed25519PublicKey | None,
                 decoded_hashes: list[bytes] | None = None) -> _Checked:
    """``decoded_hashes``: the event hashes decode_batch computed for ``batch`` just now
    (from bytes, the batch not yet handed to anyone), which are exactly what re-encoding
    the events would give; a Batch supplied by the caller is always re-encoded."""
    agent = batch.agent_id
    events = batch.events
    encodings = None
    if decoded_hashes is None:
        encodings = [canonical_encode(event) for event in events]
        hashes = _chain_hashes(batch.prev_hash, encodings)
    else:
        hashes = decoded_hashes

    def problem(kind, seq, detail):
        return Problem(kind, agent, seq, index, detail)

    if key is None:
        return _Checked(index, batch, False, [problem(
            "unknown_key", batch.first_seq,
            f"no public key known for agent {agent!r}; enroll it or pass its key")])
    if batch_signature_valid(batch, key, hashes):
        seqs = [event["seq"] for event in events]
        problems = []
        if seqs != list(range(batch.first_seq, batch.last_seq + 1)) \
                or hashes[-1] != batch.last_hash \
                or any(event["agent"] != agent for event in events):
            problems.append(problem("bad_format", batch.first_seq,
                                    "validly signed batch whose header disagrees with its "
                                    "events (writer bug)"))
        return _Checked(index, batch, True, problems)
    if encodings is None:
        encodings = [canonical_encode(event) for event in events]
    return _Checked(index, batch, False, _locate(index, batch, key, encodings))


def _signature_ok_for(batch: Batch, key, encodings: list[bytes]) -> bool:
    """Would the signature verify over events with these canonical encodings?"""
    return batch_signature_valid(batch, key, _chain_hashes(batch.prev_hash, encodings))


def _locate(index: int, batch: Batch, key, encodings: list[bytes]) -> list[Problem]:
    agent = batch.agent_id
    events = batch.events
    seqs = [event["seq"] for event in events]

    def problem(kind, seq, detail):
        return Problem(kind, agent, seq, index, detail)

    # 1. A pure reordering of authentic events.
    ordered = sorted(range(len(events)), key=lambda j: seqs[j])
    if ordered != list(range(len(events))):
        if _signature_ok_for(batch, key, [encodings[j] for j in ordered]):
            first_bad = next(seqs[j] for j in range(len(events))
                             if j != ordered[j])
            return [problem("reordered", first_bad,
                            f"events of batch {index} are out of sequence order, "
                            f"first misplaced seq {first_bad}; content is authentic")]

    tags = batch.tags if len(batch.tags) == len(events) * TAG_BYTES else b""
    tag_mismatch = [j for j in range(len(events)) if tags
                    and content_tag(encodings[j]) != tags[j * TAG_BYTES:(j + 1) * TAG_BYTES]]

    # 2. One forged event added to an authentic batch.
    seen: dict[int, int] = {}
    suspects = []
    for j, seq in enumerate(seqs):
        if seq < batch.first_seq or seq > batch.last_seq or seq in seen:
            suspects.append(j)
            if seq in seen:
                suspects.append(seen[seq])
        seen.setdefault(seq, j)
    suspects += tag_mismatch
    extra_one = len(events) == batch.last_seq - batch.first_seq + 2
    if extra_one and len(events) <= _MAX_REMOVAL_SEARCH:
        suspects += range(len(events))
    tried = set()
    for j in suspects:
        if j in tried:
            continue
        tried.add(j)
        if _signature_ok_for(batch, key, encodings[:j] + encodings[j + 1:]):
            return [problem("inserted", seqs[j],
                            f"event at position {j} (seq {seqs[j]}, type "
                            f"{events[j]['type']}) was not signed by the agent; the batch "
                            f"verifies without it")]

    # 3. Describe what can be seen.
    problems = []
    for j in tag_mismatch:
        problems.append(problem("modified", seqs[j],
                                f"event seq {seqs[j]} (type {events[j]['type']}) differs "
                                f"from what the agent signed"))
    counted: set[int] = set()
    highest = None
    for j, seq in enumerate(seqs):
        if seq in counted or seq < batch.first_seq or seq > batch.last_seq:
            if j not in tag_mismatch:
                problems.append(problem("inserted", seq,
                                        f"event at position {j} repeats or lies outside "
                                        f"the signed range {batch.first_seq}..{batch.last_seq}"))
            continue
        if highest is not None and seq < highest:
            problems.append(problem("reordered", seq,
                                    f"seq {seq} appears after seq {highest}"))
        counted.add(seq)
        highest = seq if highest is None else max(highest, seq)
    run_start = None
    for seq in range(batch.first_seq, batch.last_seq + 2):
        absent = seq <= batch.last_seq and seq not in counted
        if absent and run_start is None:
            run_start = seq
        elif not absent and run_start is not None:
            problems.append(problem("missing", run_start,
                                    f"events {run_start}..{seq - 1} of batch {index} "
                                    f"(signed range {batch.first_seq}..{batch.last_seq}) "
                                    f"are absent"))
            run_start = None
    if not problems:
        problems.append(problem("bad_signature", batch.first_seq,
                                f"batch {index} (seq {batch.first_seq}..{batch.last_seq}) "
                                f"does not verify with the agent's key: re-signed with "
                                f"another key or its header was edited"))
    return problems


def verify_batches(batches: Iterable[bytes | Batch], public_key: KeySource,
                   start_seq: int = 1, start_hash: bytes = GENESIS_HASH) -> VerifyReport:
    problems: list[Problem] = []
    checked: list[_Checked] = []
    chain_agent = None
    for index, item in enumerate(batches):
        decoded_hashes = None
        if isinstance(item, Batch):
            batch = item
        else:
            try:
                batch = decode_batch(item)
            except BatchFormatError as exc:
                problems.append(Problem("bad_format", chain_agent or "", None, index,
                                        f"batch {index} cannot be read: {exc}"))
                continue
            # Just decoded here: its events' hashes were computed from these bytes once.
            decoded_hashes = [event["hash"] for event in batch.events]
        if chain_agent is None:
            chain_agent = batch.agent_id
        elif batch.agent_id != chain_agent:
            problems.append(Problem("inserted", batch.agent_id, batch.first_seq, index,
                                    f"batch {index} belongs to agent {batch.agent_id!r}, "
                                    f"this chain is agent {chain_agent!r}"))
            continue
        checked.append(_check_batch(index, batch, _resolve_key(public_key, batch.agent_id),
                                    decoded_hashes))

    # Batches handed over out of order (by first sequence number).
    highest_first = None
    for item in checked:
        first, last = item.batch.first_seq, item.batch.last_seq
        if highest_first is not None and first < highest_first[0] \
                and last < highest_first[0]:
            problems.append(Problem("reordered", chain_agent, first, item.index,
                                    f"batch {item.index} (seq {first}..{last}) comes after "
                                    f"batch {highest_first[1]} which starts at "
                                    f"{highest_first[0]}"))
        if highest_first is None or first > highest_first[0]:
            highest_first = (first, item.index)

    expected_seq, chain, previous_index = start_seq, start_hash, None
    report = VerifyReport(ok=False, last_seq=start_seq - 1, last_hash=start_hash)
    for item in sorted(checked, key=lambda c: (c.batch.first_seq, not c.signature_ok,
                                               c.index)):
        batch = item.batch
        agent = batch.agent_id
        if batch.first_seq < expected_seq:
            problems.append(Problem("inserted", agent, batch.first_seq, item.index,
                                    f"batch {item.index} (seq {batch.first_seq}.."
                                    f"{batch.last_seq}) covers sequence numbers already "
                                    f"covered (up to {expected_seq - 1})"
                                    + (" - a validly signed duplicate" if item.signature_ok
                                       else "")))
            continue
        after = f"batch {previous_index}" if previous_index is not None else "the start"
        if batch.first_seq > expected_seq:
            problems.append(Problem("missing", agent, expected_seq, item.index,
                                    f"events {expected_seq}..{batch.first_seq - 1} are "
                                    f"absent between {after} and batch {item.index}"))
        elif batch.prev_hash != chain:
            problems.append(Problem("gap", agent, batch.first_seq, item.index,
                                    f"batch {item.index} does not link to {after}: its "
                                    f"previous hash differs although the sequence "
                                    f"numbers continue"))
        problems.extend(item.problems)
        report.batches_checked += 1
        report.events_checked += len(batch.events)
        expected_seq, chain, previous_index = batch.last_seq + 1, batch.last_hash, item.index

    problems.sort(key=lambda p: (p.batch_index if p.batch_index is not None else -1,
                                 p.seq if p.seq is not None else -1))
    report.problems = problems
    report.ok = not problems
    report.last_seq, report.last_hash = expected_seq - 1, chain
    return report


def verify_continuation(prev_last_seq: int, prev_last_hash: bytes, batch: Batch,
                        public_key: KeySource) -> list[Problem]:
    """Problems with appending ``batch`` to a chain that ends at (seq, hash)."""
    return verify_batches([batch], public_key, start_seq=prev_last_seq + 1,
                          start_hash=prev_last_hash).problems
