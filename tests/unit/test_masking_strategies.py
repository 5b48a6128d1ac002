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
