"""records/_seal.c against the pure-Python reference: the same bytes, tags and hashes for any
field map, the same refusals, and the chain a writer builds verifies with either."""
import hashlib
import math
import os
import sys

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from records import codec
from records.batch import BatchBuilder, decode_batch
from records.codec import EncodingError, event_head, event_tail, py_encode_fields, py_seal_parts

try:
    from records import _seal as native
except ImportError:
    if os.environ.get("CI") == "true":
        raise   # make setup builds the module: a missing one in CI is a build bug, not a skip
    pytest.skip("records._seal is not built (pip install -e .)", allow_module_level=True)

HEAD = event_head("agent-1")
PREV = hashlib.sha256(b"previous").digest()

scalars = (st.none() | st.booleans() | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
           | st.floats(allow_nan=False) | st.text(max_size=300) | st.binary(max_size=300))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=20)
                      | st.tuples(inner, inner)
                      | st.dictionaries(st.text(max_size=12), inner, max_size=20), max_leaves=60)
field_maps = st.dictionaries(st.text(max_size=40), values, max_size=40)


@settings(max_examples=600, deadline=None)
@given(field_maps)
def test_native_encoding_is_byte_identical_to_the_reference(fields):
    assert native.encode_fields(fields) == py_encode_fields(fields)


@settings(max_examples=300, deadline=None)
@given(field_maps, st.integers(min_value=1, max_value=(1 << 64) - 1), st.none() | st.text(max_size=40),
       st.integers(min_value=0, max_value=(1 << 63) - 1), st.sampled_from(["pg.statement", "session.start", "é"]))
def test_native_seal_matches_the_reference(fields, seq, sid, ts, event_type):
    assert native.seal(HEAD, fields, seq, sid, ts, event_type, 1, PREV) == \
        py_seal_parts(HEAD, fields, seq, sid, ts, event_type, 1, PREV)


def test_seal_parts_follow_the_hash_rule():
    fields = {"text": "select 1", "rows": 1, "params": None}
    encoded_fields, tag, digest = native.seal(HEAD, fields, 7, "sid-1", 123, "pg.statement", 1, PREV)
    encoding = HEAD + py_encode_fields(fields) + event_tail(7, "sid-1", 123, "pg.statement", 1)
    assert encoded_fields == py_encode_fields(fields)
    assert tag == hashlib.sha256(encoding).digest()[:8]
    assert digest == hashlib.sha256(encoding + PREV).digest()


@pytest.mark.parametrize("value", [
    0, 127, 128, 255, 256, 65535, 65536, (1 << 32) - 1, 1 << 32, (1 << 64) - 1,
    -1, -32, -33, -128, -129, -32768, -32769, -(1 << 31), -(1 << 31) - 1, -(1 << 63),
    0.0, -0.0, math.inf, -math.inf, 1.5, "", "x" * 31, "x" * 32, "x" * 255, "x" * 256, "x" * 65536,
    b"", b"x" * 255, b"x" * 256, b"x" * 65536, bytearray(b"ab"), [1] * 15, [1] * 16, [1] * 65536,
    {f"k{i}": i for i in range(15)}, {f"k{i}": i for i in range(16)}, {f"k{i:05}": i for i in range(70000)},
    True, False, None, "é☃\U0001F600", ("a", 1),
])
def test_boundaries_of_every_msgpack_form(value):
    encoded = native.encode_fields({"v": value})
    assert encoded == py_encode_fields({"v": value})
    decoded = msgpack.unpackb(encoded, raw=False, strict_map_key=True)["v"]
    expected = list(value) if isinstance(value, tuple) else bytes(value) if isinstance(value, bytearray) else value
    assert decoded == expected and type(decoded) is type(expected)


def test_keys_are_sorted_by_code_point_at_every_depth():
    fields = {"b": {"z": 1, "a": [{"y": 2, "x": 3}]}, "a": 1, "é": 2, "Z": 3, "\U0001F600": 4, "ÿ": 5}
    out = msgpack.unpackb(native.encode_fields(fields), raw=False)
    assert list(out) == sorted(fields)
    assert list(out["b"]) == ["a", "z"] and list(out["b"]["a"][0]) == ["x", "y"]
    assert native.encode_fields(fields) == py_encode_fields(fields)


