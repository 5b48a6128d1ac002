"""The fast row path (RowPlan.mask_rows / mask_data_row, strategies' bytes maskers, per-column caches)
against a straightforward reference: parse every column, decode, apply the strategy, re-encode."""
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enforcer.masking import load_masking
from enforcer.masking import pgrow
from enforcer.masking.strategies import Email, Hash, Partial, Redact
from enforcer.postgres import protocol as P
from enforcer.postgres.protocol import FieldDescription as F
from enforcer.postgres.protocol import build_data_row_body, parse_data_row
from tests.unit.test_pg_session import AUTH_DONE, STARTUP, Driver

TEXT, VARCHAR, INT4, BYTEA = 25, 1043, 23, 17
KEY = "k" * 32
CONFIG = {"hash_key": KEY, "rules": [
    {"name": "p", "column": "card", "strategy": "partial"},
    {"name": "e", "column": "email", "strategy": "email"},
    {"name": "h", "column": "token", "strategy": "hash"},
    {"name": "r", "column": "secret", "strategy": "redact"},
    {"name": "b", "column": "blob", "strategy": "partial"},          # bytea in binary: NULL
    {"name": "f", "column": "pin", "strategy": "partial", "keep_first": 1, "keep_last": 1, "mask_char": "#"},
]}
FIELDS = [F("id", 1, 1, INT4, 4, -1, 1), F("card", 1, 2, TEXT, -1, -1, 0), F("note", 1, 3, TEXT, -1, -1, 0),
          F("email", 1, 4, VARCHAR, -1, -1, 1), F("token", 1, 5, TEXT, -1, -1, 0),
          F("secret", 1, 6, TEXT, -1, -1, 0), F("blob", 1, 7, BYTEA, -1, -1, 1),
          F("pin", 1, 8, TEXT, -1, -1, 0), F("tail", 1, 9, TEXT, -1, -1, 0)]
STRATEGIES = {"card": Partial(), "email": Email(), "token": Hash(KEY.encode(), "h:"), "secret": Redact(),
              "pin": Partial(1, 1, "#")}


def reference(values: list) -> list:
    """What the masked row must hold, column by column, the slow and obvious way."""
    out = []
    for f, v in zip(FIELDS, values):
        if v is None or f.name not in STRATEGIES and f.name != "blob":
            out.append(v)
        elif f.name == "blob":
            out.append(None)
        else:
            new = STRATEGIES[f.name].apply(v.decode("utf-8", "surrogateescape"))
            out.append(None if new is None else new.encode("utf-8", "surrogateescape"))
    return out


def plan():
    return load_masking(CONFIG).for_session("svc", {}, "db").plan_for(FIELDS)


text_values = st.one_of(
    st.none(),
    st.text(max_size=24),                                               # any Unicode, incl. non-ASCII
    st.text("0123456789abcdefXYZ -@.", max_size=40),                    # ASCII: the bytes fast paths
    st.binary(max_size=24),                                             # invalid UTF-8 too
    st.sampled_from(["4111 1111 1111 1111", "123-45-6789", "jane@example.com", "@x", "a@", "Zoë@exämple.org",
                     "ab", "abcd1234", "ééééé1234", "12*4-5678", ""]),
)


@st.composite
def data_rows(draw):
    values = [draw(st.one_of(st.none(), st.integers(-2**31, 2**31 - 1).map(lambda i: struct.pack("!i", i))))]
    for f in FIELDS[1:]:
        v = draw(text_values)
        values.append(v.encode("utf-8") if isinstance(v, str) else v)
    return values


@settings(max_examples=300, deadline=None)
@given(st.lists(data_rows(), min_size=1, max_size=12), st.randoms(use_true_random=False))
def test_fast_path_equals_the_reference_for_runs_of_rows(rows, rnd):
    p = plan()
    expected = [reference(r) for r in rows]
    # one row at a time
    for r, want in zip(rows, expected):
        assert parse_data_row(p.mask_data_row(build_data_row_body(r))) == want
    # as a run of messages, twice (the second time from the caches), cut anywhere like a socket read
    wire = b"".join(P.build_data_row(r) for r in rows)
    for _ in range(2):
        data, last, end, n, nbytes = p.mask_rows(wire, 0, len(wire))
        assert end == len(wire) and n == len(rows) and nbytes == len(wire) - len(rows)
        masked = (data or b"") + wire[last:]
        msgs, rest = P.split_messages(masked)
        assert rest == b"" and [parse_data_row(b) for _, b in msgs] == expected
    cut = rnd.randrange(len(wire) + 1)
    data, last, end, n, _ = p.mask_rows(wire[:cut], 0, cut)
    assert end <= cut and ((data or b"") + wire[last:end]) == b"".join(
        P.build_data_row(w) for w in expected[:n])


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=40), st.text(max_size=30).map(lambda s: s.encode("utf-8", "surrogatepass")),
                 st.text("0123456789abcdefABZ- *#@", max_size=40).map(str.encode)),
       st.integers(0, 3), st.integers(0, 6), st.sampled_from(["*", "#", "X", "é"]))
def test_bytes_maskers_agree_with_apply(raw, keep_first, keep_last, mask_char):
    for strategy in (Partial(keep_first, keep_last, mask_char), Partial(0, keep_last, mask_char), Email(),
                     Email(fallback=Partial()), Hash(b"x" * 16), Redact()):
        want = strategy.apply(raw.decode("utf-8", "surrogateescape"))
        want = None if want is None else want.encode("utf-8", "surrogateescape")
        assert strategy.bytes_masker()(raw) == want


