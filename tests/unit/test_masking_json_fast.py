"""The fast paths of HTTP JSON body masking give what a plain walk of the parsed document gives.

`reference_mask` below is the straightforward definition (recursive, rule by rule, every key
matched against every glob); the engine's byte pre-filter, key cache, splice into the original
text and in-place walk must agree with it on the parsed result and on the counts. Documents are
compared as read by `loads_pairs`, which keeps every pair of an object that repeats a key: every
value in the bytes must be masked, not only the one json.loads keeps.
"""
import itertools
import json
import random
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enforcer.masking import load_masking
from enforcer.masking.pgrow import mask_spans
from enforcer.masking.strategies import _ALNUM, Partial

KEY_RULES = {"hash_key": "0123456789abcdef0123", "rules": [
    {"name": "cards", "json_key": "*card*", "strategy": "partial"},
    {"name": "ssn", "json_key": "ssn", "strategy": "redact"},
    {"name": "token", "json_key": "token", "strategy": "hash"},
    {"name": "secret", "json_key": "secret", "strategy": "null"},
]}
WITH_PATHS = {"rules": KEY_RULES["rules"] + [
    {"name": "owner-email", "json_path": "$.customer.contacts[*].email", "strategy": "email"},
    {"name": "first", "json_path": "$.items[0]", "strategy": "fixed:X"},
], "hash_key": KEY_RULES["hash_key"]}
WITH_DETECTORS = {"rules": KEY_RULES["rules"] + [{"name": "scan", "scan_all_text": True,
                                                  "detectors": ["card", "ssn", "email"]}],
                  "hash_key": KEY_RULES["hash_key"]}


def session(config, identity="svc", target="api"):
    return load_masking(config).for_session(identity, {}, target)


def loads_pairs(body):
    """The document with each object as ("{}", [[key, value], ...]), duplicate keys and order kept."""
    return json.loads(body, object_pairs_hook=lambda pairs: ("{}", [list(p) for p in pairs]))


def dumps_pairs(node, ensure_ascii=True, indent=None, level=0):
    """json.dumps (default separators) for a `loads_pairs` tree, repeated keys written each time."""
    if isinstance(node, (tuple, list)):
        is_obj = isinstance(node, tuple)
        items = node[1] if is_obj else node
        brackets = "{}" if is_obj else "[]"
        if not items:
            return brackets
        pad = "" if indent is None else "\n" + " " * (indent * (level + 1))
        end = "" if indent is None else "\n" + " " * (indent * level)
        texts = [(json.dumps(i[0], ensure_ascii=ensure_ascii) + ": " if is_obj else "")
                 + dumps_pairs(i[1] if is_obj else i, ensure_ascii, indent, level + 1) for i in items]
        return brackets[0] + pad + ("," + pad if indent is not None else ", ").join(texts) + end + brackets[1]
    return json.dumps(node, ensure_ascii=ensure_ascii)


def reference_mask(masker, doc):
    """The masking a JSON document (a `loads_pairs` tree) must get, written the simple way."""
    jm = masker.ruleset.json
    counts = {}

    def bump(name, n=1):
        counts[name] = counts.get(name, 0) + n

    def whole(rule, v):
        if isinstance(v, str):
            return rule.strategy.apply(v)
        if isinstance(v, bool):
            return rule.strategy.apply(str(v).lower())
        if isinstance(v, (int, float)):
            return rule.strategy.apply(str(v))
        return rule.strategy.apply("") if rule.strategy.is_constant else None    # object or array

    def field_rule(key, path):
        if isinstance(key, str):
            for r in jm.key_rules:
                if r.json_key.match(key):
                    return r
        for r in jm.path_rules:
            if r.json_path.matches(path):
                return r
        return None

    def walk(node, path):
        if isinstance(node, (tuple, list)):
            is_obj = isinstance(node, tuple)
            out = []
            for k, v in (node[1] if is_obj else enumerate(node)):
                rule = field_rule(k if is_obj else None, path + (k,))
                if rule is not None and v is not None:
                    bump(rule.name)
                    new = whole(rule, v)
                else:
                    new = walk(v, path + (k,))
                out.append([k, new] if is_obj else new)
            return ("{}", out) if is_obj else out
        if jm.scanner is None or node is None or isinstance(node, bool):
            return node
        text = node if isinstance(node, str) else str(node)
        found = jm.scanner.find(text)
        if not found:
            return node
        for _s, _e, d in found:
            bump(jm.rule_names[d.name])
        return mask_spans(text, found, lambda d: jm.strategies[d.name])

    return walk(doc, ()), counts


