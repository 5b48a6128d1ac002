"""Free text (statements, parameters, error details), COPY rows and HTTP bodies."""
import json

import pytest

from enforcer.masking import MaskingRefused, load_masking

CONFIG = {"hash_key": "0123456789abcdef0123", "rules": [
    {"name": "ssn", "column": "*ssn*", "strategy": "partial"},
    {"name": "scan", "scan_all_text": True, "detectors": ["card", "ssn", "email"]},
    {"name": "cards-in-json", "json_key": "*card*", "strategy": "partial"},
    {"name": "owner-email", "json_path": "$.customer.contacts[*].email", "strategy": "email"},
    {"name": "token", "json_key": "token", "strategy": "hash"},
]}


@pytest.fixture
def m():
    return load_masking(CONFIG).for_session("svc", {}, "db")


def test_statement_text_and_parameters_lose_detected_values(m):
    text, n = m.mask_text("UPDATE c SET card='4111-1111-1111-1111' WHERE ssn = '123-45-6789' AND id = 5")
    assert text == "UPDATE c SET card='[REDACTED]' WHERE ssn = '[REDACTED]' AND id = 5" and n == 2
    assert m.mask_text("SELECT 1") == ("SELECT 1", 0)


def test_record_detectors_apply_even_without_scan_rules():
    m = load_masking({"rules": [{"column": "ssn"}]}).for_session("svc", {}, "db")
    assert m.mask_text("key AKIAIOSFODNN7EXAMPLE for 123-45-6789") == \
        ("key [REDACTED] for [REDACTED]", 2)


def test_unique_violation_detail_is_masked(m):
    fields = {"S": "ERROR", "C": "23505", "M": 'duplicate key value violates unique constraint "c_ssn_key"',
              "D": "Key (ssn)=(123-45-6789) already exists."}
    masked, n = m.mask_error_fields(fields)
    assert masked["D"] == "Key (ssn)=([REDACTED]) already exists." and n == 1
    assert masked["M"] == fields["M"] and masked["C"] == "23505"


def test_copy_text_rows_with_and_without_column_names(m):
    line = b"1\tJane\t123-45-6789\tjane@x.io\n"
    assert m.mask_copy_line(line, "text") == b"1\tJane\t[REDACTED]\t[REDACTED]\n"
    assert m.mask_copy_line(line, "text", columns=["id", "name", "ssn", "email"]) == \
        b"1\tJane\t***-**-6789\t[REDACTED]\n"
    clean = b"2\tAl\t\\N\tno mail\\there\n"
    assert m.mask_copy_line(clean, "text") is clean


def test_copy_text_escapes_are_respected():
    m = load_masking({"rules": [{"column": "note", "strategy": "fixed:a\tb\\c"}]}).for_session("s", {}, "db")
    assert m.mask_copy_line(b"x\\ty\t1\n", "text", columns=["note", "n"]) == b"a\\tb\\\\c\t1\n"


def test_copy_text_rows_are_split_on_the_copy_delimiter():
    """COPY ... TO STDOUT (DELIMITER '|'): fields are where the server put them, so column
    rules reach them; a delimiter inside a value is backslash-escaped on the way out too."""
    m = load_masking({"rules": [{"column": "last_name", "strategy": "fixed:X|Y"}]}).for_session("s", {}, "db")
    columns = ["customers.id", "customers.last_name"]
    assert m.mask_copy_line(b"7|Smith\n", "text", columns, "|") == b"7|X\\|Y\n"
    assert m.mask_copy_line(b"7|Sm\\|ith\n", "text", columns, "|") == b"7|X\\|Y\n"   # an escaped | is data
    assert m.mask_copy_line(b"7\tSmith\n", "text", columns) == b"7\tX|Y\n"          # the default: tab


