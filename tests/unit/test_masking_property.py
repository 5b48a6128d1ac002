"""Property: valid card numbers and SSNs anywhere in text are masked, and nothing else changes."""
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from enforcer.masking import load_masking
from enforcer.masking.detectors import luhn_valid
from enforcer.masking.strategies import Partial
from enforcer.postgres.protocol import FieldDescription as F
from enforcer.postgres.protocol import build_data_row_body, parse_data_row

LUHN_DOUBLE = (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)


@st.composite
def card_numbers(draw):
    length = draw(st.integers(13, 19))
    body = draw(st.sampled_from("23456")) + "".join(
        draw(st.lists(st.sampled_from("0123456789"), min_size=length - 2, max_size=length - 2)))
    # the check digit that makes the Luhn sum a multiple of 10
    total = sum(LUHN_DOUBLE[int(c)] for c in body[-1::-2]) + sum(int(c) for c in body[-2::-2])
    digits = body + str((10 - total % 10) % 10)
    assert luhn_valid(digits)
    sep = draw(st.sampled_from(["", " ", "-"]))
    return sep.join(digits[i:i + 4] for i in range(0, len(digits), 4))


@st.composite
def ssns(draw):
    area = draw(st.integers(1, 899).filter(lambda a: a != 666))
    group = draw(st.integers(1, 99))
    serial = draw(st.integers(1, 9999))
    sep = draw(st.sampled_from(["-", " "]))
    return f"{area:03d}{sep}{group:02d}{sep}{serial:04d}"


# arbitrary text without ASCII digits; a secret is kept apart from the next by at least one character
# that is not a digit, space or dash (otherwise "SSN-then-card" is one longer number, ambiguous to anyone)
filler = st.text(st.characters(blacklist_characters="0123456789", blacklist_categories=("Cs",)), max_size=12)


def separated(text: str) -> str:
    return text if text.strip(" -") else text + "x"


@st.composite
def cells(draw):
    """(text, [secrets], [pieces]) where pieces alternate filler and secrets."""
    n = draw(st.integers(0, 3))
    pieces = [draw(filler)]
    secrets = []
    for _ in range(n):
        secret = draw(st.one_of(card_numbers(), ssns()))
        secrets.append(secret)
        pieces.append(secret)
        pieces.append(separated(draw(filler)) if _ < n - 1 else draw(filler))
    return "".join(pieces), secrets, pieces


def expected(pieces, replace):
    return "".join(replace(p) if i % 2 else p for i, p in enumerate(pieces))


def masker(strategy):
    rules = [{"scan_all_text": True, "detectors": ["card", "ssn"], "strategy": strategy}]
    return load_masking({"rules": rules}).for_session("svc", {}, "db")


FIELDS = [F("id", 1, 1, 23, 4, -1, 1), F("a", 1, 2, 25, -1, -1, 1), F("b", 0, 0, 1043, -1, -1, 1)]


@settings(max_examples=300, deadline=None)
@given(st.integers(-2**31, 2**31 - 1), cells(), cells())
def test_data_rows_lose_every_card_and_ssn_and_keep_everything_else(ident, a, b):
    plan = masker("redact").plan_for(FIELDS)
    src = build_data_row_body([struct.pack("!i", ident), a[0].encode(), b[0].encode()])
    out = parse_data_row(plan.mask_data_row(src))
    assert out[0] == struct.pack("!i", ident)
    for cell, (text, secrets, pieces) in zip(out[1:], (a, b)):
        got = cell.decode()
        assert got == expected(pieces, lambda s: "[REDACTED]")
        for s in secrets:
            assert s not in got


@settings(max_examples=200, deadline=None)
@given(cells())
def test_partial_keeps_length_separators_and_last_four_only(cell):
    text, secrets, pieces = cell
    masked, n = masker("partial").mask_text(text)
    assert n == len(secrets)
    assert masked == expected(pieces, Partial(keep_last=4).apply)
    for s in secrets:
        assert s not in masked
