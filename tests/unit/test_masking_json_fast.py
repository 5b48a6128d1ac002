"""The fast paths of HTTP JSON body masking give what a plain walk of the parsed document gives.

`reference_mask` below is the straightforward definition (recursive, rule by rule, every key
matched against every glob); the engine's byte pre-filter, key cache, splice into the original
text and in-place walk must agree with it on the parsed result and on the counts.
"""
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


def reference_mask(masker, doc):
    """The masking a JSON document must get, written the simple way."""
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
        return rule.strategy.apply("") if rule.strategy.is_constant else None

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
        if isinstance(node, (dict, list)):
            pairs = node.items() if isinstance(node, dict) else enumerate(node)
            out = {} if isinstance(node, dict) else []
            for k, v in pairs:
                rule = field_rule(k if isinstance(node, dict) else None, path + (k,))
                if rule is not None and v is not None:
                    bump(rule.name)
                    new = whole(rule, v)
                else:
                    new = walk(v, path + (k,))
                if isinstance(out, dict):
                    out[k] = new
                else:
                    out.append(new)
            return out
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
    want, want_counts = reference_mask(masker, json.loads(body))
    assert counts == want_counts
    if not want_counts:
        assert out is body
    assert json.loads(out) == want
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
