"""Masking inside JSON documents (HTTP bodies): by key glob, by path, and by detectors.

Speed (a 1 MB response is masked in the time it takes to parse it, about):
- each distinct key is matched against the key globs once, then looked up in a dict;
- the body bytes are checked first for the literal parts of every key/path rule: when no rule
  can match and no detector runs, nothing is walked (or even parsed, see `mask_body`);
- with key rules only, the masked values are spliced into the original bytes instead of
  re-serialising the whole document, so unchanged bytes stay as they were; string values written
  without escapes (the usual case) are masked once per distinct value, through the strategy's
  bytes fast path when they are ASCII;
- the document is walked iteratively and masked in place; detector results are memoised per
  document, because API responses repeat the same values (statuses, cities, tags) many times.

Duplicate keys: json.loads keeps the last value of a key an object holds twice, but the bytes that
leave hold every value. The splice masks every occurrence it finds in the bytes; the walk parses
objects with a repeated key into `_Pairs`, which keep every pair, and writes them back with
`_dumps_keeping_duplicates`. Counts are of the values masked, duplicates included.
"""
from __future__ import annotations

import json
import re
from itertools import repeat
from json.encoder import encode_basestring, encode_basestring_ascii
from typing import Optional

from .detectors import Scanner
from .pgrow import mask_spans
from .rules import Rule

MAX_CACHED_KEYS = 4096          # distinct keys remembered per rule set; an endless key space only costs speed
_UNKNOWN = object()
_CLEAN = object()
# under re.IGNORECASE these non-ASCII letters match ASCII ones (İ ı ſ K): the byte pre-filter,
# which lower-cases ASCII only, cannot rule keys out when they occur
_FOLDING_LETTERS = tuple(c.encode() for c in "\u0130\u0131\u017f\u212a")
_ASCII = bytes(range(128))
# characters a key may not hold for its raw spelling in the body to be unique and unambiguous
_UNSPLICEABLE = frozenset('"\\/') | frozenset(chr(c) for c in range(0x20)) | {"\x7f"}
_NOT_FIRST = frozenset(" \t\n\r,:]}")
_WS = "[ \\t\\n\\r]*"                          # JSON white space (not re's \s)
_JSON_UNSAFE = b'"\\' + bytes(range(0x20))     # bytes a JSON string may not hold unescaped
_scan_value = json.JSONDecoder().scan_once      # the C scanner: (str, index) -> (value, end)


class _Pairs:
    """A JSON object that holds a key more than once, with every (key, value) pair in order.

    The walk treats it as a dict: `items()` yields the pairs, and `obj[key] = value` while a pair
    is being visited replaces that pair's value (the walk only ever assigns to the current item)."""

    __slots__ = ("pairs", "_at")

    def __init__(self, pairs: list):
        self.pairs = pairs
        self._at = -1

    def items(self):
        for self._at, pair in enumerate(self.pairs):
            yield pair

    def __setitem__(self, key, value):
        self.pairs[self._at] = (key, value)


_CONTAINERS = (dict, list, _Pairs)


def _loads_keeping_duplicates(body: bytes) -> tuple[object, bool]:
    """(json.loads(body) with every object that repeats a key as a `_Pairs`, whether there was one)."""
    repeated = []

    def pairs_hook(pairs):
        obj = dict(pairs)
        if len(obj) == len(pairs):
            return obj
        repeated.append(True)
        return _Pairs(pairs)
    doc = json.loads(body, object_pairs_hook=pairs_hook)
    return doc, bool(repeated)


def _dumps(doc, ensure_ascii: bool) -> str:
    return json.dumps(doc, ensure_ascii=ensure_ascii, separators=(",", ":"))


def _dumps_keeping_duplicates(doc, ensure_ascii: bool) -> str:
    """`_dumps` for a document holding `_Pairs` (json.dumps cannot write a key twice). Iterative,
    so nesting as deep as the parser accepted cannot exhaust the Python stack."""
    quote = encode_basestring_ascii if ensure_ascii else encode_basestring
    scalar = json.JSONEncoder(ensure_ascii=ensure_ascii, separators=(",", ":")).encode
    out: list[str] = []
    stack: list = [(False, doc)]        # (is literal text, text or value), popped from the end
    while stack:
        literal, node = stack.pop()
        if literal:
            out.append(node)
            continue
        t = type(node)
        if t is dict or t is _Pairs:
            pairs = node.pairs if t is _Pairs else list(node.items())
            if not pairs:
                out.append("{}")
                continue
            stack.append((True, "}"))
            for i in range(len(pairs) - 1, -1, -1):
                k, v = pairs[i]
                stack.append((False, v))
                stack.append((True, ("," if i else "{") + quote(k) + ":"))
        elif t is list:
            if not node:
                out.append("[]")
                continue
            stack.append((True, "]"))
            for i in range(len(node) - 1, -1, -1):
                stack.append((False, node[i]))
                stack.append((True, "," if i else "["))
        else:
            out.append(scalar(node))
    return "".join(out)


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


