import hashlib
import os
import stat
import uuid

import msgpack
import pytest

from records.codec import GENESIS_HASH, EncodingError, canonical_encode, event_hash, seal_event
from records.schema import EVENT_FIELDS, SchemaError, new_session_id, validate_fields
from records.signing import load_or_create_key, public_key_bytes, public_key_from_bytes

REQUIRED_TYPES = {"session.start", "session.end", "pg.statement", "pg.result",
                  "http.request", "http.response", "policy.decision", "approval.requested",
                  "approval.decided", "approval.expired", "mask.applied", "conn.observed",
                  "agent.start", "agent.stop", "agent.heartbeat", "agent.alert",
                  "agent.bypass"}


def test_schema_covers_every_event_type():
    assert REQUIRED_TYPES <= set(EVENT_FIELDS)


def test_validate_fields_rejects_unknown_type_and_field_but_allows_x_prefix():
    validate_fields("pg.statement", {"text": "select 1", "x_trace": "abc"})
    with pytest.raises(SchemaError, match="unknown event type"):
        validate_fields("pg.nonsense", {})
    with pytest.raises(SchemaError, match="unknown field 'txt'"):
        validate_fields("pg.statement", {"txt": "select 1"})


def test_session_ids_are_time_ordered_uuid7():
    ids = [new_session_id() for _ in range(2000)]
    assert ids == sorted(ids)
    parsed = uuid.UUID(ids[0])
    assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
    assert len(set(ids)) == len(ids)


def test_canonical_encoding_ignores_key_order_recursively():
    one = {"v": 1, "agent": "a", "seq": 1, "ts": 5, "sid": None, "type": "agent.alert",
           "f": {"kind": "x", "detail": {"b": [1, {"y": 2, "x": 1}], "a": "z"}}}
    two = {"f": {"detail": {"a": "z", "b": [1, {"x": 1, "y": 2}]}, "kind": "x"},
           "type": "agent.alert", "sid": None, "ts": 5, "seq": 1, "agent": "a", "v": 1}
    assert canonical_encode(one) == canonical_encode(two)
    decoded = msgpack.unpackb(canonical_encode(one))
    assert list(decoded) == sorted(decoded)
    assert list(decoded["f"]["detail"]["b"][1]) == ["x", "y"]


def test_prev_and_hash_are_not_part_of_the_encoding():
    event = seal_event("a", 1, 10, None, "agent.alert", {"kind": "k"}, GENESIS_HASH)
    assert canonical_encode(event) == canonical_encode(
        {k: v for k, v in event.items() if k not in ("prev", "hash")})


def test_hash_rule_is_sha256_of_encoding_then_previous_hash():
    first = seal_event("a", 1, 10, None, "agent.alert", {"kind": "k"}, GENESIS_HASH)
    assert first["hash"] == hashlib.sha256(canonical_encode(first) + bytes(32)).digest()
    second = seal_event("a", 2, 11, None, "agent.alert", {"kind": "k"}, first["hash"])
    assert second["prev"] == first["hash"]
    assert second["hash"] == event_hash(first["hash"], canonical_encode(second))
    # Same content after a different predecessor gives a different hash.
    other = seal_event("a", 2, 11, None, "agent.alert", {"kind": "k"}, GENESIS_HASH)
    assert other["hash"] != second["hash"]


def test_unencodable_value_is_a_clear_error():
    with pytest.raises(EncodingError, match="cannot encode"):
        seal_event("a", 1, 1, None, "agent.alert", {"detail": object()}, GENESIS_HASH)
    with pytest.raises(EncodingError, match="strings"):
        seal_event("a", 1, 1, None, "agent.alert", {"detail": {1: "x", "a": 2}},
                   GENESIS_HASH)


def test_key_file_is_private_and_reloaded(tmp_path):
    path = tmp_path / "keys" / "agent.key"
    key = load_or_create_key(str(path))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    again = load_or_create_key(str(path))
    assert public_key_bytes(again) == public_key_bytes(key)
    raw = public_key_bytes(key)
    assert len(raw) == 32
    public_key_from_bytes(raw).verify(key.sign(b"m"), b"m")
    os.chmod(path, 0o644)
    load_or_create_key(str(path))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
