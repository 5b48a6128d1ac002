"""Signed batches of chained events, and their wire/spool form.

Wire form (version 1): one zstd frame holding a msgpack map. Events are stored by
column: deltas for sequence numbers and timestamps, per-batch tables for session ids
and event types, the field maps in order, and an 8-byte *content tag* per event
(``SHA-256(canonical_encode(event))[:8]``). Per-event previous/own hashes are not
stored: they follow from the batch's ``prev_hash`` and the hash rule in
``records.codec`` and are recomputed on decode. The tags are not needed for integrity
(the signature covers every event hash); they let a verifier point at the exact event
that was edited after signing.

Signature: Ed25519 over ``signing_digest(...)`` =
``SHA-256(msgpack(["warden.batch", schema_version, agent_id, first_seq, last_seq,
prev_hash, last_hash, created_ns]) || hash_1 || ... || hash_n)``.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import msgpack
import zstandard
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (Ed25519PrivateKey,
                                                               Ed25519PublicKey)

from records.codec import EncodingError, canonical_encode, event_hash
from records.schema import SCHEMA_VERSION

WIRE_FORMAT = 1
TAG_BYTES = 8
MAX_COMPRESSED_BYTES = 64 << 20
MAX_DECODED_BYTES = 256 << 20
ZSTD_LEVEL = 3

_sha256 = hashlib.sha256


class BatchFormatError(ValueError):
    """Bytes that are not a well-formed batch."""


@dataclass
class Batch:
    agent_id: str
    first_seq: int
    last_seq: int
    prev_hash: bytes
    last_hash: bytes
    events: list[dict]
    created_ns: int
    signature: bytes
    schema_version: int
    # Content tags as signed by the agent (see module doc); b"" when unknown.
    tags: bytes = field(default=b"", repr=False)


def content_tag(encoded: bytes) -> bytes:
    return _sha256(encoded).digest()[:TAG_BYTES]


def signing_digest(agent_id: str, first_seq: int, last_seq: int, prev_hash: bytes,
                   last_hash: bytes, created_ns: int, schema_version: int,
                   event_hashes: list[bytes]) -> bytes:
    header = msgpack.packb(["warden.batch", schema_version, agent_id, first_seq,
                            last_seq, prev_hash, last_hash, created_ns],
                           use_bin_type=True)
    return _sha256(header + b"".join(event_hashes)).digest()


def build_batch(agent_id: str, events: list[dict], key: Ed25519PrivateKey,
                created_ns: int | None = None,
                encodings: list[bytes] | None = None) -> Batch:
    """Sign a run of sealed, consecutive events (as returned by seal_event).

    ``encodings`` (from seal_event_encoded) saves re-encoding every event; the caller
    vouches that they belong to these events, so only the chain links are checked."""
    if not events:
        raise ValueError("a batch needs at least one event")
    tags = bytearray()
    hashes = []
    previous = events[0]["prev"]
    expected_seq = events[0]["seq"]
    for position, event in enumerate(events):
        if event["agent"] != agent_id:
            raise ValueError(f"event seq={event['seq']} belongs to agent {event['agent']!r}, "
                             f"not {agent_id!r}")
        if event["seq"] != expected_seq or event["prev"] != previous:
            raise ValueError(f"events are not one unbroken chain at seq={event['seq']}")
        if encodings is None:
            encoded = canonical_encode(event)
            if event_hash(previous, encoded) != event["hash"]:
                raise ValueError(f"event seq={event['seq']}: hash does not match its content")
        else:
            encoded = encodings[position]
        tags += content_tag(encoded)
        hashes.append(event["hash"])
        previous = event["hash"]
        expected_seq += 1
    created_ns = time.time_ns() if created_ns is None else created_ns
    first, last = events[0]["seq"], events[-1]["seq"]
    digest = signing_digest(agent_id, first, last, events[0]["prev"], previous, created_ns,
                            SCHEMA_VERSION, hashes)
    return Batch(agent_id=agent_id, first_seq=first, last_seq=last,
                 prev_hash=events[0]["prev"], last_hash=previous, events=events,
                 created_ns=created_ns, signature=key.sign(digest),
                 schema_version=SCHEMA_VERSION, tags=bytes(tags))


def batch_signature_valid(batch: Batch, public_key: Ed25519PublicKey,
                          event_hashes: list[bytes]) -> bool:
    digest = signing_digest(batch.agent_id, batch.first_seq, batch.last_seq,
                            batch.prev_hash, batch.last_hash, batch.created_ns,
                            batch.schema_version, event_hashes)
    try:
        public_key.verify(batch.signature, digest)
    except InvalidSignature:
        return False
    return True


_compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
_decompressor = zstandard.ZstdDecompressor()


def encode_batch(batch: Batch) -> bytes:
    events = batch.events
    count = len(events)
    seq_deltas, ts_deltas, sid_index, type_index, fields = [], [], [], [], []
    sids: dict = {}
    types: dict = {}
    last_seq, last_ts = batch.first_seq, 0
    version = events[0]["v"] if events else batch.schema_version
    for event in events:
        if event["v"] != version:
            raise ValueError("all events of a batch must share one schema version")
        seq, ts = event["seq"], event["ts"]
        seq_deltas.append(seq - last_seq)
        ts_deltas.append(ts - last_ts)
        last_seq, last_ts = seq, ts
        sid_index.append(sids.setdefault(event["sid"], len(sids)))
        type_index.append(types.setdefault(event["type"], len(types)))
        fields.append(event["f"])
    tags = batch.tags
    if len(tags) != count * TAG_BYTES:
        tags = b"".join(content_tag(canonical_encode(event)) for event in events)
    body = {
        "fmt": WIRE_FORMAT, "sv": batch.schema_version, "ev": version,
        "agent": batch.agent_id, "first": batch.first_seq, "last": batch.last_seq,
        "prev": batch.prev_hash, "lasth": batch.last_hash, "created": batch.created_ns,
        "sig": batch.signature, "seqd": seq_deltas, "tsd": ts_deltas,
        "sids": list(sids), "sidx": sid_index, "types": list(types), "tidx": type_index,
        "f": fields, "tags": tags,
    }
    try:
        packed = msgpack.packb(body, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodingError(f"batch {batch.first_seq}..{batch.last_seq}: {exc}") from exc
    return _compressor.compress(packed)


_HEADER_TYPES = {"fmt": int, "sv": int, "ev": int, "agent": str, "first": int, "last": int,
                 "prev": bytes, "lasth": bytes, "created": int, "sig": bytes, "seqd": list,
                 "tsd": list, "sids": list, "sidx": list, "types": list, "tidx": list,
                 "f": list, "tags": bytes}


def decode_batch(data: bytes) -> Batch:
    body = _unpack(data)
    for name, kind in _HEADER_TYPES.items():
        if name not in body:
            raise BatchFormatError(f"batch lacks the {name!r} entry")
        if type(body[name]) is not kind:
            raise BatchFormatError(f"batch entry {name!r} is {type(body[name]).__name__}, "
                                   f"expected {kind.__name__}")
    if body["fmt"] != WIRE_FORMAT:
        raise BatchFormatError(f"batch wire format {body['fmt']} is not supported "
                               f"(this reader knows {WIRE_FORMAT}); upgrade the reader")
    for name in ("prev", "lasth"):
        if len(body[name]) != 32:
            raise BatchFormatError(f"batch entry {name!r} must be 32 bytes")
    if len(body["sig"]) != 64:
        raise BatchFormatError("batch signature must be 64 bytes")
    count = len(body["f"])
    for name in ("seqd", "tsd", "sidx", "tidx"):
        if len(body[name]) != count:
            raise BatchFormatError(f"batch column {name!r} has {len(body[name])} entries "
                                   f"for {count} events")
    if len(body["tags"]) != count * TAG_BYTES:
        raise BatchFormatError("batch content tags do not match the event count")
    if count == 0:
        raise BatchFormatError("batch holds no events")
    sids, types, agent, version = body["sids"], body["types"], body["agent"], body["ev"]
    events = []
    previous = body["prev"]
    seq, ts = body["first"], 0
    try:
        for index in range(count):
            seq_delta, ts_delta = body["seqd"][index], body["tsd"][index]
            if type(seq_delta) is not int or type(ts_delta) is not int:
                raise BatchFormatError(f"event {index}: sequence/time deltas must be integers")
            seq += seq_delta
            ts += ts_delta
            sid = sids[body["sidx"][index]]
            event_type = types[body["tidx"][index]]
            fields = body["f"][index]
            if not (sid is None or type(sid) is str) or type(event_type) is not str \
                    or type(fields) is not dict:
                raise BatchFormatError(f"event {index}: malformed session id, type or fields")
            event = {"v": version, "agent": agent, "seq": seq, "ts": ts, "sid": sid,
                     "type": event_type, "f": fields, "prev": previous}
            event["hash"] = previous = event_hash(previous, canonical_encode(event))
            events.append(event)
    except (IndexError, TypeError) as exc:
        raise BatchFormatError(f"batch columns are inconsistent: {exc}") from exc
    except EncodingError as exc:
        raise BatchFormatError(str(exc)) from exc
    return Batch(agent_id=agent, first_seq=body["first"], last_seq=body["last"],
                 prev_hash=body["prev"], last_hash=body["lasth"], events=events,
                 created_ns=body["created"], signature=body["sig"],
                 schema_version=body["sv"], tags=body["tags"])


def _unpack(data: bytes) -> dict:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BatchFormatError(f"a batch is bytes, got {type(data).__name__}")
    if len(data) > MAX_COMPRESSED_BYTES:
        raise BatchFormatError(f"batch of {len(data)} bytes exceeds {MAX_COMPRESSED_BYTES}")
    try:
        size = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise BatchFormatError(f"not a zstd frame: {exc}") from exc
    if size < 0 or size > MAX_DECODED_BYTES:
        raise BatchFormatError("zstd frame does not state an acceptable content size")
    try:
        raw = _decompressor.decompress(data, max_output_size=MAX_DECODED_BYTES)
    except zstandard.ZstdError as exc:
        raise BatchFormatError(f"zstd data is corrupt: {exc}") from exc
    try:
        body = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException, TypeError) as exc:
        raise BatchFormatError(f"batch is not valid msgpack: {exc}") from exc
    if type(body) is not dict:
        raise BatchFormatError("batch is not a msgpack map")
    return body