def test_a_remembered_key_order_is_only_reused_for_the_same_keys_in_the_same_order():
    """The encoder remembers the sorted order of map shapes by the identity of their keys in
    insertion order; every other order of the same keys, or other keys, must still sort."""
    import itertools
    import random
    names = ["method", "host", "path", "decision", "action", "b", "a", "é"]
    for order in itertools.islice(itertools.permutations(names), 0, 5000, 7):
        fields = {name: index for index, name in enumerate(order)}
        for _ in range(2):     # the second time from the remembered order
            assert list(msgpack.unpackb(native.encode_fields(fields), raw=False)) == sorted(names)
            assert native.encode_fields(fields) == py_encode_fields(fields)
    # many more shapes than the cache has slots, revisited in a shuffled order
    rng = random.Random(7)
    shapes = [{f"k{rng.randrange(10 ** 6)}": i for i in range(rng.randrange(1, 33))} for _ in range(3000)]
    for fields in shapes + rng.sample(shapes, len(shapes)):
        assert native.encode_fields(fields) == py_encode_fields(fields)
    # long keys are sorted every time (not kept alive by the cache)
    long_key = "z" * 1000
    fields = {long_key: 1, "a": 2}
    before = sys.getrefcount(long_key)
    for _ in range(3):
        assert native.encode_fields(fields) == py_encode_fields(fields)
    assert sys.getrefcount(long_key) == before


def test_subclasses_encode_as_their_base_types_with_sorted_maps():
    import collections
    import enum

    class Kind(str, enum.Enum):
        READ = "read"

    fields = {"o": collections.OrderedDict([("b", 1), ("a", 2)]), "k": Kind.READ, "n": True}
    assert native.encode_fields(fields) == py_encode_fields(fields)
    assert list(msgpack.unpackb(native.encode_fields(fields), raw=False)["o"]) == ["a", "b"]


@pytest.mark.parametrize("fields, error", [
    ({"v": object()}, TypeError),
    ({"v": {1: "int key"}}, TypeError),
    ({"v": 1 << 64}, OverflowError),
    ({"v": -(1 << 63) - 1}, OverflowError),
    ({"v": "\ud800"}, UnicodeEncodeError),
    ({"v": {1, 2}}, TypeError),
])
def test_unencodable_values_are_refused_by_both(fields, error):
    with pytest.raises(error):
        native.encode_fields(fields)
    with pytest.raises(EncodingError):
        py_encode_fields(fields)


def _nested(levels: int, leaf, container: str):
    value = leaf
    for _ in range(levels):
        value = {"n": value} if container == "map" else [value]
    return {"top": value}


@pytest.mark.parametrize("container", ["map", "list"])
@pytest.mark.parametrize("leaf", [1, [1, 2], {"k": "v"}])
def test_both_encoders_draw_the_nesting_limit_at_the_same_depth(container, leaf):
    """Bug fix: the Python encoder hit a RecursionError (escaping the writer's repair path) on
    deep values; both now refuse containers deeper than MAX_DEPTH, and agree exactly where."""
    for levels in range(codec.MAX_DEPTH - 3, codec.MAX_DEPTH + 3):
        fields = _nested(levels, leaf, container)
        try:
            expected = py_encode_fields(fields)
        except EncodingError:
            with pytest.raises(ValueError, match="nest deeper"):
                native.encode_fields(fields)
        else:
            assert native.encode_fields(fields) == expected
    with pytest.raises(EncodingError):
        py_encode_fields(_nested(5000, 1, container))
    with pytest.raises(ValueError):
        native.encode_fields(_nested(5000, 1, container))


def test_codec_uses_the_native_module_when_built():
    if os.environ.get("WARDEN_PURE_PYTHON") == "1":
        assert not codec.NATIVE
    else:
        assert codec.NATIVE and codec.seal_parts is codec._native_seal_parts


def test_a_batch_sealed_natively_decodes_and_verifies_with_the_python_reference(monkeypatch):
    builder = BatchBuilder("agent-1", PREV, 41)
    for i in range(50):
        builder.add(1_700_000_000_000_000_000 + i, "sid", "pg.result",
                    {"rows": i, "command_tag": f"SELECT {i}", "x_nested": {"b": [i, {"d": 1, "c": 2}], "a": None}})
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    wire = builder.finish(Ed25519PrivateKey.generate())
    native_decoded = decode_batch(wire)
    monkeypatch.setattr("records.batch.seal_parts", py_seal_parts)
    python_decoded = decode_batch(wire)
    assert [e["hash"] for e in native_decoded.events] == [e["hash"] for e in python_decoded.events]
    assert python_decoded.events[-1]["hash"] == builder.last_hash
    assert python_decoded.tags == builder.columns()[6]


