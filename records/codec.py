"""Event encoding and the per-agent hash chain.

Hash rule (version 1):

    encoded = canonical_encode(event)      # every key except "prev" and "hash"
    hash    = SHA-256(encoded || prev)     # prev = hash of the previous event, 32 bytes

``canonical_encode`` is msgpack with map keys sorted (recursively, by code point),
strings as str, bytes as bin, integers in their smallest form and floats as float64,
so the same event always encodes to the same bytes in any language. The previous hash
is bound by appending it rather than by encoding it, which keeps the encoded body free
of random bytes (it compresses better) while the chain still commits to it.
The first event of an agent chains from GENESIS_HASH (32 zero bytes).
"""

from __future__ import annotations

import hashlib
import os

import msgpack

from records.schema import SCHEMA_VERSION

try:
    # records/_seal.c: the same bytes and hashes, several times faster (see seal_parts)
    from records import _seal as _native_module
except ImportError:     # a pure-Python install (no compiler, another CPython): same results
    _native_module = None
_native = None if os.environ.get("WARDEN_PURE_PYTHON") == "1" else _native_module
NATIVE = _native is not None

GENESIS_HASH = bytes(32)

_packb = msgpack.Packer(use_bin_type=True, strict_types=False).pack
_sha256 = hashlib.sha256


class EncodingError(ValueError):
    """A value cannot be encoded canonically."""


if _native_module is not None:
    _native_module.set_encoding_error(EncodingError)


_SIMPLE = frozenset((str, int, float, bool, type(None), bytes))
# Field maps nest a few levels (headers, process records); a limit both encoders share keeps
# deeper input a clear EncodingError instead of a RecursionError (records/_seal.c: MAX_DEPTH).
MAX_DEPTH = 64
_key_orders: dict[tuple, tuple] = {}


def _canon_map(value: dict, depth: int = 0) -> dict:
    if depth > MAX_DEPTH:
        raise EncodingError(f"values nest deeper than {MAX_DEPTH} levels")
    # Producers build field dicts with the same keys over and over, so the sorted
    # order is cached per key tuple; maps of plain values skip the recursive rebuild.
    keys = tuple(value)
    order = _key_orders.get(keys)
    if order is None:
        # non-str keys would not survive the collector's decoder (strict map keys)
        if not all(isinstance(key, str) for key in keys):
            raise EncodingError("map keys must all be strings")
        order = tuple(sorted(keys))
        if len(_key_orders) < 4096:
            _key_orders[keys] = order
    plain = True
    for item in value.values():
        kind = type(item)
        if kind in _SIMPLE:
            continue
        if kind is list or kind is tuple:
            for element in item:
                if type(element) not in _SIMPLE:
                    plain = False
                    break
            if plain:
                continue
        plain = False
        break
    if plain and depth < MAX_DEPTH:     # (else its lists of plain values are too deep)
        return value if order == keys else {key: value[key] for key in order}
    # only the nested values need the recursive pass (header maps, process records)
    out = {}
    for key in order:
        item = value[key]
        out[key] = item if type(item) in _SIMPLE else _canon(item, depth + 1)
    return out


def _canon(value, depth: int):
    # subclasses too: msgpack would pack a dict subclass unsorted, and the decoder's plain
    # dict would then hash differently
    if isinstance(value, dict):
        return _canon_map(value, depth)
    if isinstance(value, (list, tuple)):
        if depth > MAX_DEPTH:
            raise EncodingError(f"values nest deeper than {MAX_DEPTH} levels")
        return [_canon(item, depth + 1) for item in value]
    return value


def py_encode_fields(fields: dict) -> bytes:
    """The reference (pure-Python) canonical encoding of a field map."""
    if not isinstance(fields, dict):
        raise EncodingError(f"fields must be a dict, got {type(fields).__name__}")
    try:
        return _packb(_canon_map(fields))
    except (TypeError, OverflowError, ValueError) as exc:
        raise EncodingError(f"cannot encode fields: {exc}") from exc


def _native_encode_fields(fields: dict) -> bytes:
    try:
        return _native.encode_fields(fields)
    except (TypeError, OverflowError, ValueError) as exc:
        raise EncodingError(f"cannot encode fields: {exc}") from exc


