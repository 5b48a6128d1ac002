"""Masking inside JSON documents (HTTP bodies): by key glob, by path, and by detectors.

Speed (a 1 MB response is masked in the time it takes to parse it, about):
- each distinct key is matched against the key globs once, then looked up in a dict;
- the body bytes are checked first for the literal parts of every key/path rule: when no rule
  can match and no detector runs, nothing is walked (or even parsed, see `mask_body`);
- with key rules only, the masked values are spliced into the original text instead of
  re-serialising the whole document, so unchanged bytes stay as they were;
- the document is walked iteratively and masked in place; detector results are memoised per
  document, because API responses repeat the same values (statuses, cities, tags) many times.
"""
from __future__ import annotations

import json
import operator
import re
from itertools import chain, repeat
from json.encoder import encode_basestring
from typing import Optional

from .detectors import Scanner
from .pgrow import mask_spans
from .rules import Rule

MAX_CACHED_KEYS = 4096          # distinct keys remembered per rule set; an endless key space only costs speed
_UNKNOWN = object()
_CLEAN = object()
_CONTAINERS = (dict, list)
# under re.IGNORECASE these non-ASCII letters match ASCII ones (İ ı ſ K): the byte pre-filter,
# which lower-cases ASCII only, cannot rule keys out when they occur
_FOLDING_LETTERS = tuple(c.encode() for c in "\u0130\u0131\u017f\u212a")
_ASCII = bytes(range(128))
# characters a key may not hold for its raw spelling in the body to be unique and unambiguous
_UNSPLICEABLE = frozenset('"\\/') | frozenset(chr(c) for c in range(0x20)) | {"\x7f"}
_NOT_FIRST = frozenset(" \t\n\r,:]}")
_WS = "[ \\t\\n\\r]*"                          # JSON white space (not re's \s)
_UNQUOTE = operator.itemgetter(slice(1, -1))
_scan_value = json.JSONDecoder().scan_once      # the C scanner: (str, index) -> (value, end)


def _whole(rule: Rule, value):
    """A whole JSON value under a masked key: scalars through the strategy, containers redacted whole."""
    if value is None:
        return None
    if isinstance(value, str):
        return rule.strategy.apply(value)
    if isinstance(value, (bool, int, float)):
        return rule.strategy.apply(str(value).lower() if isinstance(value, bool) else str(value))
    # an object or array under a masked key: nothing of it may leave
    return rule.strategy.apply("") if rule.strategy.is_constant else None


def _glob_needles(glob: Optional[str]) -> Optional[tuple[bytes, ...]]:
    """Byte strings every body holding a key that matches `glob` contains (lower-cased, with the
    quotes where the glob is anchored), or None when the glob cannot be reduced to such literals."""
    if not glob or "[" in glob or not glob.isascii() or any(c in _UNSPLICEABLE for c in glob):
        return None
    pieces = [p for p in re.split(r"[*?]+", glob)]
    pieces[0] = '"' + pieces[0] if glob[0] not in "*?" else pieces[0]
    pieces[-1] = pieces[-1] + '"' if glob[-1] not in "*?" else pieces[-1]
    return tuple(p.lower().encode() for p in pieces if p)


def _path_needles(segments: tuple[str, ...]) -> Optional[tuple[bytes, ...]]:
    """The quoted key names a path needs (exact case), or None when it needs none it can be told by."""
    needles = []
    for seg in segments:
        if seg == "*" or seg.isdigit():
            continue        # any key, or an index (which never shows in the bytes)
        if any(c in _UNSPLICEABLE for c in seg):
            return None
        needles.append(f'"{seg}"'.encode())
    return tuple(needles) or None


def _has_folding_letter(body: bytes) -> bool:
    # only the non-ASCII bytes, usually few; a UTF-8 lead byte keeps its continuation bytes next to it
    rest = body.translate(None, _ASCII)
    return any(f in rest for f in _FOLDING_LETTERS)


def is_utf8_json(body: bytes) -> bool:
    """The encoding json.loads would pick is UTF-8 (RFC 8259), not UTF-16/32."""
    return not body.startswith((b"\xff\xfe", b"\xfe\xff")) and b"\x00" not in body[:4]


def _spliceable_key(key: str) -> bool:
    return bool(key) and key[0] not in _NOT_FIRST and not any(c in _UNSPLICEABLE for c in key)


def _json_text(value) -> str:
    return "null" if value is None else encode_basestring(value)