def test_no_reference_leaks_when_encoding_repeatedly():
    fields = {"text": "select 1", "tables": ["a", "b"], "x": {"k": [1, 2.5, b"z"]}}
    for _ in range(1000):
        native.seal(HEAD, fields, 1, "s", 2, "t", 1, PREV)
    before = sys.getrefcount(fields["text"]), sys.getrefcount(fields["tables"])
    for _ in range(10000):
        native.seal(HEAD, fields, 1, "s", 2, "t", 1, PREV)
        try:
            native.encode_fields({"bad": object(), "a": fields["text"]})
        except TypeError:
            pass
    assert (sys.getrefcount(fields["text"]), sys.getrefcount(fields["tables"])) == before


events = st.lists(st.tuples(st.integers(min_value=0, max_value=(1 << 63) - 1), st.none() | st.sampled_from(["s1", "s2", "s3"]),
                            st.sampled_from(["pg.statement", "pg.result", "agent.alert"]), field_maps), max_size=12)


@settings(max_examples=200, deadline=None)
@given(events, st.integers(min_value=1, max_value=1 << 40))
def test_native_builder_fills_the_same_columns_as_the_python_core(sequence, first_seq):
    from records.batch import _PyBuilderCore
    from records.schema import SCHEMA_VERSION
    cores = [native.Builder("agent-1", PREV, first_seq, HEAD, SCHEMA_VERSION),
             _PyBuilderCore("agent-1", PREV, first_seq, HEAD, SCHEMA_VERSION)]
    for ts, sid, event_type, fields in sequence:
        assert cores[0].add(ts, sid, event_type, fields) == cores[1].add(ts, sid, event_type, fields)
    a, b = cores
    assert a.columns() == b.columns()
    assert (a.count, a.last_seq, a.last_hash, a.first_seq, a.prev_hash, a.agent_id) == \
        (b.count, b.last_seq, b.last_hash, b.first_seq, b.prev_hash, b.agent_id)


@pytest.mark.parametrize("core", ["native", "python"])
@pytest.mark.parametrize("bad", [{"kind": object()}, {"kind": 1 << 70}, {"kind": {3: 4}}])
def test_a_failed_add_leaves_every_column_as_it_was(core, bad):
    from records.batch import _PyBuilderCore
    from records.schema import SCHEMA_VERSION
    make = native.Builder if core == "native" else _PyBuilderCore
    builder = make("agent-1", PREV, 5, HEAD, SCHEMA_VERSION)
    builder.add(10, "s1", "agent.alert", {"kind": "first"})
    before = (builder.columns(), builder.count, builder.last_hash, builder.last_seq)
    with pytest.raises(EncodingError, match="seq=6"):
        builder.add(11, "s-new", "type-new", bad)
    assert (builder.columns(), builder.count, builder.last_hash, builder.last_seq) == before
    builder.add(12, "s-new", "agent.alert", {"kind": "after"})
    assert builder.columns()[1] == ["s1", "s-new"] and builder.columns()[0] == [10, 2]


def test_native_builder_keeps_no_stray_references():
    from records.schema import SCHEMA_VERSION
    fields = {"text": "select 1", "tables": ["a"]}
    sid = "session-refcount"
    for _ in range(3):
        builder = native.Builder("agent-1", PREV, 1, HEAD, SCHEMA_VERSION)
        for i in range(2000):
            builder.add(i, sid, "pg.statement", fields)
            try:
                builder.add(i, sid, "pg.statement", {"bad": object()})
            except EncodingError:
                pass
        del builder
    before = sys.getrefcount(sid), sys.getrefcount(fields)
    builder = native.Builder("agent-1", PREV, 1, HEAD, SCHEMA_VERSION)
    for i in range(5000):
        builder.add(i, sid, "pg.statement", fields)
    assert sys.getrefcount(sid) == before[0] + 1       # one key in the session table
    del builder
    assert (sys.getrefcount(sid), sys.getrefcount(fields)) == before


def _builder(core="native", first_seq=1):
    from records.batch import _PyBuilderCore
    from records.schema import SCHEMA_VERSION
    make = native.Builder if core == "native" else _PyBuilderCore
    return make("agent-1", PREV, first_seq, HEAD, SCHEMA_VERSION)