def check(masker, body: bytes):
    out, counts = masker.mask_json_body(body, "application/json")
    want, want_counts = reference_mask(masker, loads_pairs(body))
    assert counts == want_counts
    if not want_counts:
        assert out is body
    assert loads_pairs(out) == want
    return out, counts


# ---------------------------------------------------------------------------------------
# nothing to mask: the very same bytes
# ---------------------------------------------------------------------------------------
def test_body_without_masked_keys_comes_back_as_the_same_object():
    m = session(KEY_RULES)
    body = json.dumps([{"id": i, "name": "n", "cardinal": None, "tags": ["card", "ssn"]} for i in range(50)]).encode()
    assert m.mask_json_body(body, "application/json") == (body, {})
    assert m.mask_json_body(body, "application/json")[0] is body
    # "card" and "ssn" occur, but only as values or with null: still nothing to do
    assert m.mask_json_body(b'{"card": null, "x": "ssn"}', "application/json")[0] == b'{"card": null, "x": "ssn"}'


def test_no_parse_needed_when_neither_rules_nor_detectors_could_apply():
    m = session({"record_detectors": [], "rules": [{"json_key": "card"}]})
    # not even valid JSON: with no detector in use the text path would not change it either
    broken = b'{"note": "123-45-6789", '
    assert m.mask_json_body(broken, "application/json")[0] is broken
    # with the default record detectors a broken body is still scanned as text
    d = session({"rules": [{"json_key": "card"}]})
    assert d.mask_json_body(broken, "application/json")[0] == b'{"note": "[REDACTED]", '


def test_key_spelled_with_escapes_or_case_folding_is_still_found():
    m = session({"record_detectors": [], "rules": [{"name": "card", "json_key": "card"},
                                                   {"name": "k", "json_key": "*k*"}]})
    escaped = b'{"c\\u0061rd": "4111"}'
    assert json.loads(m.mask_json_body(escaped, "application/json")[0]) == {"card": "[REDACTED]"}
    upper = b'{"CARD": "4111"}'
    assert json.loads(m.mask_json_body(upper, "application/json")[0]) == {"CARD": "[REDACTED]"}
    kelvin = '{"\u212aey": "v"}'.encode()      # KELVIN SIGN matches k under IGNORECASE
    assert json.loads(m.mask_json_body(kelvin, "application/json")[0]) == {"\u212aey": "[REDACTED]"}


def test_utf16_body_is_not_judged_by_its_bytes():
    m = session({"record_detectors": [], "rules": [{"json_key": "card"}]})
    body = json.dumps({"card": "4111"}).encode("utf-16")
    out, counts = m.mask_json_body(body, "application/json")
    assert json.loads(out) == {"card": "[REDACTED]"} and counts == {"json_key:card": 1}


