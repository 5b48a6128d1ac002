"""Postgres DataRow masking: a plan per RowDescription, applied to each DataRow payload.

A DataRow payload is int16 column count, then per column int32 length (-1 = NULL) and bytes.
Only the columns a plan masks are decoded; untouched bytes are copied as slices, and a row in
which nothing changed is returned as the very same object.
"""
from __future__ import annotations

import json
import os
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
_unpack_head = struct.Struct("!ih").unpack_from     # a DataRow's message length and column count
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


# how a plan treats one column (ColumnStep.kind)
WHOLE = 0        # every non-NULL value replaced by fn(value bytes) -> bytes | None
CONSTANT = 1     # every non-NULL value replaced by the same bytes (or NULL): nothing to read
DETECT = 2       # fn(value bytes) -> (bytes | None | UNCHANGED, values masked, values nulled)

CACHE_ENTRIES = 4096        # masked outputs remembered per column of a plan
CACHE_VALUE_BYTES = 256     # longer values are not worth keeping (memory, rarely repeated)
_MISS = object()

try:
    # enforcer/masking/_pgrows.c: RowPlan.py_mask_rows without the interpreter per row
    from . import _pgrows as _native
except ImportError:     # a pure-Python install (no compiler, another CPython): same results
    _native = None
if _native is not None and tuple(getattr(_native, k, None) for k in ("WHOLE", "CONSTANT", "DETECT")) \
        != (WHOLE, CONSTANT, DETECT):
    _native = None      # a stale build: its step kinds would not mean ours
NATIVE = _native is not None and os.environ.get("WARDEN_PURE_PYTHON") != "1"


class ColumnStep:
    """How one column of a plan is masked, with a bounded cache of outputs per distinct input.

    Many columns repeat values (status, city, a customer's e-mail on each order); the cache
    turns those into one dict lookup. It is emptied when full and switched off for good when
    fewer than one lookup in four hits (all-distinct values such as ids or digests), so such
    columns pay nothing after the first few thousand rows."""

    __slots__ = ("index", "kind", "fn", "constant", "counter", "nulling", "cache", "cache_since", "skipped")

    def __init__(self, index: int, kind: int, counter: Counter, fn: Optional[Callable] = None,
                 constant: Optional[bytes] = None, nulling: bool = False, cached: bool = True):
        self.index = index
        self.kind = kind
        self.fn = fn
        self.constant = constant
        self.counter = counter
        self.nulling = nulling          # also counted as nulled (a type that cannot carry the mask)
        self.cache: Optional[dict] = {} if cached and kind != CONSTANT else None
        self.cache_since = 0            # plan rows seen when the cache was last emptied
        self.skipped = 0                # NULLs met in the current run (not masked, not counted)

    def fill(self, raw: bytes, seen: int):
        """fn(raw), remembered; `seen` = rows the plan has seen, to judge the hit rate."""
        result = self.fn(raw)
        cache = self.cache
        if len(cache) >= CACHE_ENTRIES:
            looked = seen - self.cache_since
            if (looked - len(cache)) * 4 < looked:
                self.cache = None
                return result
            cache.clear()
            self.cache_since = seen
        cache[raw] = result
        return result

    def mask_value(self, result):
        """Count one non-NULL value given fn's `result` for it; -> new bytes, None or UNCHANGED."""
        counter = self.counter
        if self.kind == DETECT:
            new, values, nulled = result
            counter.values += values
            counter.nulled += nulled
            return new
        counter.values += 1
        if self.nulling:
            counter.nulled += 1
        return result


def null_masker(index: int, counter: Counter) -> ColumnStep:
    """For masked columns whose type cannot carry a masked string: the value becomes NULL."""
    return ColumnStep(index, CONSTANT, counter, constant=None, nulling=True)


def whole_value_masker(index: int, strategy: Strategy, type_oid: int, fmt: int, counter: Counter) -> ColumnStep:
    """Every non-NULL value of the column is replaced by the strategy's output."""
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
        return ColumnStep(index, CONSTANT, counter, constant=encoded)
    if not is_json:
        return ColumnStep(index, WHOLE, counter, fn=strategy.bytes_masker())

    apply = strategy.apply

    def mask_json(raw: bytes):
        if jsonb_binary:
            raw = raw[1:]
        out = apply(_decode(raw))
        if out is None:
            return None
        data = _encode(json.dumps(out, ensure_ascii=False))
        return b"\x01" + data if jsonb_binary else data
    return ColumnStep(index, WHOLE, counter, fn=mask_json)


