"""Postgres DataRow masking: a plan per RowDescription, applied to each DataRow payload.

A DataRow payload is int16 column count, then per column int32 length (-1 = NULL) and bytes.
Only the columns a plan masks are decoded; untouched bytes are copied as slices, and a row in
which nothing changed is returned as the very same object.
"""
from __future__ import annotations

import json
import struct
from typing import Callable, Optional

from .detectors import Scanner
from .strategies import Strategy

# types whose values are text in both formats (binary send of these is the UTF-8 text)
TEXT_TYPES = frozenset({25, 1043, 1042, 19, 705, 18})   # text varchar bpchar name unknown "char"
JSON_OID = 114
JSONB_OID = 3802
JSON_TYPES = frozenset({JSON_OID, JSONB_OID})
INT_BINARY = {21: struct.Struct("!h"), 23: struct.Struct("!i"), 20: struct.Struct("!q")}
FIRST_USER_OID = 16384     # user types (citext, enums, domains): text in text format

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_unpack_i16 = _I16.unpack_from
_unpack_i32 = _I32.unpack_from
_pack_i32 = _I32.pack
_NULL = _pack_i32(-1)

UNCHANGED = object()


class MaskingRefused(Exception):
    """A result must not be delivered (a rule says on_binary: error). The enforcer answers the
    statement with an ErrorResponse carrying `sqlstate` and `str(self)` instead of its rows."""

    def __init__(self, message: str, sqlstate: str = "42501"):
        super().__init__(message)
        self.sqlstate = sqlstate


def is_text_like(type_oid: int, fmt: int) -> bool:
    if type_oid in TEXT_TYPES or type_oid in JSON_TYPES:
        return True
    return fmt == 0 and type_oid >= FIRST_USER_OID


class Counter:
    """Per (rule, column) tallies; never holds values."""
    __slots__ = ("rule", "column", "values", "nulled")

    def __init__(self, rule: str, column: str):
        self.rule = rule
        self.column = column
        self.values = 0
        self.nulled = 0


def mask_spans(text: str, found, strategy_for: Callable) -> Optional[str]:
    """Replace detected spans; None when a strategy asks for NULL."""
    out = []
    last = 0
    for s, e, d in found:
        replacement = strategy_for(d).apply(text[s:e])
        if replacement is None:
            return None
        out.append(text[last:s])
        out.append(replacement)
        last = e
    out.append(text[last:])
    return "".join(out)


def mask_json_value(doc, scanner: Scanner, strategies: dict) -> tuple[object, int]:
    """Mask detected values inside parsed JSON: strings in place, numbers become masked strings."""
    count = 0

    def pick(d):
        return strategies[d.name]

    def walk(node):
        nonlocal count
        if isinstance(node, str):
            found = scanner.find(node)
            if not found:
                return node
            count += len(found)
            return mask_spans(node, found, pick)
        if isinstance(node, bool) or node is None:
            return node
        if isinstance(node, (int, float)):
            text = str(node)
            found = scanner.find(text)
            if not found:
                return node
            count += len(found)
            return mask_spans(text, found, pick)
        if isinstance(node, list):
            return [walk(v) for v in node]
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        return node

    return walk(doc), count


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def null_masker(counter: Counter):
    """For masked columns whose type cannot carry a masked string: the value becomes NULL."""
    def mask(raw: bytes):
        counter.values += 1
        counter.nulled += 1
        return None
    return mask


def whole_value_masker(strategy: Strategy, type_oid: int, fmt: int, counter: Counter):
    """value bytes -> new bytes, or None for NULL."""
    is_json = type_oid in JSON_TYPES
    jsonb_binary = type_oid == JSONB_OID and fmt == 1
    if strategy.is_constant:
        const = strategy.constant
        if const is None:
            encoded = None
        else:
            encoded = _encode(json.dumps(const, ensure_ascii=False) if is_json else const)
            if jsonb_binary:
                encoded = b"\x01" + encoded

        def mask(raw: bytes):
            counter.values += 1
            return encoded
        return mask

    apply = strategy.apply

    def mask(raw: bytes):
        counter.values += 1
        if jsonb_binary:
            raw = raw[1:]
        out = apply(_decode(raw))
        if out is None:
            return None
        if is_json:
            out = json.dumps(out, ensure_ascii=False)
        data = _encode(out)
        return b"\x01" + data if jsonb_binary else data
    return mask


def detector_masker(scanner: Scanner, strategies: dict, type_oid: int, fmt: int, counter: Counter):
    """value bytes -> new bytes, None for NULL, or UNCHANGED. `strategies`: detector name -> Strategy."""
    find = scanner.find

    def pick(d):
        return strategies[d.name]
    if type_oid in JSON_TYPES:
        jsonb_binary = type_oid == JSONB_OID and fmt == 1

        def mask_json(raw: bytes):
            text = _decode(raw[1:] if jsonb_binary else raw)
            if not find(text):
                return UNCHANGED
            try:
                doc = json.loads(text)
            except ValueError:
                counter.nulled += 1
                return None
            masked, n = mask_json_value(doc, scanner, strategies)
            if n == 0:
                return UNCHANGED
            counter.values += n
            data = _encode(json.dumps(masked, ensure_ascii=False))
            return b"\x01" + data if jsonb_binary else data
        return mask_json

    if is_text_like(type_oid, fmt):
        def mask_text(raw: bytes):
            text = _decode(raw)
            found = find(text)
            if not found:
                return UNCHANGED
            counter.values += len(found)
            out = mask_spans(text, found, pick)
            return None if out is None else _encode(out)
        return mask_text

    # other types: their text (or decoded integer) is inspected; a hit cannot be rewritten in that
    # type, so the value becomes NULL
    if fmt == 0:
        def render(raw: bytes) -> str:
            return _decode(raw)
    elif type_oid in INT_BINARY:
        unpack = INT_BINARY[type_oid].unpack

        def render(raw: bytes) -> str:
            return str(unpack(raw)[0])
    else:
        def mask_opaque(raw: bytes):
            counter.nulled += 1
            return None
        return mask_opaque

    def mask_other(raw: bytes):
        if not find(render(raw)):
            return UNCHANGED
        counter.values += 1
        counter.nulled += 1
        return None
    return mask_other


class RowPlan:
    """Masks the planned columns of DataRow payloads for one RowDescription."""

    def __init__(self, actions: list[tuple[int, Callable]], counters: list[Counter]):
        self.actions = sorted(actions, key=lambda a: a[0])
        self.counters = counters
        self.rows = 0
        self.columns = tuple(c.column for c in counters)

    def mask_data_row(self, payload: bytes) -> bytes:
        ncols = _unpack_i16(payload, 0)[0]
        pos = 2
        col = 0
        last = 0
        parts = None
        for index, mask in self.actions:
            if index >= ncols:
                break
            while col < index:
                ln = _unpack_i32(payload, pos)[0]
                pos += 4 + ln if ln > 0 else 4
                col += 1
            ln = _unpack_i32(payload, pos)[0]
            if ln < 0:
                pos += 4
                col += 1
                continue
            start = pos + 4
            end = start + ln
            new = mask(payload[start:end])
            if new is not UNCHANGED:
                if parts is None:
                    parts = []
                parts.append(payload[last:pos])
                parts.append(_NULL if new is None else _pack_i32(len(new)) + new)
                last = end
            pos = end
            col += 1
        if parts is None:
            return payload
        self.rows += 1
        parts.append(payload[last:])
        return b"".join(parts)