# ---------------------------------------------------------------------------------------
# the key cache and exemptions
# ---------------------------------------------------------------------------------------
def test_key_cache_honours_identity_and_target_exemptions():
    engine = load_masking({"exempt": ["auditor-*"], "rules": [
        {"name": "cards", "json_key": "*card*", "exempt": ["fraud-analytics"], "targets": ["payments"]},
        {"name": "all-cards", "json_key": "card_number", "strategy": "fixed:X"}]})
    body = b'{"card_number": "4111 1111 1111 1111", "gift_card": "6011"}'
    svc = engine.for_session("svc", {}, "payments")
    for _ in range(2):                       # the second time from the cache
        assert json.loads(svc.mask_json_body(body, "application/json")[0]) == \
            {"card_number": "[REDACTED]", "gift_card": "[REDACTED]"}
    fraud = engine.for_session("fraud-analytics", {}, "payments")
    assert json.loads(fraud.mask_json_body(body, "application/json")[0]) == \
        {"card_number": "X", "gift_card": "6011"}
    other = engine.for_session("svc", {}, "crm")
    assert json.loads(other.mask_json_body(body, "application/json")[0]) == \
        {"card_number": "X", "gift_card": "6011"}
    assert engine.for_session("auditor-1", {}, "payments") is None
    # and the first session's cache still holds its own answer
    assert json.loads(svc.mask_json_body(body, "application/json")[0])["gift_card"] == "[REDACTED]"


def test_key_cache_is_bounded():
    from enforcer.masking import jsonbody
    m = session(KEY_RULES)
    body = json.dumps({f"k{i}": i for i in range(jsonbody.MAX_CACHED_KEYS + 10)} | {"ssn": "x"}).encode()
    out, counts = m.mask_json_body(body, "application/json")
    assert counts == {"ssn": 1} and len(m.ruleset.json._key_cache) <= jsonbody.MAX_CACHED_KEYS


# ---------------------------------------------------------------------------------------
# structure: nesting, nulls, containers under masked keys, duplicates, formatting
# ---------------------------------------------------------------------------------------
NESTED = {
    "customer": {"name": "Jane", "card_number": "4111 1111 1111 1111", "ssn": "123-45-6789",
                 "contacts": [{"email": "jane@x.io", "token": "abc"}, {"email": "j@y.io", "card": None}],
                 "cards": [{"card": "5500 0000 0000 0004"}, {"card": 4111111111111111}],
                 "secret": {"card": "nested under a masked key"}},
    "items": [[{"ssn": "078-05-1120"}], [[{"x": {"ssn": True}}]], 1.5, "plain"],
    "token": ["a", "list", "masked", "whole"],
    "ok": True, "n": None,
}


@pytest.mark.parametrize("config", [KEY_RULES, WITH_PATHS, WITH_DETECTORS], ids=["keys", "paths", "detectors"])
def test_nested_objects_and_arrays(config):
    m = session(config)
    check(m, json.dumps(NESTED).encode())
    check(m, json.dumps(NESTED, indent=2).encode())
    check(m, json.dumps([NESTED, NESTED]).encode())
    check(m, b'"just a string 123-45-6789"')
    check(m, b"[[[]], {}, []]")


def test_splice_keeps_every_other_byte_as_it_was():
    m = session(KEY_RULES)
    body = b'{ "id" : 1.50, "ssn"\n:\t"123-45-6789" , "note": "caf\\u00e9",\n "list": [ 1e3 ] }'
    out, counts = m.mask_json_body(body, "application/json")
    # \u escapes in the body: the general walk re-serialises; values agree either way
    assert json.loads(out) == {"id": 1.5, "ssn": "[REDACTED]", "note": "café", "list": [1000.0]}
    body = b'{ "id" : 1.50, "ssn"\n:\t"123-45-6789" , "note": "caf\xc3\xa9",\n "list": [ 1e3 ], "card": 4111 }'
    out, counts = m.mask_json_body(body, "application/json")
    assert out == b'{ "id" : 1.50, "ssn"\n:\t"[REDACTED]" , "note": "caf\xc3\xa9",\n "list": [ 1e3 ], "card": "**11" }'
    assert counts == {"ssn": 1, "cards": 1}