# encode_fields(fields) -> bytes: the canonical encoding of a field map, the "f" entry of
# canonical_encode
encode_fields = _native_encode_fields if NATIVE else py_encode_fields


_heads: dict[str, bytes] = {}


def event_head(agent: str) -> bytes:
    """Bytes of the canonical encoding before the field map. The top-level keys are
    fixed and sort as: agent, f, seq, sid, ts, type, v; a 7-entry map is one byte."""
    head = _heads.get(agent)
    if head is None:
        try:
            head = b"\x87\xa5agent" + _packb(agent) + b"\xa1f"
        except (TypeError, OverflowError, ValueError) as exc:
            raise EncodingError(f"agent id {agent!r} cannot be encoded: {exc}") from exc
        if len(_heads) < 64:
            _heads[agent] = head
    return head


def event_tail(seq: int, sid, ts: int, type: str, version: int) -> bytes:
    """Bytes of the canonical encoding after the field map: a 5-entry map packed in
    key order, minus its one-byte map header."""
    try:
        return _packb({"seq": seq, "sid": sid, "ts": ts, "type": type, "v": version})[1:]
    except (TypeError, OverflowError, ValueError) as exc:
        raise EncodingError(f"event seq={seq} type={type}: cannot encode: {exc}") from exc


def py_seal_parts(head: bytes, fields: dict, seq: int, sid, ts: int, type: str, version: int,
                  prev: bytes) -> tuple[bytes, bytes, bytes]:
    """Reference for seal_parts."""
    try:
        encoded_fields = py_encode_fields(fields)
    except EncodingError as exc:
        raise EncodingError(f"event seq={seq} type={type}: cannot encode: {exc}") from exc
    encoded = head + encoded_fields + event_tail(seq, sid, ts, type, version)
    return encoded_fields, _sha256(encoded).digest()[:8], _sha256(encoded + prev).digest()


def _native_seal_parts(head: bytes, fields: dict, seq: int, sid, ts: int, type: str,
                       version: int, prev: bytes) -> tuple[bytes, bytes, bytes]:
    try:
        return _native.seal(head, fields, seq, sid, ts, type, version, prev)
    except (TypeError, OverflowError, ValueError) as exc:
        raise EncodingError(f"event seq={seq} type={type}: cannot encode: {exc}") from exc


# seal_parts(head, fields, seq, sid, ts, type, version, prev) -> one event sealed:
# (encoded field map, 8-byte content tag, event hash), where the encoding is
# head + encoded fields + event_tail(...) with head = event_head(agent), the tag is
# SHA-256(encoding)[:8] and the hash SHA-256(encoding || prev)
seal_parts = _native_seal_parts if NATIVE else py_seal_parts


def canonical_encode(event: dict) -> bytes:
    # Assembled from the same three parts the writer hashes (records.batch.BatchBuilder),
    # so the writer, decoder and verifier cannot drift apart.
    try:
        fields = encode_fields(event["f"])
    except EncodingError as exc:
        raise EncodingError(f"event seq={event.get('seq')} type={event.get('type')}: "
                            f"{exc}") from exc
    return (event_head(event["agent"]) + fields
            + event_tail(event["seq"], event["sid"], event["ts"], event["type"], event["v"]))


def event_hash(prev_hash: bytes, encoded: bytes) -> bytes:
    return _sha256(encoded + prev_hash).digest()


def seal_event(agent: str, seq: int, ts: int, sid: str | None, type: str, fields: dict,
               prev_hash: bytes) -> dict:
    return seal_event_encoded(agent, seq, ts, sid, type, fields, prev_hash)[0]


def seal_event_encoded(agent: str, seq: int, ts: int, sid: str | None, type: str,
                       fields: dict, prev_hash: bytes) -> tuple[dict, bytes]:
    """seal_event, also returning the canonical encoding (build_batch can reuse it)."""
    event = {"v": SCHEMA_VERSION, "agent": agent, "seq": seq, "ts": ts, "sid": sid,
             "type": type, "f": fields, "prev": prev_hash}
    encoded = canonical_encode(event)
    event["hash"] = event_hash(prev_hash, encoded)
    return event, encoded