def detector_masker(index: int, scanner: Scanner, strategies: dict, type_oid: int, fmt: int,
                    counter: Counter) -> ColumnStep:
    """Values are scanned; detected parts are masked. `strategies`: detector name -> Strategy.
    The step's fn returns (bytes | None | UNCHANGED, values masked, values nulled)."""
    find = scanner.find

    def pick(d):
        return strategies[d.name]
    if type_oid in JSON_TYPES:
        jsonb_binary = type_oid == JSONB_OID and fmt == 1

        def mask_json(raw: bytes):
            text = _decode(raw[1:] if jsonb_binary else raw)
            if not find(text):
                return UNCHANGED, 0, 0
            try:
                doc = json.loads(text)
            except ValueError:
                return None, 0, 1
            masked, n = mask_json_value(doc, scanner, strategies)
            if n == 0:
                return UNCHANGED, 0, 0
            data = _encode(json.dumps(masked, ensure_ascii=False))
            return (b"\x01" + data if jsonb_binary else data), n, 0
        return ColumnStep(index, DETECT, counter, fn=mask_json)

    if is_text_like(type_oid, fmt):
        def mask_text(raw: bytes):
            text = _decode(raw)
            found = find(text)
            if not found:
                return UNCHANGED, 0, 0
            out = mask_spans(text, found, pick)
            return (None if out is None else _encode(out)), len(found), 0
        return ColumnStep(index, DETECT, counter, fn=mask_text)

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
            return None, 0, 1
        return ColumnStep(index, DETECT, counter, fn=mask_opaque, cached=False)

    def mask_other(raw: bytes):
        if not find(render(raw)):
            return UNCHANGED, 0, 0
        return None, 1, 1
    return ColumnStep(index, DETECT, counter, fn=mask_other)


def json_document_masker(index: int, mask_body: Callable, type_oid: int, fmt: int,
                         counter: Counter) -> ColumnStep:
    """A whole row rendered as JSON (row_to_json(c), json_agg(c)): `mask_body(bytes)` (a
    JsonMasker's, with the column rules as key rules) masks it by key and keeps the document;
    a value that is not JSON cannot be masked by key and becomes NULL."""
    jsonb_binary = type_oid == JSONB_OID and fmt == 1

    def mask_document(raw: bytes):
        body = raw[1:] if jsonb_binary else raw
        got = mask_body(body)
        if got is None:
            return None, 0, 1
        data, counts = got
        if data is body:
            return UNCHANGED, 0, 0
        return (b"\x01" + data if jsonb_binary else data), sum(counts.values()), 0
    return ColumnStep(index, DETECT, counter, fn=mask_document)