def test_key_names_inside_strings_are_not_keys():
    m = session(KEY_RULES)
    body = json.dumps({"note": 'he wrote "ssn": "123-45-6789" and \\"ssn\\": 1', "ssn\\": "x",
                       'x"ssn': "y", "ssn": "z"}).encode()
    out, counts = check(m, body)
    assert json.loads(out)["note"] == 'he wrote "ssn": "123-45-6789" and \\"ssn\\": 1'
    assert counts == {"ssn": 1}


def test_duplicate_keys_mask_what_the_parser_keeps():
    m = session(KEY_RULES)
    out, counts = m.mask_json_body(b'{"ssn": "111-11-1111", "ssn": "222-22-2222"}', "application/json")
    assert json.loads(out) == {"ssn": "[REDACTED]"} and b"111-11" not in out and b"222-22" not in out
    # a duplicate key holding an object with a masked key: that value is masked too
    out, counts = m.mask_json_body(b'{"a": {"ssn": "111-11-1111"}, "a": {"ssn": "222-22-2222"}}', "application/json")
    assert b"111-11" not in out and b"222-22" not in out


def test_strategy_null_and_values_of_every_type():
    m = session(KEY_RULES)
    body = b'{"secret": "s", "ssn": 123456789, "card": true, "token": 1.25, "x": {"secret": null}}'
    out, counts = check(m, body)
    assert json.loads(out)["secret"] is None and json.loads(out)["card"] == "**ue"


# ---------------------------------------------------------------------------------------
# unicode
# ---------------------------------------------------------------------------------------
def test_unicode_keys_and_values():
    m = session({"rules": [{"name": "nr", "json_key": "kartennummer*", "strategy": "partial"},
                           {"name": "name", "json_key": "имя"}, {"name": "emoji", "json_key": "🔑"}]})
    doc = {"Kartennummer": "4111 1111 1111 1111", "имя": "Анна", "🔑": "😀 secret", "stadt": "München",
           "nested": [{"имя": "Ёж"}]}
    for body in (json.dumps(doc, ensure_ascii=False).encode(), json.dumps(doc).encode()):
        out, counts = check(m, body)
        assert counts == {"nr": 1, "name": 2, "emoji": 1}
        text = out.decode("utf-8")
        assert "Анна" not in text and "Ёж" not in text and "😀" not in text and "München" in json.loads(out)["stadt"]
        assert json.loads(out)["Kartennummer"] == "**** **** **** 1111"
    # raw UTF-8 in, raw UTF-8 out, the rest untouched
    out, _ = m.mask_json_body(json.dumps(doc, ensure_ascii=False).encode(), "application/json")
    assert "München".encode() in out


def test_lone_surrogate_does_not_crash():
    m = session(WITH_DETECTORS)
    body = b'{"ssn": "1", "bad": "\\ud800", "note": "123-45-6789"}'
    out, counts = m.mask_json_body(body, "application/json")
    assert json.loads(out) == {"ssn": "[REDACTED]", "bad": "\ud800", "note": "[REDACTED]"}


# ---------------------------------------------------------------------------------------
# property: fast paths == the reference, on generated documents
# ---------------------------------------------------------------------------------------
keys = st.sampled_from(["id", "name", "card", "card_number", "CARD", "ssn", "token", "secret", "email",
                        "items", "customer", "contacts", "é", "x\"ssn", "ssn\\", " ssn", "0"])
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**18, 10**18),
                    st.floats(allow_nan=False, allow_infinity=False),
                    st.sampled_from(["4111 1111 1111 1111", "123-45-6789", "a@b.io", "plain", "", "ü\"\\/\n"]),
                    st.text(max_size=8))
documents = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                          st.dictionaries(keys, inner, max_size=5)), max_leaves=25)


@settings(max_examples=300, deadline=None)
@given(documents, st.sampled_from([KEY_RULES, WITH_PATHS, WITH_DETECTORS]), st.booleans(), st.booleans())
def test_generated_documents_match_the_reference(doc, config, ascii_only, indent):
    m = session(config)
    body = json.dumps(doc, ensure_ascii=ascii_only, indent=2 if indent else None).encode("utf-8", "surrogatepass")
    check(m, body)


