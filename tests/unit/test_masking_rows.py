"""Row plans on DataRow payloads, as bytes: masked columns re-encoded with correct lengths, the rest untouched."""
import struct

import pytest

from enforcer.masking import MaskingRefused, catalog_from_rows, load_masking
from enforcer.postgres.protocol import FieldDescription as F

TEXT, VARCHAR, INT4, INT8, NUMERIC, JSON, JSONB = 25, 1043, 23, 20, 1700, 114, 3802


def row(*values):
    """A DataRow payload written out by hand: int16 count, then int32 length (-1 NULL) + bytes."""
    out = struct.pack("!h", len(values))
    for v in values:
        out += struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v
    return out


def masker(rules, identity="svc", target="db", catalog=None, **top):
    return load_masking({"rules": rules, **top}).for_session(identity, {}, target, catalog=catalog)


CUSTOMER_FIELDS = [F("id", 16400, 1, INT4, 4, -1, 0), F("name", 16400, 2, TEXT, -1, -1, 0),
                   F("ssn", 16400, 3, TEXT, -1, -1, 0), F("email", 16400, 4, VARCHAR, -1, -1, 0)]


def test_label_rules_rewrite_only_their_columns_with_new_lengths():
    m = masker([{"column": "*ssn*", "strategy": "partial"}, {"column": "email", "strategy": "email"}])
    plan = m.plan_for(CUSTOMER_FIELDS)
    src = row(b"7", b"Jane Doe", b"123-45-6789", b"jane.doe@example.com")
    assert plan.mask_data_row(src) == row(b"7", b"Jane Doe", b"***-**-6789", b"****@example.com")


def test_null_values_stay_null_and_row_without_change_is_the_same_object():
    m = masker([{"column": "ssn"}])
    plan = m.plan_for(CUSTOMER_FIELDS)
    src = row(b"7", b"Jane", None, b"j@x.io")
    assert plan.mask_data_row(src) is src
    assert m.stats()["rows"] == 0


def test_redact_can_grow_and_null_can_shrink_a_row():
    m = masker([{"column": "name", "strategy": "redact", "replacement": "<name withheld>"},
                {"column": "ssn", "strategy": "null"}])
    plan = m.plan_for(CUSTOMER_FIELDS)
    assert plan.mask_data_row(row(b"1", b"Al", b"123-45-6789", b"a@b.cd")) == \
        row(b"1", b"<name withheld>", None, b"a@b.cd")


def test_no_plan_when_nothing_can_match():
    m = masker([{"column": "*ssn*"}])
    assert m.plan_for([F("id", 1, 1, INT4, 4, -1, 0), F("total", 0, 0, NUMERIC, -1, -1, 0)]) is None


def test_scan_all_text_skips_non_text_columns_and_masks_detected_parts():
    m = masker([{"scan_all_text": True, "detectors": ["card", "ssn"]}])
    assert m.plan_for([F("id", 1, 1, INT4, 4, -1, 1)]) is None
    plan = m.plan_for([F("id", 1, 1, INT4, 4, -1, 1), F("note", 1, 2, TEXT, -1, -1, 1)])
    src = row(struct.pack("!i", 5), "pay 4111 1111 1111 1111 — réf ok".encode())
    assert plan.mask_data_row(src) == row(struct.pack("!i", 5), "pay [REDACTED] — réf ok".encode())


def test_plans_are_computed_once_per_row_description():
    m = masker([{"column": "ssn"}])
    assert m.plan_for(CUSTOMER_FIELDS) is m.plan_for(list(CUSTOMER_FIELDS))


def test_masked_column_of_a_non_text_type_becomes_null_and_is_counted():
    m = masker([{"column": "card_number", "strategy": "partial"}])
    plan = m.plan_for([F("id", 1, 1, INT4, 4, -1, 1), F("card_number", 1, 2, INT8, 8, -1, 1)])
    src = row(struct.pack("!i", 1), struct.pack("!q", 4111111111111111))
    assert plan.mask_data_row(src) == row(struct.pack("!i", 1), None)
    stats = m.stats()
    assert stats["values_nulled"] == 1 and stats["rows"] == 1 and stats["columns"] == {"card_number": 1}


