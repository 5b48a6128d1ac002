"""Value detectors (card numbers, SSNs, emails, ...) and a scanner running many of them in one pass.

A detector is a regex plus an optional validator (Luhn, SSN ranges, IBAN mod-97, ...) and a
cheap pre-filter ("hint") on the whole value: detectors whose hint fails are left out of the
combined regex for that value, so most values (names, cities, status words) cost one
`str.translate` and a few comparisons.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Optional

Span = tuple[int, int]
# (text, start, end) -> the span to mask (possibly narrower), or None when the match is not a real value
Validator = Callable[[str, int, int], Optional[Span]]
# (text, ascii digit count) -> may this detector match anywhere in text?
Hint = Callable[[str, int], bool]

_DROP_DIGITS = str.maketrans("", "", "0123456789")


@dataclasses.dataclass(frozen=True)
class Detector:
    name: str
    pattern: str                      # regex source; groups must be non-capturing or named
    validate: Optional[Validator] = None
    hint: Optional[Hint] = None
    flags: int = 0

    def compiled(self) -> re.Pattern:
        return re.compile(self.pattern, self.flags)


# ---------------------------------------------------------------------------------------
# validators
# ---------------------------------------------------------------------------------------
_LUHN_DOUBLE = (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)


def luhn_valid(digits: str) -> bool:
    odd = sum(ord(c) - 48 for c in digits[-1::-2])
    even = sum(_LUHN_DOUBLE[ord(c) - 48] for c in digits[-2::-2])
    return (odd + even) % 10 == 0


def _card_digits_ok(digits: str) -> bool:
    # issuer prefixes of the card networks start with 2-6 (Mastercard 2/5, Amex 3, Visa 4, Discover 6)
    return 13 <= len(digits) <= 19 and digits[0] in "23456" and luhn_valid(digits)


def _validate_card(text: str, start: int, end: int) -> Optional[Span]:
    chunk = text[start:end]
    digits = chunk.replace(" ", "").replace("-", "")
    if _card_digits_ok(digits):
        return start, end
    # the greedy match may have swallowed neighbouring digit groups: try windows on group boundaries
    starts = [start] + [start + i + 1 for i, c in enumerate(chunk) if c in " -"]
    ends = [start + i for i, c in enumerate(chunk) if c in " -"] + [end]
    best: Optional[Span] = None
    for s in starts:
        for e in ends:
            if e - s < 13 or (best is not None and e - s <= best[1] - best[0]):
                continue
            d = text[s:e].replace(" ", "").replace("-", "")
            if _card_digits_ok(d):
                best = (s, e)
    return best


def ssn_valid(area: str, group: str, serial: str) -> bool:
    return area != "000" and area != "666" and area[0] != "9" and group != "00" and serial != "0000"


def _validate_ssn(text: str, start: int, end: int) -> Optional[Span]:
    s = text[start:end]
    return (start, end) if ssn_valid(s[0:3], s[4:6], s[7:11]) else None


def iban_valid(compact: str) -> bool:
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    numeric = "".join(str(int(c, 36)) for c in rearranged)
    return int(numeric) % 97 == 1


def _validate_iban(text: str, start: int, end: int) -> Optional[Span]:
    compact = text[start:end].replace(" ", "")
    if iban_valid(compact):
        return start, end
    if text[end - 1 : end].isalnum() and " " in text[start:end]:
        # the last group may belong to the following word: retry without it
        cut = text.rfind(" ", start, end)
        if iban_valid(text[start:cut].replace(" ", "")):
            return start, cut
    return None


def _validate_aws_secret(text: str, start: int, end: int) -> Optional[Span]:
    s = text[start:end]
    # random base64: mixed case and a digit; excludes hex digests and plain words
    if any(c.isupper() for c in s) and any(c.islower() for c in s) and any(c.isdigit() for c in s):
        return start, end
    return None


def _validate_bearer(text: str, start: int, end: int) -> Optional[Span]:
    # mask the token, keep the word "Bearer" so records still say what it was
    i = start + 6
    while i < end and text[i].isspace():
        i += 1
    return (i, end) if i < end else None


def _validate_phone(text: str, start: int, end: int) -> Optional[Span]:
    digits = sum(c.isdigit() for c in text[start:end])
    return (start, end) if 10 <= digits <= 15 else None


# ---------------------------------------------------------------------------------------
# built-in detectors
# ---------------------------------------------------------------------------------------
BUILTIN: dict[str, Detector] = {
    d.name: d for d in (
        Detector("jwt", r"\beyJ[A-Za-z0-9_-]{4,}\.eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*",
                 hint=lambda t, n: "eyJ" in t),
        Detector("bearer", r"\b[Bb][Ee][Aa][Rr][Ee][Rr][ \t]+[A-Za-z0-9\-._~+/]{8,}=*", _validate_bearer,
                 hint=lambda t, n: "earer" in t or "EARER" in t),
        Detector("aws_access_key_id",
                 r"(?<![A-Z0-9])(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA|APKA)[A-Z0-9]{16}(?![A-Z0-9])",
                 hint=lambda t, n: len(t) >= 20 and "A" in t),
        Detector("aws_secret_key", r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])", _validate_aws_secret,
                 hint=lambda t, n: len(t) >= 40 and n > 0),
        Detector("iban", r"(?<![A-Za-z0-9])[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,30}(?![A-Za-z0-9])", _validate_iban,
                 hint=lambda t, n: n >= 2 and len(t) >= 15),
        Detector("card", r"(?<![0-9])[0-9](?:[ -]?[0-9]){12,18}(?![0-9])", _validate_card,
                 hint=lambda t, n: n >= 13),
        Detector("ssn", r"(?<![0-9])(?:[0-9]{3}-[0-9]{2}-[0-9]{4}|[0-9]{3} [0-9]{2} [0-9]{4})(?![0-9])", _validate_ssn,
                 hint=lambda t, n: n >= 9),
        Detector("email", r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b",
                 hint=lambda t, n: "@" in t),
        Detector("phone",
                 r"(?<![0-9+])(?:\+[1-9][0-9]{0,2}[ .-]?(?:\(?[0-9]{1,4}\)?[ .-]?){1,4}[0-9]{3,4}"
                 r"|(?:1[ .-]?)?(?:\([2-9][0-9]{2}\)|[2-9][0-9]{2})[ .-]?[2-9][0-9]{2}[ .-]?[0-9]{4})(?![0-9])",
                 _validate_phone, hint=lambda t, n: n >= 10),
    )
}
# phone numbers look like many other numbers (ids, amounts): only on request
DEFAULT_SCAN = tuple(name for name in BUILTIN if name != "phone")


def custom_detector(name: str, pattern: str, ignore_case: bool = False) -> Detector:
    """A user regex; raises re.error (or ValueError for numbered back-references) when unusable."""
    if re.search(r"\\[1-9]", pattern):
        raise ValueError("numbered back-references are not supported; use (?P<name>...) and (?P=name)")
    flags = re.IGNORECASE if ignore_case else 0
    re.compile(pattern, flags)
    return Detector(name, pattern, flags=flags)


# ---------------------------------------------------------------------------------------
# scanner
# ---------------------------------------------------------------------------------------
class Scanner:
    """Finds non-overlapping detector matches in text, left to right, with one regex pass."""

    def __init__(self, detectors: Iterable[Detector]):
        self.detectors = tuple(detectors)
        self._single = {d.name: d.compiled() for d in self.detectors}
        self._combined: dict[tuple, tuple[re.Pattern, dict]] = {}
        self._all_hinted = all(d.hint is not None for d in self.detectors)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.detectors)

    def _regex_for(self, active: tuple) -> tuple[re.Pattern, dict]:
        entry = self._combined.get(active)
        if entry is None:
            groups = {}
            parts = []
            for i, d in enumerate(active):
                g = f"_w{i}"
                groups[g] = d
                flags = "(?i:" if d.flags & re.IGNORECASE else "(?:"
                parts.append(f"(?P<{g}>{flags}{d.pattern}))")
            entry = (re.compile("|".join(parts)), groups)
            self._combined[active] = entry
        return entry

    def find(self, text: str) -> list[tuple[int, int, Detector]]:
        if not text:
            return []
        ndigits = len(text) - len(text.translate(_DROP_DIGITS))
        active = tuple(d for d in self.detectors if d.hint is None or d.hint(text, ndigits))
        if not active:
            return []
        rx, groups = self._regex_for(active)
        found = []
        pos = 0
        search = rx.search
        while True:
            m = search(text, pos)
            if m is None:
                return found
            d = groups[m.lastgroup]
            s, e = m.span()
            span = d.validate(text, s, e) if d.validate is not None else (s, e)
            if span is None:
                # another detector may still match at this position (e.g. an SSN the card regex ran over)
                span, d = self._retry(active, d, text, s)
                if span is None:
                    pos = s + 1
                    continue
            if span[1] <= span[0]:
                pos = max(e, s + 1)
                continue
            found.append((span[0], span[1], d))
            pos = span[1]

    def _retry(self, active: tuple, failed: Detector, text: str, at: int):
        after = False
        for d in active:
            if d is failed:
                after = True
                continue
            if not after:
                continue
            m = self._single[d.name].match(text, at)
            if m is None:
                continue
            span = d.validate(text, *m.span()) if d.validate is not None else m.span()
            if span is not None:
                return span, d
        return None, failed

    def contains(self, text: str) -> bool:
        return bool(self.find(text))