def test_partial_ascii_path_matches_the_general_one():
    rnd = random.Random(3)
    alphabet = string.ascii_letters + string.digits + " -_./*#X"
    for keep_last in (1, 2, 4, 6):
        for mask_char in "*X_•":
            p = Partial(0, keep_last, mask_char)
            for _ in range(3000):
                v = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 22)))
                # the regex substitution the ASCII path replaces
                i, kept = len(v), 0
                while i and kept < keep_last:
                    i -= 1
                    kept += v[i].isalnum()
                head, n = _ALNUM.subn(mask_char, v[:i])
                if kept == keep_last and n >= kept:
                    assert p.apply(v) == head + v[i:], (v, keep_last, mask_char)


def test_folding_letters_are_all_the_non_ascii_letters_that_match_ascii_ones():
    import re

    from enforcer.masking.jsonbody import _FOLDING_LETTERS, _has_folding_letter
    everything = "".join(chr(c) for c in range(0x80, 0x110000) if not 0xD800 <= c < 0xE000)
    folding = set(re.findall(r"[\x00-\x7f]", everything, re.IGNORECASE))
    assert {f.encode() for f in folding} == set(_FOLDING_LETTERS)
    assert all(_has_folding_letter(("x" + f + "é").encode()) for f in folding)
    assert not _has_folding_letter("Zoë Ä İx".replace("İ", "I").encode())


# ---------------------------------------------------------------------------------------
# the byte-level splice: plain strings in one pass, every other value through the general one
# ---------------------------------------------------------------------------------------
CARD = {"record_detectors": [], "rules": [{"name": "card", "json_key": "card", "strategy": "partial"}]}


def test_plain_strings_are_spliced_whatever_the_white_space():
    m = session(CARD)
    body = (b'{"card":"4111 1111 1111 1111","a":{"card" : "5500 0000 0000 0004"},'
            b'"b":[{"card"\n:\t"1234-5678"},{"card":\r\n "x"},{"card": ""}]}')
    out, counts = check(m, body)
    assert out == (b'{"card":"**** **** **** 1111","a":{"card" : "**** **** **** 0004"},'
                   b'"b":[{"card"\n:\t"****-5678"},{"card":\r\n "*"},{"card": ""}]}')
    assert counts == {"card": 5}


def test_key_names_as_values_or_inside_strings_are_left_alone():
    m = session(CARD)
    body = (b'["card", {"x": "card"}, {"card": "card"}, {"note": "\\"card\\": \\"4111 1111\\""},'
            b' {"x\\"card": "1111 2222"}, {"y": "a\\\\", "card": "9999 8888"}]')
    out, counts = check(m, body)
    assert out == (b'["card", {"x": "card"}, {"card": "**rd"}, {"note": "\\"card\\": \\"4111 1111\\""},'
                   b' {"x\\"card": "1111 2222"}, {"y": "a\\\\", "card": "**** 8888"}]')
    assert counts == {"card": 2}


def test_numbers_booleans_and_nulls_under_the_key_are_spliced_in_place():
    m = session(CARD)
    body = b'{"card": 4111111111111111, "x": {"card": null}, "y": [{"card": true}, {"card": "41\\"11 2222"}]}'
    out, counts = check(m, body)
    assert out == (b'{"card": "************1111", "x": {"card": null}, '
                   b'"y": [{"card": "**ue"}, {"card": "**\\"** 2222"}]}')
    assert counts == {"card": 3}


def test_objects_and_arrays_under_the_key_fall_back_to_the_walk():
    m = session(CARD)
    for body in (b'{"card": {"number": "4111 1111 1111 1111", "card": "5500 0000 0000 0004"}, "id": 1}',
                 b'[{"card": "4111 1111 1111 1111"}, {"card": ["5500 0000 0000 0004"]}]'):
        out, counts = check(m, body)
        assert b"4111 1111" not in out and b"5500 0000" not in out