def test_on_binary_error_refuses_at_the_row_description():
    m = masker([{"column": "card_number", "on_binary": "error"}])
    with pytest.raises(MaskingRefused) as e:
        m.plan_for([F("card_number", 1, 2, INT8, 8, -1, 1)])
    assert e.value.sqlstate == "42501"
    assert "card_number::text" in str(e.value)
    # the same column cast to text is fine
    assert m.plan_for([F("card_number", 0, 0, TEXT, -1, -1, 1)]) is not None


def test_detectors_on_a_chosen_bigint_column_in_binary_decode_the_integer():
    m = masker([{"column": "pan", "detectors": ["card"]}])
    plan = m.plan_for([F("pan", 1, 1, INT8, 8, -1, 1)])
    card = row(struct.pack("!q", 4111111111111111))
    other = row(struct.pack("!q", 42))
    assert plan.mask_data_row(card) == row(None)
    assert plan.mask_data_row(other) is other


def test_whole_value_masking_of_json_columns_stays_valid_json():
    m = masker([{"column": "profile"}])
    text_plan = m.plan_for([F("profile", 1, 1, JSON, -1, -1, 0)])
    assert text_plan.mask_data_row(row(b'{"ssn": "123-45-6789"}')) == row(b'"[REDACTED]"')
    bin_plan = m.plan_for([F("profile", 1, 1, JSONB, -1, -1, 1)])
    assert bin_plan.mask_data_row(row(b'\x01{"ssn": "123-45-6789"}')) == row(b'\x01"[REDACTED]"')


def test_jsonb_binary_detectors_keep_the_version_byte_and_mask_numbers_too():
    m = masker([{"scan_all_text": True, "detectors": ["card", "ssn"]}])
    plan = m.plan_for([F("row_to_json", 0, 0, JSONB, -1, -1, 1)])
    src = row(b'\x01{"n": 4111111111111111, "s": "ssn 123-45-6789", "id": 7}')
    assert plan.mask_data_row(src) == row(b'\x01{"n": "[REDACTED]", "s": "ssn [REDACTED]", "id": 7}')
    clean = row(b'\x01{"id": 7}')
    assert plan.mask_data_row(clean) is clean


def test_schema_table_column_rule_follows_an_alias_through_the_catalog():
    catalog = catalog_from_rows([(16400, 3, "public", "customers", "ssn")])
    m = masker([{"column": "public.customers.ssn", "strategy": "partial"}], catalog=catalog)
    aliased = [F("x", 16400, 3, TEXT, -1, -1, 0)]
    assert m.plan_for(aliased).mask_data_row(row(b"123-45-6789")) == row(b"***-**-6789")
    assert m.plan_for([F("ssn", 16401, 3, TEXT, -1, -1, 0)]) is None      # another table's ssn
    without_catalog = masker([{"column": "public.customers.ssn"}])
    assert without_catalog.plan_for(aliased) is None


def test_exempt_identity_gets_no_masker():
    assert masker([{"column": "ssn", "exempt": ["fraud-*"]}], identity="fraud-analytics") is None


def test_rows_with_fewer_columns_than_the_plan_are_left_alone():
    m = masker([{"column": "ssn"}])
    plan = m.plan_for(CUSTOMER_FIELDS)
    short = row(b"1")
    assert plan.mask_data_row(short) is short


def test_stats_count_per_rule_and_column_never_values():
    m = masker([{"name": "ssn-partial", "column": "ssn", "strategy": "partial"}])
    plan = m.plan_for(CUSTOMER_FIELDS)
    for i in range(3):
        plan.mask_data_row(row(b"1", b"n", b"123-45-678%d" % i, b"e@x.io"))
    first = m.take_stats()
    assert first["rules"] == {"ssn-partial": 3} and first["rows"] == 3 and first["values_masked"] == 3
    assert "6789" not in repr(first) and "678" not in repr(m.stats())
    assert m.take_stats() is None
    plan.mask_data_row(row(b"1", b"n", b"123-45-6789", b"e@x.io"))
    assert m.take_stats()["rows"] == 1
