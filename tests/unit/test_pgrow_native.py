"""enforcer/masking/_pgrows.c against the Python loop it replaces (RowPlan.py_mask_rows): the same
return tuples, exceptions, callbacks, counters, caches and plan state for any run of messages."""
import contextlib
import os
import struct
import subprocess
import sys
import tracemalloc
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enforcer.masking import load_masking, pgrow
from enforcer.masking.detectors import BUILTIN, Scanner
from enforcer.masking.pgrow import (CONSTANT, DETECT, UNCHANGED, WHOLE, ColumnStep, Counter, RowPlan,
                                    detector_masker)
from enforcer.masking.strategies import Email, Hash, Partial, Redact
from enforcer.postgres.protocol import FieldDescription as F

try:
    from enforcer.masking import _pgrows as native
except ImportError:
    if os.environ.get("CI") == "true":
        raise   # make setup builds the module: a missing one in CI is a build bug, not a skip
    pytest.skip("enforcer.masking._pgrows is not built (pip install -e .)", allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# -- wire helpers ---------------------------------------------------------------------------

def body(values, ncols=None) -> bytes:
    out = struct.pack("!h", len(values) if ncols is None else ncols)
    for v in values:
        out += struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v
    return out


def data_row(values, ncols=None) -> bytes:
    payload = body(values, ncols)
    return b"D" + struct.pack("!i", len(payload) + 4) + payload


COMMAND_COMPLETE = b"C" + struct.pack("!i", 13) + b"SELECT 1\x00"


def outcome(mask, buf, pos, n):
    """A call's result, or its exception as (type, message): both loops must agree on either."""
    try:
        return "ok", mask(buf, pos, n)
    except Exception as e:      # noqa: BLE001 - any difference in what is raised is a failure
        return "raised", type(e), str(e)


def state(plan: RowPlan):
    """Everything a run can change on a plan, its steps and its counters."""
    steps = [(s.index, s.kind, s.skipped, s.cache_since, None if s.cache is None else dict(s.cache),
              s.counter.values, s.counter.nulled) for s in plan.steps]
    compiled = [(gap, kind, constant, cache is None) for gap, kind, _fn, constant, _step, cache in plan._plan]
    return plan.rows, plan.seen, steps, compiled


@contextlib.contextmanager
def cache_limits(entries, value_bytes):
    saved = pgrow.CACHE_ENTRIES, pgrow.CACHE_VALUE_BYTES
    pgrow.CACHE_ENTRIES, pgrow.CACHE_VALUE_BYTES = entries, value_bytes
    try:
        yield
    finally:
        pgrow.CACHE_ENTRIES, pgrow.CACHE_VALUE_BYTES = saved


# -- hand-built plans: every step kind, with fns whose answers vary by value ---------------------

def mixed_whole(raw):
    pick = zlib.crc32(raw) % 5
    if pick == 0:
        return None
    if pick == 1:
        return raw[::-1]                # same length: the length word stays
    if pick == 2:
        return b"<" + raw + b">"
    if pick == 3:
        return raw[: len(raw) // 2]
    return bytearray(b"ba" + raw)       # any bytes-like is joined


def mixed_detect(raw):
    pick = zlib.crc32(raw) % 6
    if pick == 0:
        return UNCHANGED, 0, 0
    if pick == 1:
        return raw.upper() + b"!", 1, 0
    if pick == 2:
        return None, 0, 1
    if pick == 3:
        return raw.swapcase(), 2, 0
    if pick == 4:
        return [UNCHANGED, 0, 0]        # unpacked like a tuple
    return raw, 0, 0                    # "changed" to the same bytes: still spliced


WHOLE_FNS = [mixed_whole, Partial().bytes_masker(), Email().bytes_masker(), Hash(b"k" * 16).bytes_masker()]
DETECT_FNS = [mixed_detect, None]       # None: a real detector step (ssn + email over text)
CONSTANTS = [None, b"", b"X", b"****", b"[REDACTED]"]


@st.composite
def step_specs(draw):
    indices = sorted(draw(st.sets(st.integers(0, 6), min_size=1, max_size=4)))
    shared_counter = draw(st.booleans())
    specs = []
    for i in indices:
        kind = draw(st.sampled_from([WHOLE, CONSTANT, DETECT]))
        specs.append({"index": i, "kind": kind, "fn": draw(st.integers(0, 3)),
                      "constant": draw(st.sampled_from(CONSTANTS)), "nulling": draw(st.booleans()),
                      "cached": draw(st.booleans())})
    return specs, shared_counter


def build_plan(specs, shared_counter, log):
    """A RowPlan from specs; every fn call is logged so both loops can be shown to make the same calls."""
    shared = Counter("all", "*")
    steps, counters = [], []
    for spec in specs:
        counter = shared if shared_counter else Counter("r", f"c{spec['index']}")
        if spec["kind"] == DETECT and DETECT_FNS[spec["fn"] % 2] is None:
            step = detector_masker(spec["index"], Scanner([BUILTIN["ssn"], BUILTIN["email"]]),
                                   {"ssn": Redact(), "email": Email()}, 25, 0, counter)
            if not spec["cached"]:
                step.cache = None
        elif spec["kind"] == DETECT:
            step = ColumnStep(spec["index"], DETECT, counter, fn=mixed_detect, cached=spec["cached"])
        elif spec["kind"] == WHOLE:
            step = ColumnStep(spec["index"], WHOLE, counter, fn=WHOLE_FNS[spec["fn"]], nulling=spec["nulling"],
                              cached=spec["cached"])
        else:
            step = ColumnStep(spec["index"], CONSTANT, counter, constant=spec["constant"], nulling=spec["nulling"])
        if step.fn is not None:
            step.fn = logged(step.fn, spec["index"], log)
        steps.append(step)
        if counter not in counters:
            counters.append(counter)
    return RowPlan(steps, counters)


def logged(fn, index, log):
    def run(raw):
        log.append((index, raw))
        return fn(raw)
    return run


POOL = [b"", b"a", b"ab", b"abc", b"123-45-6789", b"ssn 123-45-6789", b"jane@example.com", b"4111 1111 1111 1111",
        "Zoë@exämple.org".encode(), b"x" * 40, b"\xff\xfe"]
values = st.one_of(st.none(), st.sampled_from(POOL), st.binary(max_size=10))


@st.composite
def messages(draw, width):
    """One message of a run: mostly DataRows, sometimes irregular, malformed or not a DataRow."""
    what = draw(st.sampled_from(["row"] * 8 + ["short", "tiny", "negcols", "other", "badlen", "corrupt"]))
    if what == "row":
        return data_row(draw(st.lists(values, min_size=width, max_size=width + 2)))
    if what == "short":
        return data_row(draw(st.lists(values, max_size=max(width - 1, 0))))
    if what == "tiny":                      # message length 4 or 5: no column count
        return b"D" + struct.pack("!i", 4) if draw(st.booleans()) else b"D" + struct.pack("!i", 5) + b"\x00"
    if what == "negcols":
        return data_row(draw(st.lists(values, min_size=width, max_size=width)), ncols=-1)
    if what == "other":
        return COMMAND_COMPLETE
    if what == "badlen":
        return b"D" + struct.pack("!i", draw(st.integers(-5, 3))) + b"\x00" * 8
    # a column length word that lies: past the row, into the next one, or past the buffer
    row_values = draw(st.lists(st.sampled_from(POOL), min_size=width, max_size=width + 1))
    msg = bytearray(data_row(row_values))
    column = draw(st.integers(0, len(row_values) - 1))
    at = 7 + sum(4 + len(v) for v in row_values[:column])
    msg[at:at + 4] = struct.pack("!i", draw(st.sampled_from([-7, 0, 1, 3, 30, 999, 2**31 - 1])))
    return bytes(msg)


@st.composite
def runs(draw):
    specs, shared = draw(step_specs())
    width = specs[-1]["index"] + 1
    msgs = draw(st.lists(messages(width), min_size=1, max_size=14))
    prefix = draw(st.binary(max_size=3))
    wire = prefix + b"".join(msgs)
    cuts = sorted(draw(st.lists(st.integers(0, len(wire)), max_size=3)))
    limits = (draw(st.sampled_from([1, 2, 3, 8, 4096])), draw(st.sampled_from([0, 3, 16, 256])))
    return specs, shared, wire, len(prefix), cuts, limits


def drive(mask, wire, pos, cuts):
    """Like the session: successive reads end at each cut, each call resumes where the last stopped;
    then the whole wire once more (warm caches)."""
    results = []
    for start, ends in ((pos, cuts + [len(wire)]), (pos, [len(wire)])):
        at = start
        for n in ends:
            r = outcome(mask, wire, at, n)
            results.append(r)
            if r[0] != "ok":
                break
            at = r[1][2]
    return results


@settings(max_examples=500, deadline=None)
@given(runs())
def test_native_loop_equals_the_python_loop_on_hand_built_plans(run):
    specs, shared, wire, pos, cuts, limits = run
    with cache_limits(*limits):
        log_py, log_c = [], []
        py = build_plan(specs, shared, log_py)
        c = build_plan(specs, shared, log_c)
        assert drive(c.native_mask_rows, wire, pos, cuts) == drive(py.py_mask_rows, wire, pos, cuts)
        assert log_c == log_py
        assert state(c) == state(py)


# -- plans from RowDescriptions through the masking engine ---------------------------------------

TEXT, VARCHAR, INT4, INT8, BYTEA, JSON, JSONB, CITEXT = 25, 1043, 23, 20, 17, 114, 3802, 16500
ENGINE_CONFIG = {"hash_key": "k" * 32, "rules": [
    {"name": "p", "column": "card", "strategy": "partial"},
    {"name": "e", "column": "email", "strategy": "email"},
    {"name": "h", "column": "token", "strategy": "hash"},
    {"name": "r", "column": "secret", "strategy": "redact"},
    {"name": "f", "column": "pin", "strategy": "fixed:0000"},
    {"name": "n", "column": "gone", "strategy": "null"},
    {"name": "d", "column": "pan", "detectors": ["card", "ssn"]},
    {"name": "scan", "scan_all_text": True, "detectors": ["ssn", "email"]},
]}
NAMES = ["id", "card", "email", "token", "secret", "pin", "gone", "pan", "note"]
TYPES = [(TEXT, 0), (VARCHAR, 0), (TEXT, 1), (INT4, 0), (INT4, 1), (INT8, 1), (BYTEA, 1), (JSON, 0), (JSONB, 1),
         (JSONB, 0), (CITEXT, 0)]
ENGINE_POOL = POOL + [b"\x00\x00\x00\x07", struct.pack("!q", 4111111111111111), b"4111111111111111",
                      b'{"a": "123-45-6789"}', b'\x01{"a": "jane@example.com", "n": 4111111111111111}', b"{bad",
                      b'"plain"', b"\x01[1, 2]"]


@st.composite
def engine_runs(draw):
    ncols = draw(st.integers(1, 7))
    fields = []
    for i in range(ncols):
        type_oid, fmt = draw(st.sampled_from(TYPES))
        fields.append(F(draw(st.sampled_from(NAMES)), 16400, i + 1, type_oid, -1, -1, fmt))
    value = st.one_of(st.none(), st.sampled_from(ENGINE_POOL), st.binary(max_size=10))
    rows = draw(st.lists(st.one_of(
        st.lists(value, min_size=ncols, max_size=ncols).map(data_row),
        st.lists(value, max_size=ncols - 1).map(data_row),
        st.just(COMMAND_COMPLETE)), min_size=1, max_size=12))
    wire = b"".join(rows)
    cuts = sorted(draw(st.lists(st.integers(0, len(wire)), max_size=2)))
    return fields, wire, cuts, draw(st.sampled_from([2, 4096]))


def engine_plan(fields):
    return load_masking(ENGINE_CONFIG).for_session("svc", {}, "db").plan_for(fields)


@settings(max_examples=300, deadline=None)
@given(engine_runs())
def test_native_loop_equals_the_python_loop_on_engine_plans(run):
    fields, wire, cuts, entries = run
    with cache_limits(entries, 256):
        try:
            py, c = engine_plan(fields), engine_plan(fields)
        except pgrow.MaskingRefused:
            return
        if py is None:
            return
        assert drive(c.native_mask_rows, wire, 0, cuts) == drive(py.py_mask_rows, wire, 0, cuts)
        assert state(c) == state(py)


# -- bytes-level cases ----------------------------------------------------------------------

def single(kind, fn=None, constant=None, index=1, cached=True):
    def make():
        counter = Counter("r", "c")
        return RowPlan([ColumnStep(index, kind, counter, fn=fn, constant=constant, cached=cached)], [counter])
    return make


def both(make, wire, pos=0, n=None):
    """Run both loops; assert they agree and hand back the native result and plan."""
    n = len(wire) if n is None else n
    py, c = make(), make()
    want, got = outcome(py.py_mask_rows, wire, pos, n), outcome(c.native_mask_rows, wire, pos, n)
    assert got == want
    assert state(c) == state(py)
    return got, c


def test_longer_value_rewrites_column_and_message_length():
    wire = data_row([b"1", b"abc", b"tail"])
    (_, (data, last, end, rows, nbytes)), plan = both(single(WHOLE, fn=lambda raw: raw + b"-masked"), wire)
    assert data == data_row([b"1", b"abc-masked", b"tail"])[:-8] and last == len(wire) - 8
    assert data + wire[last:] == data_row([b"1", b"abc-masked", b"tail"])
    assert (end, rows, nbytes) == (len(wire), 1, len(wire) - 1)
    assert plan.rows == 1 and plan.seen == 1 and plan.steps[0].counter.values == 1


def test_same_length_value_keeps_the_length_word_and_message_length():
    wire = data_row([b"1", b"abcd"])
    (_, (data, last, _, _, _)), _ = both(single(WHOLE, fn=lambda raw: b"****"), wire)
    assert data + wire[last:] == data_row([b"1", b"****"]) and len(data) == len(wire)
    assert data[:7] == wire[:7]


def test_null_result_writes_minus_one_and_shrinks_the_message():
    wire = data_row([b"1", b"secret", b"x"])
    (_, (data, last, _, _, _)), plan = both(single(CONSTANT, constant=None), wire)
    assert data + wire[last:] == data_row([b"1", None, b"x"])
    assert plan.steps[0].counter.values == 1


def test_null_values_are_skipped_and_not_counted():
    wire = data_row([b"1", None]) + data_row([b"2", b"v"])
    (_, (data, last, _, rows, _)), plan = both(single(CONSTANT, constant=b"C"), wire)
    assert data + wire[last:] == data_row([b"1", None]) + data_row([b"2", b"C"])
    assert rows == 2 and plan.rows == 1 and plan.steps[0].counter.values == 1 and plan.steps[0].skipped == 0


def test_nothing_changed_gives_none_and_everything_forwarded():
    wire = data_row([b"1", b"clean"]) * 3
    (_, result), plan = both(single(DETECT, fn=lambda raw: (UNCHANGED, 0, 0)), wire, pos=0)
    assert result == (None, 0, len(wire), 3, len(wire) - 3)
    assert plan.seen == 3 and plan.rows == 0


def test_column_past_the_end_of_its_row_raises_value_error_after_counting_the_run():
    good = data_row([b"1", b"ok"])
    bad = bytearray(data_row([b"1", b"abc"]))
    bad[12:16] = struct.pack("!i", 999)     # the masked column's length word
    wire = good + bytes(bad) + good
    (status, kind, message), plan = both(single(WHOLE, fn=lambda raw: b"M" + raw), wire)
    assert status == "raised" and kind is ValueError and "runs past the end" in message
    # as in the reference, the run is tallied up to and including the failing row
    assert plan.seen == 2 and plan.rows == 1 and plan.steps[0].counter.values == 2


def test_skipped_columns_past_the_row_read_on_into_the_next_message_like_the_reference():
    # the reference reads length words from the whole buffer, not just the row: a skipped column
    # that lies about its length lands in the next message, and what it finds there decides
    lying = bytearray(data_row([b"abc", b"x"]))
    lying[7:11] = struct.pack("!i", 19)     # lands on the next message's first value
    make = single(CONSTANT, constant=b"C")
    got, plan = both(make, bytes(lying) + data_row([b"\xff\xff\xff\xff" + b"y" * 8]))
    assert got[0] == "ok" and got[1][0] is None and got[1][3] == 2
    assert plan.seen == 2 and plan.steps[0].counter.values == 0
    got, _ = both(make, bytes(lying) + data_row([b"\x00\x00\x00\x05" + b"y" * 8]))
    assert got[:2] == ("raised", ValueError)


def test_skipped_columns_past_the_buffer_raise_struct_error_like_the_reference():
    bad = bytearray(data_row([b"abc", b"x"]))
    bad[7:11] = struct.pack("!i", 2**31 - 1)    # a skipped column claiming 2 GB
    (status, kind, _), _ = both(single(CONSTANT, constant=b"C"), bytes(bad))
    assert status == "raised" and kind is struct.error


def test_stops_at_other_incomplete_and_invalid_messages():
    row = data_row([b"1", b"v"])
    make = single(CONSTANT, constant=b"WW")
    (_, (data, last, end, rows, _)), _ = both(make, row + COMMAND_COMPLETE + row)
    assert (end, rows) == (len(row), 1) and data + row[last:end] == data_row([b"1", b"WW"])
    (_, (_, _, end, rows, _)), _ = both(make, row + row[:-1])
    assert (end, rows) == (len(row), 1)
    (_, (_, _, end, rows, _)), _ = both(make, row + b"D" + struct.pack("!i", 3) + b"\x00" * 6)
    assert (end, rows) == (len(row), 1)
    (_, (data, last, end, rows, _)), _ = both(make, row, pos=0, n=4)
    assert (data, last, end, rows) == (None, 0, 0, 0)


def test_irregular_rows_go_through_mask_data_row_between_regular_ones():
    def make():
        a, b = Counter("r", "a"), Counter("r", "b")
        return RowPlan([ColumnStep(0, WHOLE, a, fn=lambda raw: raw * 2), ColumnStep(2, CONSTANT, b, constant=b"Z")],
                       [a, b])
    wire = (data_row([b"a", b"-", b"c"]) + data_row([b"b"]) + data_row([b"c", b"-"], ncols=2)
            + data_row([], ncols=0) + data_row([b"d", b"-", b"e", b"extra"]))
    (_, (data, last, end, rows, _)), plan = both(make, wire)
    assert data + wire[last:] == (data_row([b"aa", b"-", b"Z"]) + data_row([b"bb"]) + data_row([b"cc", b"-"], ncols=2)
                                  + data_row([], ncols=0) + data_row([b"dd", b"-", b"Z", b"extra"]))
    assert rows == 5 and end == len(wire)
    assert plan.seen == 5 and plan.rows == 4
    assert (plan.steps[0].counter.values, plan.steps[1].counter.values) == (4, 2)


def test_a_cache_switched_off_by_an_irregular_row_is_not_used_afterwards():
    # the Python loop used to keep the stale compiled plan after mask_data_row switched a cache
    # off, and failed with TypeError on the next miss of that column
    def make():
        a, b = Counter("r", "a"), Counter("r", "b")
        return RowPlan([ColumnStep(0, WHOLE, a, fn=lambda raw: b"<" + raw), ColumnStep(1, WHOLE, b, fn=bytes.upper)],
                       [a, b])
    wire = (b"".join(data_row([b"%d" % i, b"y"]) for i in range(4))
            + b"".join(data_row([b"i%d" % i]) for i in range(10)) + data_row([b"new", b"y"]))
    with cache_limits(4, 256):
        (status, result), plan = both(make, wire)
    assert status == "ok" and plan.steps[0].cache is None
    assert result[0] + wire[result[1]:] == (b"".join(data_row([b"<%d" % i, b"Y"]) for i in range(4))
                                           + b"".join(data_row([b"<i%d" % i]) for i in range(10))
                                           + data_row([b"<new", b"Y"]))


def test_cache_is_emptied_when_full_and_switched_off_when_it_rarely_hits():
    # mostly three values, a new one every tenth row: the cache fills up but keeps hitting
    repeating = b"".join(data_row([b"-", b"v%d" % (i % 3) if i % 10 else b"n%d" % i]) for i in range(200))
    distinct = b"".join(data_row([b"-", b"u%d" % i]) for i in range(200))
    with cache_limits(4, 256):
        _, plan = both(single(WHOLE, fn=lambda raw: raw + b"!"), repeating)
        assert plan.steps[0].cache is not None and plan.steps[0].cache_since > 0
        _, plan = both(single(WHOLE, fn=lambda raw: raw + b"!"), distinct)
        assert plan.steps[0].cache is None and plan._plan[0][5] is None


def test_strategy_errors_propagate_after_the_run_is_counted():
    def boom(raw):
        if raw == b"bad":
            raise RuntimeError("strategy failed")
        return raw + b"."
    wire = data_row([b"-", b"ok"]) + data_row([b"-", b"bad"])
    (status, kind, message), plan = both(single(WHOLE, fn=boom), wire)
    assert (status, kind, message) == ("raised", RuntimeError, "strategy failed")
    assert plan.seen == 2 and plan.rows == 1


def test_detect_results_that_do_not_unpack_raise_like_python():
    for result, kind in (((UNCHANGED, 0), ValueError), ((UNCHANGED, 0, 0, 0), ValueError), (7, TypeError)):
        (status, got, _), _ = both(single(DETECT, fn=lambda raw, r=result: r), data_row([b"-", b"v"]))
        assert (status, got) == ("raised", kind)


def test_inputs_the_native_loop_does_not_take_are_handed_to_the_python_loop():
    make = single(CONSTANT, constant=b"C")
    row = data_row([b"-", b"v"])
    py, c = make(), make()
    for buf, pos, n in ((bytearray(row), 0, len(row)), (memoryview(row), 0, len(row)), (row, -3, len(row)),
                        (row, 0, len(row) + 5), (row, 0.0, len(row))):
        assert outcome(c.native_mask_rows, buf, pos, n) == outcome(py.py_mask_rows, buf, pos, n)
    assert state(c) == state(py)


def test_buffers_and_plan_objects_are_not_leaked():
    reused = b"REUSED-VALUE"
    constant = b"CONSTANT"
    detected = (b"DETECTED", 1, 0)

    def make():
        a, b, d = Counter("r", "a"), Counter("r", "b"), Counter("r", "d")
        return RowPlan([ColumnStep(0, WHOLE, a, fn=lambda raw: reused),
                        ColumnStep(2, CONSTANT, b, constant=constant),
                        ColumnStep(3, DETECT, d, fn=lambda raw: detected if raw != b"same" else (UNCHANGED, 0, 0))],
                       [a, b, d])
    plan = make()
    wire = b"".join(data_row([b"v%d" % (i % 50), b"-", None if i % 7 == 0 else b"x", b"same" if i % 3 else b"d"])
                    for i in range(2000))
    wire += data_row([b"short"], ncols=1)
    bad = data_row([b"v0", b"-", b"b", b"c"])     # v0 is cached: nothing new to keep
    bad = bad[:-5] + struct.pack("!i", 99) + bad[-1:]

    def counts():
        watched = [reused, constant, detected, UNCHANGED, wire, bad, plan, plan._plan, *plan.steps]
        watched += [s.fn for s in plan.steps if s.fn is not None] + [s.cache for s in plan.steps if s.cache is not None]
        return [sys.getrefcount(o) for o in watched]
    for _ in range(3):
        plan.native_mask_rows(wire, 0, len(wire))      # caches filled
    before = counts()
    for _ in range(20):
        plan.native_mask_rows(wire, 0, len(wire))
        with pytest.raises(ValueError):
            plan.native_mask_rows(bad, 0, len(bad))
    assert counts() == before

    tracemalloc.start()
    try:
        for _ in range(5):
            plan.native_mask_rows(wire, 0, len(wire))
        first = tracemalloc.get_traced_memory()[0]
        for _ in range(50):
            plan.native_mask_rows(wire, 0, len(wire))
            with pytest.raises(ValueError):
                plan.native_mask_rows(bad, 0, len(bad))
        assert tracemalloc.get_traced_memory()[0] - first < 64 * 1024
    finally:
        tracemalloc.stop()


def test_native_is_chosen_unless_warden_pure_python_is_set():
    assert pgrow._native is native and (native.WHOLE, native.CONSTANT, native.DETECT) == (WHOLE, CONSTANT, DETECT)
    assert pgrow.NATIVE == (os.environ.get("WARDEN_PURE_PYTHON") != "1")
    assert (RowPlan.mask_rows is RowPlan.native_mask_rows) == pgrow.NATIVE
    probe = ("from enforcer.masking import pgrow; "
             "print(pgrow.NATIVE, pgrow.RowPlan.mask_rows is pgrow.RowPlan.py_mask_rows)")
    env = dict(os.environ, WARDEN_PURE_PYTHON="1")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]
    env.pop("WARDEN_PURE_PYTHON")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False"]


def test_a_missing_module_falls_back_to_python_silently():
    probe = ("import sys; sys.modules['enforcer.masking._pgrows'] = None; "
             "from enforcer.masking import pgrow; "
             "print(pgrow.NATIVE, pgrow.RowPlan.mask_rows is pgrow.RowPlan.py_mask_rows)")
    env = {k: v for k, v in os.environ.items() if k != "WARDEN_PURE_PYTHON"}
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"] and out.stderr == ""
