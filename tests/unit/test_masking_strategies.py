"""Strategies: redact, partial (length and separators kept), hash (keyed, deterministic), email, null, fixed."""
import hashlib
import hmac

import pytest

from enforcer.masking.strategies import Email, Hash, Partial, build_strategy


def test_redact_and_fixed_and_null():
    assert build_strategy("redact").apply("secret") == "[REDACTED]"
    assert build_strategy("redact", replacement="***").apply("secret") == "***"
    assert build_strategy("fixed:n/a").apply("secret") == "n/a"
    assert build_strategy("fixed:").apply("secret") == ""
    assert build_strategy("null").apply("secret") is None


@pytest.mark.parametrize("value,expected", [
    ("4111-1111-1111-1111", "****-****-****-1111"),
    ("4111 1111 1111 1111", "**** **** **** 1111"),
    ("4111111111111111", "************1111"),
    ("123-45-6789", "***-**-6789"),
])
def test_partial_keeps_last_four_length_and_separators(value, expected):
    assert Partial(keep_last=4).apply(value) == expected
    assert len(Partial(keep_last=4).apply(value)) == len(value)


def test_partial_keep_first_and_last():
    assert Partial(keep_first=6, keep_last=4).apply("4111 1111 1111 1111") == "4111 11** **** 1111"
    assert Partial(keep_first=1, keep_last=0, mask_char="#").apply("Jane") == "J###"


def test_partial_never_reveals_a_whole_short_value():
    assert Partial(keep_last=4).apply("1234") == "**34"
    assert Partial(keep_last=4).apply("--") == "--"


def test_hash_is_keyed_deterministic_and_prefixed():
    key = b"k" * 32
    h = Hash(key)
    a = h.apply("123-45-6789")
    assert a == h.apply("123-45-6789")
    assert a.startswith("h:") and len(a) == 18
    assert a[2:] == hmac.new(key, b"123-45-6789", hashlib.sha256).hexdigest()[:16]
    assert Hash(b"x" * 32).apply("123-45-6789") != a
    assert h.apply("123-45-6788") != a


def test_hash_without_key_is_a_config_error():
    with pytest.raises(ValueError, match="hash_key_file"):
        build_strategy("hash")


def test_email_keeps_domain():
    assert Email().apply("jane.doe@example.com") == "****@example.com"
    assert Email().apply("not an email") == "[REDACTED]"


def test_unknown_strategy_names_the_choices():
    with pytest.raises(ValueError, match="redact, partial, hash, email, null, fixed"):
        build_strategy("scramble")


# ---------------------------------------------------------------------------------------
# mask characters that mean something to re.sub, to JSON or to a shell are plain characters
# ---------------------------------------------------------------------------------------
SPECIAL_MASK_CHARS = ["\\", "$", '"', "'", "&", "^", ".", "|", "(", "{", "?", "+", "%", "\n", "\x00", "é", "_"]


def _alnum_masked(value: str, mask_char: str, keep: set) -> str:
    """Every letter or digit (other than _) not at a kept position replaced by mask_char."""
    return "".join(mask_char if (c.isalnum() and i not in keep) else c for i, c in enumerate(value))


@pytest.mark.parametrize("mask_char", SPECIAL_MASK_CHARS, ids=repr)
def test_partial_takes_any_single_mask_character(mask_char):
    # keep_first 0 (the str.translate fast path), a non-ASCII head (the regex path), keep_first (the general one)
    for value, p, keep in (
            ("4111 1111 1111 1111", Partial(keep_last=4), {15, 16, 17, 18}),
            ("Zoë 4111-1111", Partial(keep_last=4), {9, 10, 11, 12}),
            ("4111 1111 1111 1111", Partial(keep_first=2, keep_last=2), {0, 1, 17, 18}),
            ("ab", Partial(keep_last=4), {1})):                     # the short-value rule
        p = Partial(p.keep_first, p.keep_last, mask_char)
        assert p.apply(value) == _alnum_masked(value, mask_char, keep)
    # the \g<0> and \1 spellings too: the mask character, never a back-reference
    assert Partial(keep_last=1, mask_char="\\").apply("g0") == "\\0"
    assert Partial(keep_last=1, mask_char="\\").apply("ab1") == "\\\\1"


@pytest.mark.parametrize("mask_char", SPECIAL_MASK_CHARS, ids=repr)
def test_partial_bytes_masker_agrees_with_apply_for_special_mask_characters(mask_char):
    for keep_first, keep_last in ((0, 4), (0, 1), (2, 2), (1, 0)):
        p = Partial(keep_first, keep_last, mask_char)
        for raw in (b"4111 1111 1111 1111", b"4111111111111111", b"123-45-6789", b"ab", b"",
                    "Zoë 4111".encode(), b"\\g<0>\\1 12345", b"\xff\xfe 9999"):
            want = p.apply(raw.decode("utf-8", "surrogateescape")).encode("utf-8", "surrogateescape")
            assert p.bytes_masker()(raw) == want, (raw, keep_first, keep_last)


def test_other_strategies_take_special_characters_as_they_are():
    # no mask character, but replacement texts with re and JSON specials must not be read either
    for text in ("\\", "\\g<0>", "\\1", "$1", '"', "a\\nb"):
        assert build_strategy("redact", replacement=text).apply("secret") == text
        assert build_strategy("fixed:" + text).apply("secret") == text
        assert Email(replacement=text).apply("jane@x.io") == text + "@x.io"
        assert Email(replacement=text).bytes_masker()(b"jane@x.io") == (text + "@x.io").encode()


@pytest.mark.parametrize("mask_char", ["\\", "$", '"', "%", "&"], ids=repr)
def test_special_mask_character_end_to_end_through_config_and_json(mask_char):
    import json

    from enforcer.masking import load_masking
    m = load_masking({"record_detectors": [], "rules": [
        {"name": "card", "json_key": "card", "strategy": "partial", "mask_char": mask_char},
        {"name": "pin", "json_key": "pin", "strategy": "partial", "mask_char": mask_char, "keep_first": 1,
         "keep_last": 1}]}).for_session("svc", {}, "api")
    body = json.dumps({"card": "4111 1111 1111 1111", "pin": "Zoë 1234",
                       "rows": [{"card": 4111111111111111}]}).encode()
    out, counts = m.mask_json_body(body, "application/json")
    m4 = mask_char * 4
    assert json.loads(out) == {"card": f"{m4} {m4} {m4} 1111", "pin": f"Z{mask_char * 2} {mask_char * 3}4",
                               "rows": [{"card": mask_char * 12 + "1111"}]}
    assert counts == {"card": 2, "pin": 1}


@pytest.mark.parametrize("bad", ["", "ab", "**", 5, None, ["*"]], ids=repr)
def test_mask_char_must_be_one_character(bad):
    from enforcer.masking import MaskingConfigError, load_masking
    # validated where the config is read (enforcer/masking/config.py), every problem listed
    with pytest.raises(MaskingConfigError, match="mask_char must be one character"):
        load_masking({"rules": [{"column": "ssn", "strategy": "partial", "mask_char": bad}]})
    # and a Partial built directly refuses it as well
    with pytest.raises(ValueError, match="mask_char must be one character"):
        Partial(keep_last=4, mask_char=bad)