def test_copy_of_an_unqualified_table_meets_schema_qualified_rules():
    """`COPY customers (id, ssn)` names no schema: a public.customers.ssn rule still masks it
    (over-masking a same-named table elsewhere is the safe side)."""
    m = load_masking({"rules": [{"column": "public.customers.ssn", "strategy": "redact"}]}).for_session("s", {}, "db")
    assert m.mask_copy_line(b"1\t123-45-6789\n", "text", ["customers.id", "customers.ssn"]) == b"1\t[REDACTED]\n"
    assert m.mask_copy_line(b"1\t123-45-6789\n", "text", ["public.customers.id", "public.customers.ssn"]) == \
        b"1\t[REDACTED]\n"
    assert m.mask_copy_line(b"1\tx\n", "text", ["orders.id", "orders.ssn"]) == b"1\tx\n"


def test_copy_csv_rows_keep_nulls_quotes_and_untouched_fields(m):
    line = b'1,"Doe, Jane",123-45-6789,,"",jane@x.io\n'
    assert m.mask_copy_line(line, "csv") == b'1,"Doe, Jane","[REDACTED]",,"","[REDACTED]"\n'
    quoted = b'3,"card ""4111 1111 1111 1111"" on file"\n'
    assert m.mask_copy_line(quoted, "csv") == b'3,"card ""[REDACTED]"" on file"\n'


def test_copy_binary_is_refused(m):
    with pytest.raises(MaskingRefused):
        m.mask_copy_line(b"PGCOPY\n\xff\r\n\x00", "binary")


def test_json_body_by_key_path_and_detectors(m):
    body = json.dumps({"customer": {"name": "Jane", "card_number": "4111 1111 1111 1111",
                                    "contacts": [{"email": "jane@x.io"}, {"email": "j@y.io", "note": "ssn 123-45-6789"}]},
                       "token": "s3cr3t", "count": 2}).encode()
    out, counts = m.mask_json_body(body, "application/json; charset=utf-8")
    doc = json.loads(out)
    assert doc["customer"]["card_number"] == "**** **** **** 1111"
    assert doc["customer"]["contacts"][0]["email"] == "****@x.io"
    assert doc["customer"]["contacts"][1]["note"] == "ssn [REDACTED]"
    assert doc["token"].startswith("h:") and doc["count"] == 2 and doc["customer"]["name"] == "Jane"
    assert counts == {"cards-in-json": 1, "owner-email": 2, "scan": 1, "token": 1}


def test_json_body_unchanged_is_returned_as_is_and_other_types_untouched(m):
    body = b'{"ok": true}'
    assert m.mask_json_body(body, "application/json")[0] is body
    png = b"\x89PNG 123-45-6789"
    assert m.mask_json_body(png, "image/png") == (png, {})


def test_text_and_broken_json_bodies_use_detectors(m):
    assert m.mask_json_body(b"ssn=123-45-6789", "text/plain")[0] == b"ssn=[REDACTED]"
    assert m.mask_json_body(b'{"a": "123-45-6789"', "application/json")[0] == b'{"a": "[REDACTED]"'


# -- which HTTP bodies are masked (the HTTP enforcer holds back exactly what http_body_kind names) --

def test_http_body_kind_is_one_definition_for_every_json_and_text_type():
    from enforcer.masking.engine import BODY_JSON, BODY_JSON_LINES, BODY_TEXT, BODY_UNTYPED, http_body_kind
    kinds = {ct: http_body_kind(ct) for ct in (
        "application/json", "Application/JSON; charset=utf-8", "application/problem+json",
        "application/vnd.api.json", "text/json", "application/x-ndjson", "application/jsonl",
        "application/json-seq", "text/csv", "text/event-stream", "text/plain; charset=latin-1",
        None, "", "  ", "garbage", "image/png", "application/octet-stream")}
    assert kinds == {
        "application/json": BODY_JSON, "Application/JSON; charset=utf-8": BODY_JSON,
        "application/problem+json": BODY_JSON, "application/vnd.api.json": BODY_JSON, "text/json": BODY_JSON,
        "application/x-ndjson": BODY_JSON_LINES, "application/jsonl": BODY_JSON_LINES,
        "application/json-seq": BODY_JSON_LINES, "text/csv": BODY_TEXT, "text/event-stream": BODY_TEXT,
        "text/plain; charset=latin-1": BODY_TEXT, None: BODY_UNTYPED, "": BODY_UNTYPED, "  ": BODY_UNTYPED,
        "garbage": BODY_UNTYPED, "image/png": None, "application/octet-stream": None}


