"""Masking strategies: what a sensitive value (or a detected part of one) is replaced with.

`apply(value) -> str | None`; None means SQL NULL / JSON null. Strategies whose output does
not depend on the value expose it as `constant` so row plans can skip decoding.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import string
from typing import Callable, Optional

DEFAULT_REDACTION = "[REDACTED]"
_UNSET = object()
_ASCII_ALNUM = (string.ascii_letters + string.digits).encode()

BytesMasker = Callable[[bytes], Optional[bytes]]


def _via_text(apply: Callable[[str], Optional[str]]) -> BytesMasker:
    """bytes -> bytes by decoding: the reference every bytes fast path must agree with."""
    def run(raw: bytes) -> Optional[bytes]:
        out = apply(raw.decode("utf-8", "surrogateescape"))
        return None if out is None else out.encode("utf-8", "surrogateescape")
    return run


class Strategy:
    name = "strategy"
    constant = _UNSET          # the output for every input, when it does not depend on the value

    def apply(self, value: str) -> Optional[str]:
        raise NotImplementedError

    @property
    def is_constant(self) -> bool:
        return self.constant is not _UNSET

    def bytes_masker(self) -> BytesMasker:
        """`apply` on raw UTF-8 value bytes (invalid bytes kept via surrogateescape), returning
        bytes or None. Subclasses override it with paths that skip the decode/encode round trip;
        the result is always byte-for-byte what the decoding reference gives."""
        return _via_text(self.apply)


class Redact(Strategy):
    name = "redact"

    def __init__(self, replacement: str = DEFAULT_REDACTION):
        self.constant = replacement

    def apply(self, value: str) -> Optional[str]:
        return self.constant


class Fixed(Redact):
    name = "fixed"


class Null(Strategy):
    name = "null"
    constant = None

    def apply(self, value: str) -> Optional[str]:
        return None


_ALNUM = re.compile(r"[^\W_]")


class Partial(Strategy):
    """Keep the first/last N letters or digits; mask the others one for one, keeping separators."""

    name = "partial"

    def __init__(self, keep_first: int = 0, keep_last: int = 4, mask_char: str = "*"):
        if not isinstance(mask_char, str) or len(mask_char) != 1:
            raise ValueError(f"mask_char must be one character, not {mask_char!r}")
        self.keep_first = keep_first
        self.keep_last = keep_last
        self.mask_char = mask_char
        # re.sub reads backslashes in a string replacement as escapes (\g<0>, \1): doubling the
        # only special character makes any mask character stand for itself
        self._repl = mask_char.replace("\\", "\\\\")
        self._ascii_mask = str.maketrans({c: mask_char for c in string.ascii_letters + string.digits})

    def apply(self, value: str) -> Optional[str]:
        if self.keep_first == 0 and self.keep_last:
            # fast path (card/SSN last 4): walk back over the kept tail, mask the head in one C call
            i = len(value)
            kept = 0
            while i and kept < self.keep_last:
                i -= 1
                if value[i].isalnum():        # same set as [^\W_]
                    kept += 1
            if kept == self.keep_last:
                head = value[:i]
                if head.isascii():            # str.translate beats a regex substitution per character
                    masked = head.translate(self._ascii_mask)
                    n = masked.count(self.mask_char) - (0 if self.mask_char.isalnum() else head.count(self.mask_char))
                else:
                    masked, n = _ALNUM.subn(self._repl, head)
                if n >= kept:                 # at least as much masked as kept; else the short-value rule
                    return masked + value[i:]
        positions = [m.start() for m in _ALNUM.finditer(value)]
        n = len(positions)
        if n == 0:
            return value
        if self.keep_first + self.keep_last >= n:
            # too short to keep anything without revealing it all: keep only the tail half at most
            keep_last = min(self.keep_last, n // 2)
            keep_first = 0
        else:
            keep_first, keep_last = self.keep_first, self.keep_last
        lo = positions[keep_first] if keep_first < n else len(value)
        hi = positions[n - keep_last] if keep_last > 0 else len(value)
        if hi <= lo:
            return value
        middle = _ALNUM.sub(self._repl, value[lo:hi])
        return value[:lo] + middle + value[hi:]

    def bytes_masker(self) -> BytesMasker:
        slow = _via_text(self.apply)
        mask_byte = self.mask_char.encode("utf-8", "surrogateescape")
        k = self.keep_last
        if self.keep_first != 0 or k <= 0 or len(mask_byte) != 1:
            return slow
        table = bytes.maketrans(_ASCII_ALNUM, mask_byte * len(_ASCII_ALNUM))

        def run(raw: bytes) -> Optional[bytes]:
            # ASCII only: bytes.isalnum/translate then mean exactly what the text path's
            # isalnum and [^\W_] mean, so the result is the same without decoding
            if raw.isalnum():                     # e.g. hex digests, account numbers
                head = len(raw) - k
                if head >= k:
                    return mask_byte * head + raw[head:]
            elif raw.isascii() and raw[-k:].isalnum():     # e.g. 123-45-6789, 4111 1111 1111 1111
                head = raw[:-k]
                # as many masked as kept, else the text path's short-value rule decides
                if len(head) - len(head.translate(None, _ASCII_ALNUM)) >= k:
                    return head.translate(table) + raw[-k:]
            return slow(raw)
        return run


class Hash(Strategy):
    """Keyed HMAC-SHA256, deterministic per deployment key so joins and GROUP BY still work."""

    name = "hash"

    def __init__(self, key: bytes, prefix: str = "h:", length: int = 16):
        self.key = key
        self.prefix = prefix
        self.length = length

    def apply(self, value: str) -> Optional[str]:
        digest = hmac.new(self.key, value.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()
        return self.prefix + digest[: self.length]

    def bytes_masker(self) -> BytesMasker:
        # the value's bytes are what apply() hashes (surrogateescape round-trips any bytes)
        keyed = hmac.new(self.key, digestmod=hashlib.sha256)
        prefix = self.prefix.encode("utf-8", "surrogateescape")
        length = self.length

        def run(raw: bytes) -> Optional[bytes]:
            h = keyed.copy()
            h.update(raw)
            return prefix + h.hexdigest()[:length].encode()
        return run


class Email(Strategy):
    """Keep the domain: 'jane.doe@example.com' -> '****@example.com'."""

    name = "email"

    def __init__(self, replacement: str = "****", fallback: Optional[Strategy] = None):
        self.replacement = replacement
        self.fallback = fallback or Redact()

    def apply(self, value: str) -> Optional[str]:
        at = value.rfind("@")
        if at <= 0:
            return self.fallback.apply(value)
        return self.replacement + value[at:]

    def bytes_masker(self) -> BytesMasker:
        # "@" is one byte in UTF-8 and never part of a multi-byte sequence: rfind on bytes
        # finds the same split as on the text
        replacement = self.replacement.encode("utf-8", "surrogateescape")
        fallback = self.fallback.bytes_masker()

        def run(raw: bytes) -> Optional[bytes]:
            at = raw.rfind(b"@")
            if at <= 0:
                return fallback(raw)
            return replacement + raw[at:]
        return run


STRATEGY_NAMES = ("redact", "partial", "hash", "email", "null", "fixed:<value>")


def build_strategy(spec: str, *, replacement: str = DEFAULT_REDACTION, keep_first: int = 0,
                   keep_last: int = 4, mask_char: str = "*", hash_key: Optional[bytes] = None,
                   hash_prefix: str = "h:") -> Strategy:
    """Strategy from its config spelling; raises ValueError naming the accepted spellings."""
    if spec == "redact":
        return Redact(replacement)
    if spec == "partial":
        return Partial(keep_first, keep_last, mask_char)
    if spec == "hash":
        if not hash_key:
            raise ValueError("strategy hash needs a per-deployment key: set masking.hash_key_file "
                             "(a file with at least 16 bytes) or masking.hash_key")
        return Hash(hash_key, hash_prefix)
    if spec == "email":
        return Email(fallback=Redact(replacement))
    if spec == "null":
        return Null()
    if spec.startswith("fixed:"):
        return Fixed(spec[len("fixed:"):])
    raise ValueError(f"unknown strategy {spec!r} (use one of: {', '.join(STRATEGY_NAMES)})")