def test_emit_validates_each_shape_once_per_event_type_and_refuses_unknown_fields():
    import records.writer  # noqa: F401  (registers records.schema.validate_fields)
    from records.schema import SchemaError, validate_fields
    calls = []

    def counting(event_type, fields):
        calls.append(event_type)
        validate_fields(event_type, fields)

    native.set_validator(counting)
    try:
        builder = _builder()
        for i in range(5):       # literal keys: the same key objects every time
            assert builder.emit("s1", "pg.result", {"rows": i, "command_tag": "SELECT 1"}) is True
        assert calls == ["pg.result"]
        # the same keys under another event type are checked for that type
        with pytest.raises(SchemaError, match="unknown field 'rows'"):
            builder.emit("s1", "http.response", {"rows": 1, "command_tag": "x"})
        with pytest.raises(SchemaError, match="unknown field 'txt'"):
            builder.emit("s1", "pg.statement", {"txt": "select 1"})
        with pytest.raises(SchemaError, match="unknown event type"):
            builder.emit("s1", "pg.nothing", {"rows": 1})
        with pytest.raises(SchemaError, match="fields must be a dict"):
            builder.emit("s1", "pg.result", [("rows", 1)])
        assert builder.count == 5 and builder.last_seq == 5
        # an equal type name from another call site (names with a dot are not interned). The
        # shape is emitted once more first: the cache is direct-mapped by key addresses, so one
        # of the shapes above may have taken its slot (a flaky failure under ASan in CI)
        builder.emit("s1", "pg.result", {"rows": 8, "command_tag": "SELECT 1"})
        calls.clear()
        builder.emit("s1", "".join(["pg.", "result"]), {"rows": 9, "command_tag": "SELECT 1"})
        assert calls == []
        # a key order seen first for another type is not valid for this one by accident
        calls.clear()
        builder.emit("s1", "pg.result", {"x_extra": 1})
        builder.emit("s1", "pg.result", {"x_extra": 2})
        assert calls == ["pg.result"]
    finally:
        native.set_validator(validate_fields)


def test_emit_stamps_the_time_inside_the_call_and_stops_at_its_limit():
    import time as clock
    builder = _builder(first_seq=10)
    builder.limit = 3
    before = clock.time_ns()
    assert [builder.emit(None, "pg.result", {"rows": n}) for n in range(3)] == [True] * 3
    after = clock.time_ns()
    assert builder.count == 3 and builder.head == (12, builder.last_hash)
    deltas = builder.columns()[0]
    assert before <= deltas[0] <= after and all(d >= 0 for d in deltas[1:])
    # at its limit: emit takes nothing and changes nothing, but never closes the batch itself
    # (only the writer does, under its lock: its locked path may still be adding)
    columns = builder.columns()
    assert builder.emit(None, "pg.result", {"rows": 4}) is False
    assert builder.columns() == columns and not builder.closed
    builder.add(None, None, "pg.result", {"rows": 4})
    assert builder.count == 4
    # closed: nothing is added, nothing changes
    builder.close()
    columns = builder.columns()
    assert builder.emit(None, "pg.result", {"rows": 5}) is False
    with pytest.raises(RuntimeError, match="closed"):
        builder.add(None, None, "pg.result", {"rows": 5})
    assert builder.columns() == columns


@pytest.mark.parametrize("core", ["native", "python"])
def test_limit_close_and_head_behave_alike_in_both_cores(core):
    builder = _builder(core, first_seq=7)
    assert builder.head == (6, PREV) and not builder.closed and builder.limit == 0
    builder.add(None, "s", "pg.result", {"rows": 1})
    builder.add(5, "s", "pg.result", {"rows": 2})
    assert builder.head == (8, builder.last_hash)
    builder.limit = 2          # at or under what it holds: full, but closing is the writer's
    assert builder.limit == 2 and not builder.closed
    with pytest.raises(ValueError, match="limit"):
        builder.limit = -1
    other = _builder(core)
    other.close()
    assert other.closed and other.count == 0
    with pytest.raises(RuntimeError, match="closed"):
        other.add(1, None, "pg.result", {})


@pytest.mark.parametrize("core", ["native", "python"])
def test_sid_and_type_must_be_plain_strings(core):
    class Tricky(str):
        def __hash__(self):
            return 1

    builder = _builder(core)
    for sid, event_type in ((Tricky("s"), "pg.result"), (5, "pg.result"), ("s", Tricky("pg.result"))):
        with pytest.raises(TypeError, match="sid must be a str or None"):
            builder.add(1, sid, event_type, {})
    assert builder.count == 0