class JsonMasker:
    def __init__(self, field_rules: list[Rule], scanner: Optional[Scanner], strategies: dict,
                 rule_names: dict):
        self.key_rules = [r for r in field_rules if r.json_key is not None]
        self.path_rules = [r for r in field_rules if r.json_path is not None]
        self.scanner = scanner if scanner is not None and scanner.detectors else None
        self.strategies = strategies          # detector name -> Strategy
        self.rule_names = rule_names          # detector name -> the rule it belongs to (for counts)
        self._key_cache: dict[str, Optional[Rule]] = {}
        self._key_needles = [_glob_needles(r.json_key_glob) for r in self.key_rules]
        self._path_needles = [(r, _path_needles(r.json_path.segments)) for r in self.path_rules]
        self._splice_rx: dict = {}             # compiled splice regexes by key / key set

    # -- which rule a key selects ---------------------------------------------------------
    def rule_for_key(self, key: str) -> Optional[Rule]:
        """The first key rule whose glob matches `key` (cached: globs run once per distinct key)."""
        rule = self._key_cache.get(key, _UNKNOWN)
        if rule is _UNKNOWN:
            rule = next((r for r in self.key_rules if r.json_key.match(key)), None)
            if len(self._key_cache) >= MAX_CACHED_KEYS:
                self._key_cache.clear()
            self._key_cache[key] = rule
        return rule

    def live_rules(self, body: bytes) -> tuple[bool, list[Rule]]:
        """(may a key rule match, the path rules that may match) judged from the raw bytes alone."""
        if not is_utf8_json(body) or b"\\u" in body:      # \\uXXXX can spell any key
            return bool(self.key_rules), list(self.path_rules)
        keys_live = False
        if self.key_rules:
            if any(n is None for n in self._key_needles):
                keys_live = True
            else:
                lowered = body.lower()
                keys_live = any(all(n in lowered for n in needles) for needles in self._key_needles) or (
                    not body.isascii() and _has_folding_letter(body))
        paths = [r for r, needles in self._path_needles if needles is None or all(n in body for n in needles)]
        return keys_live, paths

    # -- bodies ----------------------------------------------------------------------------
    def mask_body(self, body: bytes, may_skip_parse: bool = False) -> Optional[tuple[bytes, dict]]:
        """(masked body, {rule name: values masked}) for a JSON body; the very same `body` object
        when nothing changed. None when the body is not valid JSON (the caller then treats it as
        text). `may_skip_parse`: a body that is not JSON would be left alone too, so a body no
        rule can touch is returned without parsing it."""
        keys_live, paths = self.live_rules(body)
        untouchable = not keys_live and not paths and self.scanner is None
        if untouchable and may_skip_parse:
            return body, {}
        if untouchable or self.scanner is not None or paths or not is_utf8_json(body) or b"\\u" in body:
            try:
                doc = json.loads(body)
            except (ValueError, UnicodeDecodeError):
                return None
            if untouchable:
                return body, {}
        else:
            # key rules only: parse to validate and to collect every object (the hook replaces
            # them by None in the result, which is not needed), then splice the original text
            objects: list[dict] = []
            try:
                json.loads(body, object_hook=objects.append)
            except (ValueError, UnicodeDecodeError):
                return None
            key_counts = self._count_key_masks(objects)
            if not key_counts:
                return body, {}
            spliced = self._splice(body, key_counts)
            if spliced is not None:
                counts: dict[str, int] = {}
                for key, n in key_counts.items():
                    if n:
                        name = self.rule_for_key(key).name
                        counts[name] = counts.get(name, 0) + n
                return (spliced, counts) if counts else (body, {})
            doc = json.loads(body)
        masked, counts = self._mask_in_place(doc, paths)
        if not counts:
            return body, {}
        text = json.dumps(masked, ensure_ascii=False, separators=(",", ":"))
        try:
            return text.encode(), counts
        except UnicodeEncodeError:        # a lone surrogate (\\ud800) in the input: keep it escaped
            return json.dumps(masked, separators=(",", ":")).encode(), counts

    def mask(self, doc) -> tuple[object, dict]:
        """Masks a parsed document in place; returns it (or its replacement) and {rule name: values masked}."""
        return self._mask_in_place(doc, self.path_rules)

    # -- key rules only: count, then splice ------------------------------------------------
    def _count_key_masks(self, objects: list[dict]) -> dict[str, int]:
        """{key a rule masks: objects holding a non-null value under it}, over every object of
        the body (also those nested in masked values or dropped as duplicate keys: the splice
        masks those too). Python code runs per distinct key, not per node. A key present only
        with null is listed with 0: its object values read as null here (the parse hook turned
        them into None), and the splice must look at them."""
        found: dict[str, int] = {}
        for key in set(chain.from_iterable(objects)):
            if self.rule_for_key(key) is None:
                continue
            values = list(map(dict.get, objects, repeat(key)))     # a missing key reads as null
            found[key] = len(values) - values.count(None)
        return found

    def _splice(self, body: bytes, key_counts: dict[str, int]) -> Optional[bytes]:
        """The body with the values of the masked keys replaced in the original text, or None
        when that cannot be done exactly: a key with characters that have several spellings, an
        object or array under a masked key, or a key twice in one object (counts differ).

        Sound on valid JSON (the caller parsed it, and it has no \\u escapes): a key's opening
        quote follows '{', ',' or white space, never a backslash, and it is never a closing quote,
        which only white space or one of , : ] } follows (a spliceable key starts with none of
        those); a string followed by ':' is a key. Such a key has one spelling, so every object
        holding it shows up once in the text; equal counts mean exactly those were replaced."""
        if not all(_spliceable_key(k) for k in key_counts):
            return None
        rules = {k: self.rule_for_key(k) for k in key_counts}
        text = body.decode("utf-8", "surrogatepass")
        # one pass per key: a regex with a literal prefix is searched for at C speed, and re.split
        # hands over all values at once, so for plain strings Python code runs only in the strategy
        for key in key_counts:
            rule = rules[key]
            # parts: text, white space + colon, string value, token value, text, ...
            parts = self._value_regex(key).split(text)
            strings, tokens = parts[2::4], parts[3::4]
            if tokens.count(None) == len(tokens) and None not in strings and "\\" not in "".join(strings):
                masked = list(map(rule.strategy.apply, map(_UNQUOTE, strings)))
                masked = [_json_text(v) for v in masked] if None in masked else list(map(encode_basestring, masked))
                found = len(masked)
            else:
                masked = []
                found = 0
                for raw, token in zip(strings, tokens):
                    value = self._token_value(raw or token)
                    if value is _UNKNOWN:
                        return None       # an object or array: the general walk handles those
                    if value is None:
                        masked.append("null")     # a null stays null and is not counted
                    else:
                        masked.append(_json_text(_whole(rule, value)))
                        found += 1
            if found != key_counts[key]:
                return None               # a key twice in one object: the parser kept the last
            quoted = f'"{key}"'
            parts[1::4] = map(quoted.__add__, parts[1::4])
            parts[2::4] = masked
            parts[3::4] = repeat("", len(masked))
            # a replacement is a JSON string with its quotes escaped: it adds no key for later passes
            text = "".join(parts)
        return text.encode("utf-8", "surrogatepass")

    def _value_regex(self, key: str) -> re.Pattern:
        """`"key":` and the value after it when that is a string or a bare token."""
        rx = self._splice_rx.get(key)
        if rx is None:
            if len(self._splice_rx) >= 256:
                self._splice_rx.clear()
            # the look-behind drops \\"key": (inside a string: a key's opening quote never follows a
            # backslash); groups: white space and colon, a string value, a bare-token value
            quoted = re.escape(f'"{key}"')
            rx = self._splice_rx[key] = re.compile(
                f'{quoted}(?<!\\\\{quoted})({_WS}:{_WS})(?:("[^"\\\\]*(?:\\\\.[^"\\\\]*)*")|([-+.0-9A-Za-z]+))?')
        return rx

    @staticmethod
    def _token_value(raw: Optional[str]):
        """The value of a string with escapes or of a bare token; _UNKNOWN for anything else."""
        if raw is None:
            return _UNKNOWN
        try:
            value, end = _scan_value(raw, 0)
        except StopIteration:
            return _UNKNOWN
        return value if end == len(raw) else _UNKNOWN

    # -- the general walk ------------------------------------------------------------------
    def _mask_in_place(self, doc, path_rules: list[Rule]) -> tuple[object, dict]:
        counts: dict[str, int] = {}
        memo: dict[str, object] = {}         # detector results per distinct text of this document
        scan = self._scanner_for(counts, memo) if self.scanner is not None else None
        if type(doc) not in _CONTAINERS:
            return (scan(doc) if scan is not None and doc is not None and type(doc) is not bool else doc), counts
        depth = max((len(r.json_path.segments) for r in path_rules), default=0)
        by_length: dict[int, list[Rule]] = {}
        for r in path_rules:
            by_length.setdefault(len(r.json_path.segments), []).append(r)
        cache_get = self._key_cache.get
        rule_for_key = self.rule_for_key
        stack: list = [(doc, () if depth else None)]
        pop, push = stack.pop, stack.append
        while stack:
            node, path = pop()
            if type(node) is dict:
                items = node.items()
            else:
                items = enumerate(node)
            for k, v in items:
                rule = cache_get(k, _UNKNOWN) if type(k) is str else None
                if rule is _UNKNOWN:
                    rule = rule_for_key(k)
                p = None
                if path is not None:
                    p = path + (k,)
                    if rule is None:
                        for r in by_length.get(len(p), ()):
                            if r.json_path.matches(p):
                                rule = r
                                break
                if rule is not None and v is not None:
                    counts[rule.name] = counts.get(rule.name, 0) + 1
                    node[k] = _whole(rule, v)
                    continue
                tv = type(v)
                if tv is dict or tv is list:
                    push((v, p if p is not None and len(p) < depth else None))
                elif scan is not None and v is not None and tv is not bool:
                    new = scan(v)
                    if new is not v:
                        node[k] = new
        return doc, counts

    def _scanner_for(self, counts: dict, memo: dict):
        find = self.scanner.find
        strategies = self.strategies
        owners = self.rule_names

        def pick(d):
            return strategies[d.name]

        def scan(value):
            """A string or number through the detectors: itself when clean, else the masked text."""
            text = value if type(value) is str else str(value)
            hit = memo.get(text, _UNKNOWN)
            if hit is _UNKNOWN:
                found = find(text)
                if not found:
                    memo[text] = _CLEAN
                    return value
                hit = memo[text] = (mask_spans(text, found, pick), [owners[d.name] for _s, _e, d in found])
            elif hit is _CLEAN:
                return value
            masked, names = hit
            for name in names:
                counts[name] = counts.get(name, 0) + 1
            return masked
        return scan