class RowPlan:
    """Masks the planned columns of DataRows for one RowDescription.

    The hot path is `mask_rows`, over a whole run of DataRow messages in a read buffer: each row
    is parsed only up to its last masked column (other columns skipped by their length, never
    sliced), and masked values are spliced between untouched slices of the original bytes; a
    value of unchanged length keeps its length word, and the message length is rewritten only
    when the row's size changed. Rows between masked ones are copied in one slice.

    `py_mask_rows` is that loop in Python and the reference; `mask_rows` is its C twin
    (enforcer/masking/_pgrows.c) when built, which calls back here for everything but the byte
    work (step fns, _fill, mask_data_row, _tally)."""

    def __init__(self, steps: list[ColumnStep], counters: list[Counter]):
        self.steps = sorted(steps, key=lambda s: s.index)
        self.counters = counters
        self.rows = 0                   # rows in which something was masked
        self.seen = 0                   # rows looked at
        self.columns = tuple(c.column for c in counters)
        self.width = self.steps[-1].index + 1 if self.steps else 0
        self._compile()

    def _compile(self) -> None:
        """The steps as tuples for the row loop: (columns to skip first, kind, fn, constant, step, cache)."""
        prev = -1
        plan = []
        for s in self.steps:
            plan.append((s.index - prev - 1, s.kind, s.fn, s.constant, s, s.cache))
            prev = s.index
        self._plan = tuple(plan)

    def _fill(self, step: ColumnStep, raw: bytes, rows: int):
        """A cache miss in the current run (`rows` rows into it)."""
        had_cache = step.cache is not None
        result = step.fill(raw, self.seen + rows)
        if had_cache and step.cache is None:
            self._compile()             # that column's cache was switched off
        return result

    def mask_data_row(self, payload: bytes) -> bytes:
        """One DataRow payload -> masked payload (the same object when nothing changed). The
        enforcer uses mask_rows on whole runs; this is the same masking one row at a time."""
        self.seen += 1
        ncols = _unpack_i16(payload, 0)[0]
        pos = 2
        col = 0
        last = 0
        parts = None
        for step in self.steps:
            if step.index >= ncols:
                break
            while col < step.index:
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
            if end > len(payload):
                raise ValueError("a DataRow column runs past the end of its message")
            if step.kind == CONSTANT:
                result = step.constant
            else:
                raw = payload[start:end]
                cache = step.cache
                if cache is not None and ln <= CACHE_VALUE_BYTES:
                    result = cache.get(raw, _MISS)
                    if result is _MISS:
                        result = self._fill(step, raw, 0)
                else:
                    result = step.fn(raw)
            new = step.mask_value(result)
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

    def py_mask_rows(self, buf: bytes, pos: int, n: int) -> tuple:
        """Mask the run of complete DataRow messages in buf[pos:n] (it stops at the first other or
        incomplete message, or an invalid length). Returns (data, last, end, rows, nbytes): `data`
        replaces buf[pos:last] (None when no row changed; buf[last:end] is forwarded unchanged),
        `end` is where the run stopped, `rows`/`nbytes` count the run's messages and their lengths."""
        start = last = pos
        out: list = []
        append = out.append
        rows = changed = irregular = 0
        plan = self._plan
        width = self.width
        unpack_i32 = _unpack_i32
        pack_i32 = _pack_i32
        try:
            while n - pos >= 5 and buf[pos] == 68:
                if n - pos >= 7:
                    length, ncols = _unpack_head(buf, pos + 1)
                else:
                    length, ncols = unpack_i32(buf, pos + 1)[0], -1
                end = pos + 1 + length
                if length < 4 or end > n:
                    break
                rows += 1
                if ncols < width or length < 6:
                    # fewer columns than the plan covers (or no column count): column by column
                    irregular += 1
                    payload = buf[pos + 5:end]
                    new = self.mask_data_row(payload)
                    if new is not payload:
                        append(buf[last:pos])
                        append(b"D" + pack_i32(len(new) + 4) + new)
                        last = end
                    plan = self._plan   # mask_data_row may have switched a cache off
                    pos = end
                    continue
                append(buf[last:pos + 1])
                head = len(out)
                append(None)            # the message length, known once the row is done
                seg = body = pos + 5    # start of the row's bytes not yet copied
                p = pos + 7
                delta = 0               # change of the row's length
                for gap, kind, fn, constant, step, cache in plan:
                    while gap:
                        ln = unpack_i32(buf, p)[0]
                        p += 4 + ln if ln > 0 else 4
                        gap -= 1
                    ln = unpack_i32(buf, p)[0]
                    if ln < 0:
                        p += 4
                        step.skipped += 1
                        continue
                    vs = p + 4
                    ve = vs + ln
                    if ve > end:
                        raise ValueError("a DataRow column runs past the end of its message")
                    if kind == WHOLE:
                        if cache is None:
                            new = fn(buf[vs:ve])
                        elif ln <= CACHE_VALUE_BYTES:
                            raw = buf[vs:ve]
                            new = cache.get(raw, _MISS)
                            if new is _MISS:
                                new = self._fill(step, raw, rows)
                                plan = self._plan
                        else:
                            new = fn(buf[vs:ve])
                    elif kind == CONSTANT:
                        new = constant
                    else:
                        raw = buf[vs:ve]
                        if cache is not None and ln <= CACHE_VALUE_BYTES:
                            new = cache.get(raw, _MISS)
                            if new is _MISS:
                                new = self._fill(step, raw, rows)
                                plan = self._plan
                        else:
                            new = fn(raw)
                        new, masked, nulled = new
                        if masked or nulled:
                            step.counter.values += masked
                            step.counter.nulled += nulled
                        if new is UNCHANGED:
                            p = ve
                            continue
                    if new is None:
                        append(buf[seg:p])
                        append(_NULL)
                        delta -= ln
                    elif len(new) == ln:        # same length: keep the length word
                        append(buf[seg:vs])
                        append(new)
                    else:
                        append(buf[seg:p])
                        append(pack_i32(len(new)) + new)
                        delta += len(new) - ln
                    seg = p = ve
                if seg == body:                 # nothing masked in this row: take its pieces back
                    del out[head - 1:]
                else:
                    changed += 1
                    out[head] = pack_i32(length + delta)
                    last = seg
                pos = end
        finally:
            self._tally(rows - irregular, rows - irregular, changed)
        if not out:
            return None, last, pos, rows, pos - start - rows
        return b"".join(out), last, pos, rows, pos - start - rows

    def native_mask_rows(self, buf: bytes, pos: int, n: int) -> tuple:
        """py_mask_rows in C (enforcer/masking/_pgrows.c): the same results, counts and errors."""
        return _native.mask_rows(self, buf, pos, n, UNCHANGED, CACHE_VALUE_BYTES)

    # mask_rows(buf, pos, n): see py_mask_rows; WARDEN_PURE_PYTHON=1 keeps the Python loop
    mask_rows = native_mask_rows if NATIVE else py_mask_rows

    def _tally(self, rows: int, regular: int, changed: int) -> None:
        """Counts for a run: whole-value columns masked every non-NULL value of its regular rows."""
        self.seen += rows
        self.rows += changed
        for step in self.steps:
            if step.kind != DETECT:
                masked = regular - step.skipped
                step.counter.values += masked
                if step.nulling:
                    step.counter.nulled += masked
            step.skipped = 0