def test_vendor_json_and_json_lines_bodies_are_masked_by_key_rules(m):
    doc = json.dumps({"card": "4111 1111 1111 1111", "name": "Jane"}).encode()
    out, counts = m.mask_json_body(doc, "application/vnd.api.json")
    assert json.loads(out)["card"] == "**** **** **** 1111" and counts == {"cards-in-json": 1}
    lines = b'{"id": 1, "card": "4111 1111 1111 1111"}\r\n{"id": 2, "token": "t"}\n\nnot json 123-45-6789\n'
    out, counts = m.mask_json_body(lines, "application/x-ndjson")
    first, second, empty, text, end = out.split(b"\n")
    assert json.loads(first)["card"] == "**** **** **** 1111"
    assert json.loads(second)["token"].startswith("h:") and (empty, end) == (b"", b"")
    assert text == b"not json [REDACTED]"
    assert counts == {"cards-in-json": 1, "token": 1, "detectors": 1}
    seq = b'\x1e{"card": "4111 1111 1111 1111"}\n'
    assert m.mask_json_body(seq, "application/json-seq")[0] == b'\x1e{"card":"**** **** **** 1111"}\n'
    clean = b'{"id": 1}\n{"id": 2}\n'
    assert m.mask_json_body(clean, "application/x-ndjson") == (clean, {})


def test_a_body_without_content_type_is_read_as_json_or_else_as_text(m):
    doc = b'{"card": "4111 1111 1111 1111"}'
    assert json.loads(m.mask_json_body(doc, "")[0]) == {"card": "**** **** **** 1111"}
    assert json.loads(m.mask_json_body(doc, None)[0]) == {"card": "**** **** **** 1111"}
    # not UTF-8 (latin-1 text, binary): detected values are masked, every other byte is kept
    latin = "caf\xe9 ssn 123-45-6789 \xff\x00".encode("latin-1")
    assert m.mask_json_body(latin, "")[0] == "caf\xe9 ssn [REDACTED] \xff\x00".encode("latin-1")
    assert m.mask_json_body(b"\x89PNG\x00\x01", "")[0] == b"\x89PNG\x00\x01"


def test_only_rules_that_act_on_http_bodies_make_a_session_mask_them():
    column_only = load_masking({"rules": [{"column": "ssn"}, {"column": "notes", "detectors": ["card"]}]})
    m = column_only.for_session("svc", {}, "api")
    assert m is not None and not m.masks_http_bodies          # Postgres columns only
    assert m.http_body_kind("text/csv") is None and m.http_body_kind("application/json") is None
    for rule in ({"json_key": "card"}, {"json_path": "$.a.b"}, {"scan_all_text": True}):
        m = load_masking({"rules": [{"column": "ssn"}, rule]}).for_session("svc", {}, "api")
        assert m.masks_http_bodies and m.http_body_kind("application/json") == "json", rule
        assert m.http_body_kind("text/csv") == "text" and m.http_body_kind(None) == "untyped"
        assert m.http_body_kind("image/png") is None
    # key rules and no detector at all: text cannot change, so it is not held back
    keys_only = load_masking({"record_detectors": [], "rules": [{"json_key": "card"}]}).for_session("svc", {}, "api")
    assert keys_only.http_body_kind("text/csv") is None and keys_only.http_body_kind("text/json") == "json"
