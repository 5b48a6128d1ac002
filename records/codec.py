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

import msgpack

from records.schema import SCHEMA_VERSION

GENESIS_HASH = bytes(32)

_packb = msgpack.Packer(use_bin_type=True, strict_types=False).pack
_sha256 = hashlib.sha256


class EncodingError(ValueError):
    """A value cannot be encoded canonically."""


_SIMPLE = frozenset((str, int, float, bool, type(None), bytes))
_key_orders: dict[tuple, tuple] = {}


def _canon_map(value: dict) -> dict:
    # Producers build field dicts with the same keys over and over, so the sorted
    # order is cached per key tuple; maps of plain values skip the recursive rebuild.
    keys = tuple(value)
    order = _key_orders.get(keys)
    if order is None:
        try:
            order = tuple(sorted(keys))
        except TypeError as exc:
            raise EncodingError("map keys must all be strings") from exc
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
    if plain:
        return value if order == keys else {key: value[key] for key in order}
    # only the nested values need the recursive pass (header maps, process records)
    out = {}
    for key in order:
        item = value[key]
        out[key] = item if type(item) in _SIMPLE else _canon(item)
    return out


def _canon(value):
    kind = type(value)
    if kind is dict:
        return _canon_map(value)
    if kind is list or kind is tuple:
        return [_canon(item) for item in value]
    return value


def encode_fields(fields: dict) -> bytes:
    """The canonical encoding of a field map: the "f" entry of canonical_encode."""
    try:
        return _packb(_canon_map(fields))
    except (TypeError, OverflowError, ValueError) as exc:
        raise EncodingError(f"cannot encode fields: {exc}") from exc


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