def test_nulls_non_ascii_and_binary_columns_are_spliced_correctly():
    p = plan()
    row = [struct.pack("!i", 7), "Zoë 4111 1111 1111 1111".encode(), None, "josé@exämple.org".encode(),
           b"tok", None, b"\x00\xff\x01", b"1234", "ünchanged".encode()]
    out = parse_data_row(p.mask_data_row(build_data_row_body(row)))
    assert out == reference(row)
    assert out[1] == "*** **** **** **** 1111".encode() and out[3] == "****@exämple.org".encode()
    assert out[8] == row[8] and out[2] is None and out[5] is None and out[6] is None


def test_rows_keep_unmasked_bytes_and_lengths_of_same_length_values():
    m = load_masking({"rules": [{"column": "card", "strategy": "partial"}]}).for_session("svc", {}, "db")
    p = m.plan_for(FIELDS[:3])
    src = build_data_row_body([b"\0\0\0\1", b"4111111111111111", b"note"])
    out = p.mask_data_row(src)
    assert len(out) == len(src) and out == build_data_row_body([b"\0\0\0\1", b"************1111", b"note"])


def test_cache_gives_each_distinct_value_its_own_output_and_counts_every_value():
    m = load_masking({"rules": [{"name": "e", "column": "email", "strategy": "email"}]}).for_session("svc", {}, "db")
    fields = [F("email", 1, 1, TEXT, -1, -1, 0)]
    p = m.plan_for(fields)
    rnd = random.Random(3)
    values = [f"u{rnd.randrange(50)}@d{rnd.randrange(5)}.io".encode() for _ in range(2000)]
    wire = b"".join(P.build_data_row([v]) for v in values)
    data, last, _, n, _ = p.mask_rows(wire, 0, len(wire))
    msgs, _ = P.split_messages(data + wire[last:])
    assert [parse_data_row(b)[0] for _, b in msgs] == [b"****" + v[v.index(b"@"):] for v in values]
    assert p.steps[0].cache is not None and len(p.steps[0].cache) <= 5 * 50
    stats = m.take_stats()
    assert stats["values_masked"] == 2000 and stats["rows"] == 2000


def test_cache_switches_itself_off_when_values_do_not_repeat(monkeypatch):
    monkeypatch.setattr(pgrow, "CACHE_ENTRIES", 64)
    m = load_masking({"rules": [{"column": "email", "strategy": "email"}]}).for_session("svc", {}, "db")
    p = m.plan_for([F("email", 1, 1, TEXT, -1, -1, 0)])
    values = [f"user{i}@example.com".encode() for i in range(1000)]
    wire = b"".join(P.build_data_row([v]) for v in values)
    data, last, _, _, _ = p.mask_rows(wire, 0, len(wire))
    assert p.steps[0].cache is None
    msgs, _ = P.split_messages(data + wire[last:])
    assert [parse_data_row(b)[0] for _, b in msgs] == [b"****@example.com"] * 1000
    assert m.take_stats()["values_masked"] == 1000


def test_cache_holds_detector_results_and_their_counts():
    m = load_masking({"rules": [{"name": "scan", "scan_all_text": True, "detectors": ["ssn"]}]}) \
        .for_session("svc", {}, "db")
    p = m.plan_for([F("note", 1, 1, TEXT, -1, -1, 0)])
    wire = b"".join(P.build_data_row([v]) for v in [b"ssn 123-45-6789", b"clean", b"ssn 123-45-6789"] * 10)
    data, last, _, n, _ = p.mask_rows(wire, 0, len(wire))
    msgs, _ = P.split_messages(data + wire[last:])
    assert [parse_data_row(b)[0] for _, b in msgs] == [b"ssn [REDACTED]", b"clean", b"ssn [REDACTED]"] * 10
    stats = m.take_stats()
    assert stats["values_masked"] == 20 and stats["rows"] == 20


def test_a_column_running_past_its_message_is_an_error_not_a_guess():
    p = plan()
    body = build_data_row_body([b"\0\0\0\1", b"4111111111111111"] + [None] * 7)
    bad = body[:10] + struct.pack("!i", 999) + body[14:]        # the card's length word
    wire = b"D" + struct.pack("!i", len(bad) + 4) + bad + P.build_data_row([b"x"] * 9)
    with pytest.raises(ValueError):
        p.mask_rows(wire, 0, len(wire))
    with pytest.raises(ValueError):
        p.mask_data_row(bad)


def test_session_masks_runs_split_across_reads_like_the_reference():
    masker = load_masking(CONFIG).for_session("svc", {}, "db")
    d = Driver(masking=masker)
    d.client(STARTUP)
    d.server(AUTH_DONE)
    d.reset()
    d.client(P.build_query("SELECT * FROM t"))
    rnd = random.Random(5)
    rows = [[struct.pack("!i", i), b"4111 1111 1111 %04d" % i, b"n", b"u%d@x.io" % (i % 7), b"t%d" % (i % 3),
             b"s", None if i % 4 else b"\x01", b"98765", b"tail"] for i in range(300)]
    wire = (P.build_row_description(FIELDS) + b"".join(P.build_data_row(r) for r in rows)
            + P.build_command_complete("SELECT 300") + P.build_ready_for_query("I"))
    pos = 0
    while pos < len(wire):
        step = rnd.randrange(1, 700)
        d.server(wire[pos:pos + step])
        pos += step
    msgs, rest = P.split_messages(d.to_client)
    assert rest == b""
    got = [parse_data_row(b) for t, b in msgs if t == b"D"]
    assert got == [reference(r) for r in rows]
    applied = [f for t, f in d.events if t == "mask.applied"]
    assert applied and applied[0]["rows"] == 300