def test_duplicate_keys_do_not_leave_a_raw_value_behind():
    m = session(CARD)
    for body in (b'{"card": 4111111111111111, "card": "5500 0000 0000 0004"}',
                 b'{"card": "4111 1111 1111 1111", "card": "5500 0000 0000 0004"}',
                 b'{"card": "4111 1111 1111 1111", "card": "5500 0000 0000 0004", "card": null, "card": "1"}',
                 b'[{"card": "1"}, {"card": "4111 1111 1111 1111", "x": 1, "card": 5500000000000004}]'):
        out, counts = check(m, body)      # counts: every non-null value under the key
        assert b"4111" not in out and b"5500" not in out, out


# ---------------------------------------------------------------------------------------
# duplicate keys: every value in the bytes is masked, whichever one json.loads keeps
# ---------------------------------------------------------------------------------------
# one secret per kind of value; none may leave in any form that still shows it
DUP_VALUES = {
    "string": (b'"4111 1111 1111 1111"', b"4111 1111"),
    "null": (b"null", None),
    "number": (b"5500000000000004", b"55000000"),
    "object": (b'{"pan": "6011 0000 0000 0004", "card": "3782 822463 10005"}', b"6011 0000"),
    "array": (b'["3530 1113 3330 0000"]', b"3530 1113"),
    "escaped": (b'"6304\\u0020000000000000"', b"6304"),
}
DUP_CONFIGS = {
    "splice": CARD,                                   # key rules only: the bytes are spliced
    "redact": {"record_detectors": [], "rules": [{"name": "card", "json_key": "card"}]},
    "walk": {"rules": CARD["rules"] + [{"name": "scan", "scan_all_text": True, "detectors": ["ssn"]}]},
}


def assert_no_secret(out: bytes, secrets):
    for secret in secrets:
        if secret is not None:
            assert secret not in out, (secret, out)
    assert b"3782 8224" not in out


def test_the_reported_leak_duplicate_then_null():
    m = session(CARD)
    body = b'{"card": "4111 1111 1111 1111", "card": null}'
    out, counts = m.mask_json_body(body, "application/json")
    # key rules only: still spliced into the original bytes, both pairs kept
    assert out == b'{"card": "**** **** **** 1111", "card": null}' and counts == {"card": 1}
    for config in DUP_CONFIGS.values():
        out, counts = check(session(config), body)
        assert b"4111 1111 1111" not in out and counts == {"card": 1}


@pytest.mark.parametrize("config", DUP_CONFIGS, ids=list(DUP_CONFIGS))
@pytest.mark.parametrize("kinds", list(itertools.permutations(["string", "null", "number", "object"])) +
                         list(itertools.permutations(["string", "null", "array", "escaped"], 3)), ids=repr)
def test_duplicate_key_values_of_every_kind_in_every_order(config, kinds):
    m = session(DUP_CONFIGS[config])
    pairs = b", ".join(b'"card": ' + DUP_VALUES[k][0] for k in kinds)
    secrets = [DUP_VALUES[k][1] for k in kinds]
    non_null = sum(k != "null" for k in kinds)
    for body in (b"{" + pairs + b"}",                                          # top level
                 b'{"id": 1, "rows": [{"x": 1}, {' + pairs + b', "y": 2}]}',     # nested in an array
                 b'[{"a": {' + pairs + b'}}, {"card": "5105 1051 0510 5100"}]'):  # beside a plain one
        out, counts = check(m, body)
        assert_no_secret(out, secrets + [b"5105 1051"])
        assert counts["card"] == non_null + (b"5105" in body)
        json.loads(out)       # still JSON


