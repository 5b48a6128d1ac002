"""Signed batches of chained events, and their wire/spool form.

Wire form (version 1): one zstd frame holding a msgpack map. Events are stored by
column: deltas for sequence numbers and timestamps, per-batch tables for session ids
and event types, the field maps in order, and an 8-byte *content tag* per event
(``SHA-256(canonical_encode(event))[:8]``). Per-event previous/own hashes are not
stored: they follow from the batch's ``prev_hash`` and the hash rule in
``records.codec`` and are recomputed on decode. The tags are not needed for integrity
(the signature covers every event hash); they let a verifier point at the exact event
that was edited after signing.

The zstd frame may use a dictionary (see records.dictionary); its id is in the frame
header and picks the dictionary on decode. Frames without one (id 0) still decode.

Signature: Ed25519 over ``signing_digest(...)`` =
``SHA-256(msgpack(["warden.batch", schema_version, agent_id, first_seq, last_seq,
prev_hash, last_hash, created_ns]) || hash_1 || ... || hash_n)``.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field

import msgpack
import zstandard
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (Ed25519PrivateKey,
                                                               Ed25519PublicKey)

from records import dictionary as dictionaries
from records.codec import (NATIVE, EncodingError, _native, canonical_encode,
                           encode_fields, event_hash, event_head, py_seal_parts, seal_parts)
from records.schema import SCHEMA_VERSION

WIRE_FORMAT = 1
TAG_BYTES = 8
MAX_COMPRESSED_BYTES = 64 << 20
MAX_DECODED_BYTES = 256 << 20
ZSTD_LEVEL = 3

_sha256 = hashlib.sha256
# encode_batch/BatchBuilder default: the shipped dictionary (None: plain zstd).
CURRENT_DICTIONARY = "current"


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


_local = threading.local()     # zstd (de)compressor objects are not thread-safe


def _compressor(dictionary) -> zstandard.ZstdCompressor:
    if dictionary == CURRENT_DICTIONARY:
        dictionary = dictionaries.current()
    cache = _local.__dict__.setdefault("compressors", {})
    dict_id = 0 if dictionary is None else dictionary.dict_id()
    compressor = cache.get(dict_id)
    if compressor is None:
        # write_dict_id: the frame names its dictionary, so readers can pick it.
        compressor = cache[dict_id] = zstandard.ZstdCompressor(
            level=ZSTD_LEVEL, dict_data=dictionary, write_content_size=True,
            write_dict_id=True)
    return compressor


def _decompressor(dict_id: int) -> zstandard.ZstdDecompressor:
    cache = _local.__dict__.setdefault("decompressors", {})
    decompressor = cache.get(dict_id)
    if decompressor is None:
        data = None if dict_id == 0 else dictionaries.get(dict_id)
        decompressor = cache[dict_id] = zstandard.ZstdDecompressor(dict_data=data)
    return decompressor


def compress_body(body: bytes, dictionary=CURRENT_DICTIONARY) -> bytes:
    """One zstd frame; ``dictionary``: CURRENT_DICTIONARY, None or a ZstdCompressionDict."""
    return _compressor(dictionary).compress(body)


def pack_batch_body(header: dict, field_encodings: list[bytes]) -> bytes:
    # The field maps are already canonically encoded (they were hashed that way), so
    # they are spliced in as the final "f" entry instead of being packed again.
    packer = msgpack.Packer(use_bin_type=True)
    try:
        packed_header = packer.pack(header)
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodingError(f"batch header: {exc}") from exc
    map_prefix = len(packer.pack_map_header(len(header)))
    return b"".join((packer.pack_map_header(len(header) + 1), packed_header[map_prefix:],
                     packer.pack("f"), packer.pack_array_header(len(field_encodings)),
                     *field_encodings))


def batch_header(agent_id, first_seq, last_seq, prev_hash, last_hash, created_ns, signature,
                 schema_version, event_version, seq_deltas, ts_deltas, sids, sid_index, types,
                 type_index, tags) -> dict:
    return {"fmt": WIRE_FORMAT, "sv": schema_version, "ev": event_version,
            "agent": agent_id, "first": first_seq, "last": last_seq, "prev": prev_hash,
            "lasth": last_hash, "created": created_ns, "sig": signature, "seqd": seq_deltas,
            "tsd": ts_deltas, "sids": sids, "sidx": sid_index, "types": types,
            "tidx": type_index, "tags": tags}


def encode_batch(batch: Batch, dictionary=CURRENT_DICTIONARY) -> bytes:
    events = batch.events
    count = len(events)
    seq_deltas, ts_deltas, sid_index, type_index, fields = [], [], [], [], []
    sids: dict = {}
    types: dict = {}
    last_seq, last_ts = batch.first_seq, 0
    version = events[0]["v"] if events else batch.schema_version
    try:
        for event in events:
            if event["v"] != version:
                raise ValueError("all events of a batch must share one schema version")
            seq, ts = event["seq"], event["ts"]
            seq_deltas.append(seq - last_seq)
            ts_deltas.append(ts - last_ts)
            last_seq, last_ts = seq, ts
            sid_index.append(sids.setdefault(event["sid"], len(sids)))
            type_index.append(types.setdefault(event["type"], len(types)))
            fields.append(encode_fields(event["f"]))
    except EncodingError as exc:
        raise EncodingError(f"batch {batch.first_seq}..{batch.last_seq}: {exc}") from exc
    tags = batch.tags
    if len(tags) != count * TAG_BYTES:
        tags = b"".join(content_tag(canonical_encode(event)) for event in events)
    header = batch_header(batch.agent_id, batch.first_seq, batch.last_seq, batch.prev_hash,
                          batch.last_hash, batch.created_ns, batch.signature,
                          batch.schema_version, version, seq_deltas, ts_deltas, list(sids),
                          sid_index, list(types), type_index, tags)
    return compress_body(pack_batch_body(header, fields), dictionary)


class _PyBuilderCore:
    """The columns of one batch, filled one sealed event at a time: the reference for (and
    the fallback of) records/_seal.c's Builder, which BatchBuilder derives from when built.
    ``add`` changes nothing when it raises (an unencodable event leaves no trace)."""

    def __init__(self, agent_id: str, prev_hash: bytes, first_seq: int, head: bytes, version: int):
        self.agent_id = agent_id
        self.prev_hash = prev_hash
        self.first_seq = first_seq
        self.last_hash = prev_hash
        self._head = head
        self._version = version
        self._last_ts = 0
        self._ts_deltas: list[int] = []
        self._sids: dict = {}
        self._sid_index: list[int] = []
        self._types: dict = {}
        self._type_index: list[int] = []
        self._fields: list[bytes] = []
        self._tags: list[bytes] = []
        self._hashes: list[bytes] = []
        self.closed = False
        self._limit = 0

    @property
    def count(self) -> int:
        return len(self._hashes)

    @property
    def last_seq(self) -> int:
        return self.first_seq + len(self._hashes) - 1

    @property
    def head(self) -> tuple[int, bytes]:
        return self.last_seq, self.last_hash

    @property
    def limit(self) -> int:
        return self._limit

    @limit.setter
    def limit(self, value: int) -> None:
        if not isinstance(value, int) or value < 0:
            raise ValueError("limit must be an int >= 0")
        self._limit = value

    def close(self) -> None:
        self.closed = True

    def add(self, ts: int | None, sid: str | None, event_type: str, fields: dict) -> bytes:
        """Seal the next event (`ts` None: now); returns its hash."""
        if self.closed:
            raise RuntimeError("the batch is closed: no event can be added")
        if (sid is not None and type(sid) is not str) or type(event_type) is not str:
            raise TypeError("sid must be a str or None and event_type a str")
        if ts is None:
            ts = time.time_ns()
        seq = self.first_seq + len(self._hashes)
        encoded_fields, tag, digest = py_seal_parts(self._head, fields, seq, sid, ts, event_type,
                                                    self._version, self.last_hash)
        delta = ts - self._last_ts
        sids, types = self._sids, self._types
        sid_at = sids.get(sid, len(sids))
        type_at = types.get(event_type, len(types))
        sids.setdefault(sid, sid_at)
        types.setdefault(event_type, type_at)
        self._ts_deltas.append(delta)
        self._last_ts = ts
        self._sid_index.append(sid_at)
        self._type_index.append(type_at)
        self._fields.append(encoded_fields)
        self._tags.append(tag)
        self._hashes.append(digest)
        self.last_hash = digest
        return digest

    def columns(self) -> tuple:
        """(ts deltas, sids, sid index, types, type index, encoded fields, tags, hashes)"""
        return (self._ts_deltas, list(self._sids), self._sid_index, list(self._types),
                self._type_index, self._fields, b"".join(self._tags), self._hashes)


_BuilderCore = _native.Builder if NATIVE else _PyBuilderCore


class BatchBuilder(_BuilderCore):
    """Seals events straight into the columns of one batch: the writer's hot path.

    Same result as seal_event + build_batch + encode_batch, without the per-event
    dicts, the second hashing pass for content tags and the second packing of fields.
    ``add(ts, sid, event_type, fields) -> hash`` seals the next event and changes nothing
    when it raises (an unencodable event leaves no trace); ``count``, ``last_seq`` and
    ``last_hash`` follow it.
    """

    def __init__(self, agent_id: str, prev_hash: bytes, first_seq: int):
        super().__init__(agent_id, prev_hash, first_seq, event_head(agent_id), SCHEMA_VERSION)

    def body(self, key: Ed25519PrivateKey, created_ns: int | None = None) -> bytes:
        """The signed, uncompressed msgpack body."""
        ts_deltas, sids, sid_index, types, type_index, fields, tags, hashes = self.columns()
        if not hashes:
            raise ValueError("a batch needs at least one event")
        created_ns = time.time_ns() if created_ns is None else created_ns
        last_seq = self.last_seq
        digest = signing_digest(self.agent_id, self.first_seq, last_seq, self.prev_hash,
                                self.last_hash, created_ns, SCHEMA_VERSION, hashes)
        header = batch_header(self.agent_id, self.first_seq, last_seq, self.prev_hash,
                              self.last_hash, created_ns, key.sign(digest), SCHEMA_VERSION,
                              SCHEMA_VERSION, [0] + [1] * (len(hashes) - 1), ts_deltas, sids,
                              sid_index, types, type_index, tags)
        return pack_batch_body(header, fields)

    def finish(self, key: Ed25519PrivateKey, created_ns: int | None = None,
               dictionary=CURRENT_DICTIONARY) -> bytes:
        """The signed batch in wire form (one zstd frame)."""
        return compress_body(self.body(key, created_ns), dictionary)


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
    seq_column, ts_column, sid_column, type_column, field_column = (
        body["seqd"], body["tsd"], body["sidx"], body["tidx"], body["f"])
    events = []
    append = events.append
    previous = body["prev"]
    seq, ts = body["first"], 0
    # Each event's hash is computed exactly once, by the same seal_parts the writer used:
    # SHA-256(canonical_encode(event) || prev).
    try:
        head = event_head(agent)
    except EncodingError as exc:
        raise BatchFormatError(str(exc)) from exc
    try:
        for index in range(count):
            seq_delta, ts_delta = seq_column[index], ts_column[index]
            if type(seq_delta) is not int or type(ts_delta) is not int:
                raise BatchFormatError(f"event {index}: sequence/time deltas must be integers")
            seq += seq_delta
            ts += ts_delta
            sid = sids[sid_column[index]]
            event_type = types[type_column[index]]
            fields = field_column[index]
            if not (sid is None or type(sid) is str) or type(event_type) is not str \
                    or type(fields) is not dict:
                raise BatchFormatError(f"event {index}: malformed session id, type or fields")
            digest = seal_parts(head, fields, seq, sid, ts, event_type, version, previous)[2]
            append({"v": version, "agent": agent, "seq": seq, "ts": ts, "sid": sid,
                    "type": event_type, "f": fields, "prev": previous, "hash": digest})
            previous = digest
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
        dict_id = zstandard.get_frame_parameters(data).dict_id
    except zstandard.ZstdError as exc:
        raise BatchFormatError(f"not a zstd frame: {exc}") from exc
    if size < 0 or size > MAX_DECODED_BYTES:
        raise BatchFormatError("zstd frame does not state an acceptable content size")
    try:
        decompressor = _decompressor(dict_id)
    except dictionaries.UnknownDictionary as exc:
        raise BatchFormatError(str(exc)) from exc
    try:
        raw = decompressor.decompress(data, max_output_size=MAX_DECODED_BYTES)
    except zstandard.ZstdError as exc:
        raise BatchFormatError(f"zstd data is corrupt: {exc}") from exc
    try:
        body = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException, TypeError) as exc:
        raise BatchFormatError(f"batch is not valid msgpack: {exc}") from exc
    if type(body) is not dict:
        raise BatchFormatError("batch is not a msgpack map")
    return body