def _has_u_escape(body: bytes) -> bool:
    # a one-byte search runs at memchr speed; most bodies hold no backslash at all
    return b"\\" in body and b"\\u" in body


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
        if not is_utf8_json(body) or _has_u_escape(body):      # \\uXXXX can spell any key
            return bool(self.key_rules), list(self.path_rules)
        keys_live = False
        if self.key_rules:
            if any(n is None for n in self._key_needles):
                keys_live = True
            elif any(all(n in body for n in needles) for needles in self._key_needles):
                keys_live = True        # spelled as in the rule: no need to lower-case 1 MB
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
        if untouchable:
            try:
                json.loads(body)
            except (ValueError, UnicodeDecodeError):
                return None
            return body, {}
        if self.scanner is not None or paths or not is_utf8_json(body) or _has_u_escape(body):
            try:
                doc, repeated = _loads_keeping_duplicates(body)
            except (ValueError, UnicodeDecodeError):
                return None
        else:
            # key rules only: parse to validate and to list the keys of every object, then splice
            # the original bytes. The hook `keys += obj` (C code) adds an object's keys to the list
            # and hands the list back in its place, so each dict and its values are freed as soon
            # as it is parsed instead of all at the end
            keys: list[str] = []
            try:
                json.loads(body, object_hook=keys.__iadd__)
            except (ValueError, UnicodeDecodeError):
                return None
            holders = self._count_key_holders(keys)
            del keys
            if not holders:
                return body, {}
            spliced = self._splice(body, holders)
            if spliced is not None:
                data, found = spliced
                counts: dict[str, int] = {}
                for key, n in found.items():
                    if n:
                        name = self.rule_for_key(key).name
                        counts[name] = counts.get(name, 0) + n
                return (data, counts) if counts else (body, {})
            doc, repeated = _loads_keeping_duplicates(body)
        # the walk sees every pair, repeated keys included: no counts means nothing needed masking
        masked, counts = self._mask_in_place(doc, paths)
        if not counts:
            return body, {}
        dumps = _dumps_keeping_duplicates if repeated else _dumps
        try:
            return dumps(masked, False).encode(), counts
        except UnicodeEncodeError:        # a lone surrogate (\\ud800) in the input: keep it escaped
            return dumps(masked, True).encode(), counts

    def mask(self, doc) -> tuple[object, dict]:
        """Masks a parsed document in place; returns it (or its replacement) and {rule name: values masked}."""
        return self._mask_in_place(doc, self.path_rules)

    # -- key rules only: count, then splice ------------------------------------------------
    def _count_key_holders(self, keys: list[str]) -> dict[str, int]:
        """{key a rule masks: objects holding it}, from the keys of every object of the body, one
        entry per object (also objects nested in masked values or dropped as duplicate keys: the
        splice meets those too). A dict holds a key once, so the count is of objects, whatever
        the value (null included). Python code runs per distinct key, not per node."""
        found: dict[str, int] = {}
        for key in set(keys):
            if self.rule_for_key(key) is not None:
                found[key] = keys.count(key)      # the parser shares one str per key: compared by identity
        return found

    def _splice(self, body: bytes, holders: dict[str, int]) -> Optional[tuple[bytes, dict[str, int]]]:
        """(the body with the values of the masked keys replaced in the original bytes, {key: non-null
        values masked}), or None when that cannot be done exactly: a key with characters that have
        several spellings, or an object or array under a masked key.

        Sound on valid JSON (the caller parsed it, and it has no \\u escapes): a key's opening
        quote follows '{', ',' or white space, never a backslash, and it is never a closing quote,
        which only white space or one of , : ] } follows (a spliceable key starts with none of
        those); a string followed by ':' is a key. Such a key has one spelling, so every occurrence
        shows up in the bytes, each object holding it at least once; more occurrences than objects
        are keys written twice in one object, and every one of their values is replaced, not only
        the one the parser kept (the others would leave as they came)."""
        if not all(_spliceable_key(k) for k in holders):
            return None
        data = body
        found: dict[str, int] = {}
        # one pass per key: a regex with a literal prefix is searched for at C speed, and re.split
        # hands over all values at once, so Python code runs per distinct value at most
        for key, want in holders.items():
            rule = self.rule_for_key(key)
            plain, general = self._value_regexes(key)
            # parts: bytes, `"key" : `, the inside of a string value without escapes (None for any
            # other value: the quotes are consumed only with such a string), bytes, ...
            parts = plain.split(data)
            raws = parts[2::3]
            if len(raws) < want:
                return None           # cannot happen on such a key; the walk is the safe answer
            if None not in raws:
                # every occurrence holds a plain string (none is null)
                parts[2::3] = self._mask_plain_strings(rule, raws)
                found[key] = len(raws)
            else:
                parts, found[key] = self._splice_general(general, rule, data, want)
                if parts is None:
                    return None
            # a replacement is a JSON string with its quotes escaped: it adds no key for later passes
            data = b"".join(parts)
        return data, found

    @staticmethod
    def _mask_plain_strings(rule: Rule, raws: list[bytes]) -> list[bytes]:
        """The JSON texts replacing string values written without escapes (`raws`: the bytes between
        the quotes, which are then exactly the UTF-8 of the value, surrogates aside)."""
        strategy = rule.strategy
        if strategy.is_constant:
            return [_json_text(strategy.constant).encode("utf-8", "surrogatepass")] * len(raws)
        # responses repeat values (test data, shared cards, statuses): mask each distinct one once
        distinct = set(raws)
        todo = list(distinct) if len(distinct) * 2 <= len(raws) else raws
        out = None
        if b"".join(todo).isascii():
            # ASCII values: the strategy's bytes path gives what apply() gives, without decoding;
            # its output is used as is only when it is ASCII and needs no JSON escaping
            masked = list(map(strategy.bytes_masker(), todo))
            if None not in masked:
                joined = b"".join(masked)
                if joined.isascii() and len(joined.translate(None, _JSON_UNSAFE)) == len(joined):
                    out = list(map(b'"%s"'.__mod__, masked))
        if out is None:
            apply = strategy.apply
            out = [_json_text(apply(v.decode("utf-8", "surrogatepass"))).encode("utf-8", "surrogatepass")
                   for v in todo]
        if todo is raws:
            return out
        table = dict(zip(todo, out))
        return list(map(table.__getitem__, raws))

    def _splice_general(self, rx: re.Pattern, rule: Rule, data: bytes, want: int) -> tuple[Optional[list], int]:
        """(split parts of `data` with every value under the key masked, non-null values masked),
        for values of any kind; parts None for an object or array under the key, or for fewer
        occurrences than objects holding the key."""
        # parts: bytes, `"key" : `, string value, token value, bytes, ...
        parts = rx.split(data)
        strings, tokens = parts[2::4], parts[3::4]
        if len(strings) < want:
            return None, 0
        values = [raw if raw is not None else token for raw, token in zip(strings, tokens)]
        # values repeat (null above all): each distinct spelling is decoded and masked once
        texts: dict = {}
        counted: dict = {}
        for raw in set(values):
            value = self._token_value(raw)
            if value is _UNKNOWN:
                return None, 0        # an object or array: the general walk handles those
            if value is None:
                texts[raw], counted[raw] = b"null", 0      # a null stays null and is not counted
            else:
                texts[raw] = _json_text(_whole(rule, value)).encode("utf-8", "surrogatepass")
                counted[raw] = 1
        parts[2::4] = map(texts.__getitem__, values)
        parts[3::4] = repeat(b"", len(values))
        return parts, sum(map(counted.__getitem__, values))

    def _value_regexes(self, key: str) -> tuple[re.Pattern, re.Pattern]:
        """Bytes regexes for `"key":` and the value after it: (a string without escapes, any string
        or bare token). Both match the same key occurrences; the value group is None otherwise."""
        rxs = self._splice_rx.get(key)
        if rxs is None:
            if len(self._splice_rx) >= 256:
                self._splice_rx.clear()
            # the look-behind drops \\"key": (inside a string: a key's opening quote never follows a
            # backslash); group 1 is the key, white space and colon, kept as they are
            quoted = re.escape(f'"{key}"'.encode("utf-8", "surrogatepass"))
            head = b'(' + quoted + b'(?<!\\\\' + quoted + b')' + _WS.encode() + b':' + _WS.encode() + b')'
            rxs = self._splice_rx[key] = (
                re.compile(head + b'(?:"([^"\\\\]*)")?'),
                re.compile(head + b'(?:("[^"\\\\]*(?:\\\\.[^"\\\\]*)*")|([-+.0-9A-Za-z]+))?'))
        return rxs

    @staticmethod
    def _token_value(raw: Optional[bytes]):
        """The value of a string with escapes or of a bare token; _UNKNOWN for anything else."""
        if raw is None:
            return _UNKNOWN
        text = raw.decode("utf-8", "surrogatepass")
        try:
            value, end = _scan_value(text, 0)
        except StopIteration:
            return _UNKNOWN
        return value if end == len(text) else _UNKNOWN

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
            if type(node) is list:
                items = enumerate(node)
            else:                            # a dict, or a _Pairs with a key twice
                items = node.items()
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
                if tv is dict or tv is list or tv is _Pairs:
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