@pytest.mark.parametrize("config", DUP_CONFIGS, ids=list(DUP_CONFIGS))
def test_nested_duplicates(config):
    m = session(DUP_CONFIGS[config])
    bodies = [
        # a repeated key that is not masked, holding masked keys in the value json.loads drops
        b'{"wrap": {"card": "4111 1111 1111 1111"}, "wrap": null}',
        b'{"wrap": {"card": "4111 1111 1111 1111", "card": null}, "wrap": {"card": null, "card": 5500000000000004}}',
        # duplicates at several depths at once, and inside values of a repeated masked key
        b'{"a": [{"b": {"card": "4111 1111 1111 1111", "card": null}}], '
        b'"a": {"b": {"card": null, "card": "6011 0000 0000 0004"}, "b": 1}, "card": {"card": 5500000000000004}}',
        b'[[{"card": null, "x": {"card": "4111 1111 1111 1111"}, "x": {}, "card": null}]]',
    ]
    for body in bodies:
        out, counts = check(m, body)
        assert_no_secret(out, [b"4111 1111", b"55000000", b"6011 0000"])


def test_duplicates_under_path_rules_and_detectors():
    paths = session(WITH_PATHS)
    body = (b'{"customer": {"contacts": [{"email": "jane@x.io", "email": null}]}, '
            b'"customer": {"contacts": []}, "items": ["first", 2], "items": null}')
    out, counts = check(paths, body)
    assert b"jane@" not in out and b"first" not in out and counts == {"owner-email": 1, "first": 1}
    scan = session(WITH_DETECTORS)
    out, counts = check(scan, b'{"note": "ssn 123-45-6789", "note": "ok", "x": [{"m": "jane@x.io", "m": 1}]}')
    assert b"123-45" not in out and b"jane@" not in out and counts == {"scan": 2}
    # a key spelled with an escape next to its plain spelling: the general walk, every pair kept
    out, counts = check(session(CARD), b'{"c\\u0061rd": "4111 1111 1111 1111", "card": null}')
    assert b"4111 1111" not in out and counts == {"card": 1}


def test_repeated_keys_nothing_to_mask_leaves_the_body_alone():
    for config in (CARD, WITH_DETECTORS, WITH_PATHS):
        m = session(config)
        for body in (b'{"card": null, "card": null}', b'{"id": 1, "id": 2, "name": "x", "name": "y"}'):
            out, counts = m.mask_json_body(body, "application/json")
            assert out is body and counts == {}


def test_deeply_nested_duplicates_are_written_back_without_recursion():
    m = session(DUP_CONFIGS["walk"])
    depth = 900                 # near the limit of json.loads itself (the recursion limit)
    body = b'{"a": ' * depth + b'{"card": "4111 1111 1111 1111", "card": null}' + b"}" * depth
    out, counts = m.mask_json_body(body, "application/json")
    assert out == b'{"a":' * depth + b'{"card":"**** **** **** 1111","card":null}' + b"}" * depth
    assert counts == {"card": 1}


@settings(max_examples=200, deadline=None)
@given(documents, st.booleans())
def test_writing_back_without_duplicates_is_json_dumps(doc, ensure_ascii):
    from enforcer.masking.jsonbody import _dumps, _dumps_keeping_duplicates
    assert _dumps_keeping_duplicates(doc, ensure_ascii) == _dumps(doc, ensure_ascii)


# generated documents whose objects may repeat keys (objects as loads_pairs trees)
pair_documents = st.recursive(
    scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(st.tuples(st.sampled_from(["card", "ssn", "secret", "token", "id", "email", "items", "x\"ssn"]),
                           inner).map(list), max_size=5).map(lambda pairs: ("{}", pairs))),
    max_leaves=25)


@settings(max_examples=300, deadline=None)
@given(pair_documents, st.sampled_from([KEY_RULES, WITH_PATHS, WITH_DETECTORS]), st.booleans(), st.booleans())
def test_generated_documents_with_repeated_keys_match_the_reference(tree, config, ascii_only, indent):
    m = session(config)
    body = dumps_pairs(tree, ascii_only, 2 if indent else None).encode("utf-8", "surrogatepass")
    assert loads_pairs(body) == tree
    check(m, body)


