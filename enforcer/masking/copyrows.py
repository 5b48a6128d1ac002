"""COPY TO STDOUT rows (one CopyData per row) in text and CSV format: split, mask fields, rejoin.

Only fields whose value changes are re-encoded; a row with no change is returned as is.
`mask_field(index, value) -> str | None | UNCHANGED` decides per field (None = NULL).
"""
from __future__ import annotations

from typing import Callable, Optional

from . import pgrow
from .pgrow import UNCHANGED, Counter


class CachedFieldMasker:
    """One COPY field's masker, `fn(value) -> (str | None | UNCHANGED, values masked)`, with a
    bounded cache of results per distinct value (the same policy as row plans: emptied when
    full, switched off when fewer than one lookup in four hits). Counts go to `counter`."""

    __slots__ = ("fn", "counter", "cache", "lookups")

    def __init__(self, fn: Callable[[str], tuple], counter: Counter):
        self.fn = fn
        self.counter = counter
        self.cache: Optional[dict] = {}
        self.lookups = 0

    def __call__(self, value: str):
        cache = self.cache
        if cache is None or len(value) > pgrow.CACHE_VALUE_BYTES:
            result, n = self.fn(value)
        else:
            self.lookups += 1
            hit = cache.get(value)
            if hit is None:
                hit = self.fn(value)
                if len(cache) >= pgrow.CACHE_ENTRIES:
                    if (self.lookups - len(cache)) * 4 < self.lookups:
                        self.cache = None
                    else:
                        cache.clear()
                        self.lookups = 0
                if self.cache is not None:
                    cache[value] = hit
            result, n = hit
        if n:
            self.counter.values += n
        return result

_TEXT_ESCAPES = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}
_TEXT_NEEDS_ESCAPE = {"\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v"}


def unescape_text_field(raw: str) -> str:
    if "\\" not in raw:
        return raw
    out = []
    i = 0
    n = len(raw)
    while i < n:
        c = raw[i]
        if c != "\\" or i + 1 >= n:
            out.append(c)
            i += 1
            continue
        nxt = raw[i + 1]
        if nxt in _TEXT_ESCAPES:
            out.append(_TEXT_ESCAPES[nxt])
            i += 2
        elif nxt in "01234567":
            j = i + 1
            while j < n and j < i + 4 and raw[j] in "01234567":
                j += 1
            out.append(chr(int(raw[i + 1:j], 8)))
            i = j
        elif nxt == "x" and i + 2 < n and raw[i + 2] in "0123456789abcdefABCDEF":
            j = i + 2
            while j < n and j < i + 4 and raw[j] in "0123456789abcdefABCDEF":
                j += 1
            out.append(chr(int(raw[i + 2:j], 16)))
            i = j
        else:
            out.append(nxt)
            i += 2
    return "".join(out)


def escape_text_field(value: str, delimiter: str = "\t") -> str:
    out = "".join(_TEXT_NEEDS_ESCAPE.get(c, c) for c in value)
    # PostgreSQL backslash-escapes a data character equal to the delimiter, as this must
    return out.replace(delimiter, "\\" + delimiter) if delimiter not in _TEXT_NEEDS_ESCAPE else out


def split_text_row(body: str, delimiter: str = "\t") -> list[str]:
    """The raw (still escaped) fields of a text-format row: a delimiter after a backslash is data."""
    if "\\" not in body:
        return body.split(delimiter)
    fields, start, i, n = [], 0, 0, len(body)
    while i < n:
        c = body[i]
        if c == "\\":
            i += 2
            continue
        if c == delimiter:
            fields.append(body[start:i])
            start = i + 1
        i += 1
    fields.append(body[start:])
    return fields


def mask_text_row(line: str, mask_field: Callable[[int, str], object], delimiter: str = "\t") -> Optional[str]:
    """A text-format row (fields separated by the COPY's delimiter, tab by default; trailing
    newline); None when unchanged."""
    body, nl = (line[:-1], "\n") if line.endswith("\n") else (line, "")
    fields = split_text_row(body, delimiter)
    changed = False
    for i, raw in enumerate(fields):
        if raw == "\\N":
            continue
        new = mask_field(i, unescape_text_field(raw))
        if new is UNCHANGED:
            continue
        fields[i] = "\\N" if new is None else escape_text_field(new, delimiter)
        changed = True
    return delimiter.join(fields) + nl if changed else None


def split_csv_row(body: str, delimiter: str = ",", quote: str = '"') -> list[tuple[str, bool]]:
    """Fields of one CSV row as (value, was_quoted); quoted empty is '' and unquoted empty is NULL."""
    fields = []
    i = 0
    n = len(body)
    while True:
        if i < n and body[i] == quote:
            i += 1
            buf = []
            while i < n:
                c = body[i]
                if c == quote:
                    if i + 1 < n and body[i + 1] == quote:
                        buf.append(quote)
                        i += 2
                        continue
                    i += 1
                    break
                buf.append(c)
                i += 1
            j = body.find(delimiter, i)
            j = n if j < 0 else j
            fields.append(("".join(buf) + body[i:j], True))
        else:
            j = body.find(delimiter, i)
            j = n if j < 0 else j
            fields.append((body[i:j], False))
        if j >= n:
            return fields
        i = j + 1


def quote_csv_field(value: str, quote: str = '"') -> str:
    return quote + value.replace(quote, quote + quote) + quote


def mask_csv_row(line: str, mask_field: Callable[[int, str], object], delimiter: str = ",",
                 quote: str = '"') -> Optional[str]:
    """A CSV-format row; None when unchanged. Masked fields are always quoted (never read as NULL)."""
    if line.endswith("\r\n"):
        body, nl = line[:-2], "\r\n"
    elif line.endswith("\n"):
        body, nl = line[:-1], "\n"
    else:
        body, nl = line, ""
    fields = split_csv_row(body, delimiter, quote)
    out = []
    changed = False
    for i, (value, quoted) in enumerate(fields):
        if not quoted and value == "":
            out.append("")       # NULL
            continue
        new = mask_field(i, value)
        if new is UNCHANGED:
            out.append(quote_csv_field(value, quote) if quoted else value)
            continue
        changed = True
        out.append("" if new is None else quote_csv_field(new, quote))
    return delimiter.join(out) + nl if changed else None