def test_escaped_keys_are_found_among_plain_ones():
    m = session(CARD)
    body = b'[{"c\\u0061rd": "4111 1111 1111 1111"}, {"card": "5500 0000 0000 0004"}, {"CARD": "6011 0000"}]'
    out, counts = check(m, body)
    assert b"4111 1111" not in out and b"5500 0000" not in out and counts == {"card": 3}


@pytest.mark.parametrize("rule", [
    {"strategy": "redact"}, {"strategy": "null"}, {"strategy": "hash"}, {"strategy": "email"},
    {"strategy": 'fixed:a "quoted" \\ value'}, {"strategy": "partial", "mask_char": '"'},
    {"strategy": "partial", "mask_char": "•", "keep_last": 2},
    {"strategy": "partial", "keep_first": 2, "keep_last": 2}])
def test_every_strategy_on_plain_non_ascii_repeated_and_distinct_strings(rule):
    m = session({"record_detectors": [], "hash_key": "0123456789abcdef0123",
                 "rules": [dict(rule, name="card", json_key="card")]})
    ascii_values = ["4111 1111 1111 1111", "jane@x.io", "", "a", "41/11-22", "ab cd"]
    distinct = [{"card": f"{i:04d} 5555 {i * 7919 % 10000:04d}"} for i in range(30)]
    for values in (ascii_values, ascii_values + ["Kärtchen 1234", "😀 9876"]):
        repeated = [{"card": values[i % len(values)], "i": i} for i in range(40)]
        for doc in (repeated, distinct, repeated + distinct):
            for ensure_ascii in (True, False):
                body = json.dumps(doc, ensure_ascii=ensure_ascii).encode()
                out, counts = check(m, body)
                assert counts == {"card": len(doc)}


def test_huge_document_is_spliced_byte_for_byte():
    m = session(KEY_RULES)
    rnd = random.Random(7)
    doc = []
    for i in range(12000):
        card = rnd.choice(["4111 1111 1111 1111", f"5500 {i:04d} 0000 {rnd.randrange(10000):04d}", None, 4111111111111111])
        doc.append({"id": i, "card_number": card, "name": "customer", "ssn": "123-45-6789" if i % 3 else None,
                    "address": {"city": "Springfield", "zip": str(10000 + i)}, "tags": ["card", "ssn"]})
    body = json.dumps(doc).encode()
    assert len(body) > 1_000_000
    out, counts = check(m, body)
    # only the masked values changed: the reference serialised the same way gives the same bytes
    want, _ = reference_mask(m, loads_pairs(body))
    assert out == dumps_pairs(want).encode()
    assert counts == {"cards": sum(d["card_number"] is not None for d in doc), "ssn": sum(bool(i % 3) for i in range(12000))}


@pytest.mark.parametrize("body", [
    b'{"card": "4111 1111 1111 1111", ',                 # truncated
    b'{"card": "4111 1111 1111 1111",}',                 # trailing comma
    b'{"card": "4111 1111 1111 1111"} {"card": "1"}',    # two documents
    b'{"card": "4111\x01 1111 1111 1111"}',              # a raw control character
    b'{"card": "4111 1111 1111 1111\xff"}',              # not UTF-8
    b"{'card': '4111 1111 1111 1111'}",                  # not JSON quoting
    b'{"card" "4111 1111 1111 1111"}',                   # no colon
])
def test_invalid_json_is_left_to_the_text_path(body):
    m = session(CARD)
    assert m.ruleset.json.mask_body(body) is None
    assert m.mask_json_body(body, "application/json")[0] is body    # no text detectors in use
    d = session({"rules": CARD["rules"]})                              # the default record detectors
    assert d.mask_json_body(body, "application/json") == d.mask_json_body(body, "text/plain")
