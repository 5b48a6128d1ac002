"""Protocol FunctionCall (the fast-path interface), as bytes: the built-in large-object functions
libpq's lo_* calls use, and with a target catalog any function it names, are decided and recorded
as the SQL calls they are and forwarded as sent when allowed; any other function OID, or arguments
the function does not take, is refused with 42501 raised by the server itself."""
import struct

import pytest

from enforcer.postgres import fastpath
from enforcer.postgres import protocol as P
from enforcer.postgres import session as S
from enforcer.postgres.session import Verdict
from tests.unit.test_pg_session import Driver, ready_driver

Z_IDLE = P.build_ready_for_query("I")
LO_OPEN, LO_CLOSE, LOREAD, LOWRITE, LO_UNLINK, NOW = 952, 953, 954, 955, 964, 1299
# functions a target's catalog names (fastpath.known_call's function_by_oid)
ADD_ONE, TAG_BLOB, MIXED_CASE, SSN_OF = 16500, 16501, 16502, 16503
CATALOG = {ADD_ONE: ("public", "add_one", (23,), 23), TAG_BLOB: ("app", "tag_blob", (17, 25), 25),
           MIXED_CASE: ("Sales", 'Odd"Name', (), 2278), SSN_OF: ("public", "ssn_of", (23,), 25)}


def int4(v: int) -> bytes:
    return struct.pack("!i", v)


def allow_functions(req):
    return [Verdict(True, req.sql, action="pg:function", kind="SelectStmt", decision="allow",
                    policy_ids=("large-objects",))]


def deny_functions(req):
    return [Verdict(False, req.sql, action="pg:function", kind="SelectStmt", decision="deny",
                    policy_ids=("no-large-objects",), reason="large objects are not for this service")]


def ready(decider=allow_functions) -> Driver:
    return ready_driver(decider=decider)


def records(d: Driver, event_type: str) -> list:
    return [f for t, f in d.events if t == event_type]


def test_an_allowed_large_object_call_is_forwarded_as_sent_and_recorded_as_sql(lane):
    d = ready()
    call = P.build_function_call(LO_OPEN, [struct.pack("!I", 16385), int4(0x40000)], [1], result_format=1)
    d.client(call)
    assert d.to_server == call
    assert [r.sql for r in d.requests] == ["SELECT pg_catalog.lo_open($1, $2)"]
    (st,) = records(d, "pg.statement")
    assert (st["text"], st["protocol"], st["params"], st["action"], st["decision"]) == (
        "SELECT pg_catalog.lo_open($1, $2)", "fastpath", ["16385", "262144"], "pg:function", "allow")
    d.server(P.build_function_call_response(int4(0)) + Z_IDLE)
    (res,) = records(d, "pg.result")
    assert (res["command_tag"], res["rows"], res["bytes"], res["sqlstate"], res["statement_index"]) == (
        None, 0, 4, None, st["statement_index"])
    assert d.to_client == P.build_function_call_response(int4(0)) + Z_IDLE


def test_data_written_is_recorded_by_its_size_and_read_data_counted(lane):
    d = ready()
    d.client(P.build_function_call(LOWRITE, [int4(0), b"secret file contents"], [1, 1]))
    (st,) = records(d, "pg.statement")
    assert st["params"] == ["0", "[20 bytes]"]
    d.server(P.build_function_call_response(int4(20)) + Z_IDLE)
    d.client(P.build_function_call(LOREAD, [int4(0), int4(8192)], [1]))
    d.server(P.build_function_call_response(b"x" * 300) + Z_IDLE)
    assert [r["bytes"] for r in records(d, "pg.result")] == [4, 300]


def test_a_denied_call_never_reaches_the_server_and_aborts_a_transaction(lane):
    d = ready(deny_functions)
    d.client(P.build_query("BEGIN"))
    d.server(P.build_command_complete("BEGIN") + P.build_ready_for_query("T"))
    d.reset()
    d.client(P.build_function_call(LO_UNLINK, [struct.pack("!I", 16385)], [1]))
    assert b"F" not in [t[:1] for t, _ in P.split_messages(d.to_server)[0]]
    (query,) = P.split_messages(d.to_server)[0]
    assert query[0] == b"Q" and b"42501" in query[1] and b"large objects are not for this service" in query[1]
    (st,) = records(d, "pg.statement")
    assert (st["text"], st["decision"], st["params"]) == ("SELECT pg_catalog.lo_unlink($1)", "deny", ["16385"])
    d.server(P.build_error_response("42501", "permission denied by Warden") + P.build_ready_for_query("E"))
    (res,) = records(d, "pg.result")
    assert res["sqlstate"] == "42501"
    assert d.s.transaction_status == "E"


def test_a_call_waiting_for_approval_holds_what_follows():
    d = ready()
    d.on_decide = lambda request, last: None          # not answered yet
    d.s.decide = lambda text, **kw: None              # the inline decider asks for an approval
    call = P.build_function_call(LO_CLOSE, [int4(0)], [1])
    d.client(call + P.build_query("SELECT 1"))
    assert d.to_server == b"" and [r.sql for r in d.requests] == ["SELECT pg_catalog.lo_close($1)"]
    assert (d.requests[0].protocol, d.requests[0].params, d.requests[0].statement_index) == ("fastpath", ["0"], 1)
    d._run(d.s.resume(allow_functions(d.requests[0])))
    assert d.to_server.startswith(call)


@pytest.mark.parametrize("oid, args, catalog", [
    (NOW, [], None),                             # a built-in policy cannot see by OID here
    (16500, [b"x"], None),                       # a function the workload created, no catalog
    (LO_OPEN, [int4(1)], None),                  # lo_open takes two arguments
    (16999, [int4(1)], CATALOG.get),             # not in the catalog (created since it was read)
    (ADD_ONE, [int4(1), int4(2)], CATALOG.get),  # add_one takes one argument
])
def test_any_other_call_is_refused_as_before(lane, oid, args, catalog):
    d = ready_driver(decider=allow_functions, function_by_oid=catalog)
    d.client(P.build_function_call(oid, args, [1]))
    assert not d.requests
    (st,) = records(d, "pg.statement")
    assert (st["kind"], st["decision"]) == ("FunctionCall", "deny") and "policy cannot see" in st["reason"]
    assert b"42501" in d.to_server and not d.to_server.startswith(b"F")


def test_an_error_of_the_call_is_its_result(lane):
    d = ready()
    d.client(P.build_function_call(LO_OPEN, [struct.pack("!I", 999), int4(0x40000)], [1]))
    d.server(P.build_error_response("42704", "large object 999 does not exist") + Z_IDLE)
    (res,) = records(d, "pg.result")
    assert (res["sqlstate"], res["error"]) == ("42704", "large object 999 does not exist")


def test_the_known_calls_are_the_large_object_functions_only():
    assert fastpath.known_call(LO_OPEN, 2) == ("SELECT pg_catalog.lo_open($1, $2)", (26, 23))
    assert fastpath.known_call(LOWRITE, 2)[1] == (23, fastpath.BYTEA)
    assert fastpath.known_call(NOW, 0) is None and fastpath.known_call(LO_OPEN, 3) is None
    assert all(oid < 16384 for oid in fastpath._LARGE_OBJECT_FUNCTIONS)
    assert S.DecisionRequest("x", "fastpath", None).protocol == "fastpath"


def test_cedar_decides_the_calls_as_the_dangerous_functions_they_are():
    """Large-object functions are on the classifier's dangerous list (data outside every table):
    a policy must permit pg:function for them; reading tables is not enough."""
    from enforcer.policy.engine import PolicyEngine
    reads = ('@id("reads")\npermit (principal == Service::"svc", action == Action::"pg:select", '
             'resource in Target::"db");\n')
    functions = ('@id("large-objects")\npermit (principal == Service::"svc", action == Action::"pg:function", '
                 'resource in Target::"db");\n')
    sql, _ = fastpath.known_call(LOWRITE, 2)
    (sd,) = PolicyEngine.from_text(reads).decide_sql("svc", {}, "db", sql)
    assert (sd.statement.action, sd.decision.kind) == ("pg:function", "deny")
    (sd,) = PolicyEngine.from_text(reads + functions).decide_sql("svc", {}, "db", sql)
    assert (sd.decision.kind, sd.decision.policy_ids) == ("allow", ("large-objects",))


def test_a_call_with_no_decision_does_not_run(lane):
    d = ready(lambda req: [])
    d.s.decide = None                                  # decided through DECIDE, answered with nothing
    d.client(P.build_function_call(LO_CLOSE, [int4(0)], [1]))
    (st,) = records(d, "pg.statement")
    assert st["decision"] == "deny" and b"42501" in d.to_server and not d.to_server.startswith(b"F")


# ---- functions the target's catalog names ---------------------------------------------------------


def test_a_call_the_catalog_names_is_decided_forwarded_and_recorded_as_the_sql_call(lane):
    d = ready_driver(decider=allow_functions, function_by_oid=CATALOG.get)
    call = P.build_function_call(ADD_ONE, [int4(41)], [1])
    d.client(call)
    assert d.to_server == call
    assert [(r.sql, r.protocol, r.params) for r in d.requests] == [('SELECT "public"."add_one"($1)', "fastpath", ["41"])]
    (st,) = records(d, "pg.statement")
    assert (st["text"], st["protocol"], st["params"], st["decision"]) == (
        'SELECT "public"."add_one"($1)', "fastpath", ["41"], "allow")
    d.server(P.build_function_call_response(int4(42)) + Z_IDLE)
    (res,) = records(d, "pg.result")
    assert (res["bytes"], res["sqlstate"], res["statement_index"]) == (4, None, st["statement_index"])
    assert d.to_client == P.build_function_call_response(int4(42)) + Z_IDLE


def test_a_catalog_named_calls_bytea_argument_is_recorded_as_a_bind_parameter_is():
    """Only data written to a large object is recorded by its size; another function's bytea
    argument is a parameter like any other."""
    d = ready_driver(decider=allow_functions, function_by_oid=CATALOG.get)
    d.client(P.build_function_call(TAG_BLOB, [b"\x01\x02", b"label"], [1, 0]))
    (st,) = records(d, "pg.statement")
    assert st["text"] == 'SELECT "app"."tag_blob"($1, $2)' and st["params"] == ["\\x0102", "label"]


def test_catalog_names_are_quoted_exactly():
    assert fastpath.known_call(MIXED_CASE, 0, CATALOG.get)[0] == 'SELECT "Sales"."Odd""Name"()'


def test_a_denied_catalog_named_call_is_refused_by_the_server_itself(lane):
    d = ready_driver(decider=deny_functions, function_by_oid=CATALOG.get)
    d.client(P.build_function_call(ADD_ONE, [int4(1)], [1]))
    (query,) = P.split_messages(d.to_server)[0]
    assert query[0] == b"Q" and b"42501" in query[1]
    (st,) = records(d, "pg.statement")
    assert (st["text"], st["decision"]) == ('SELECT "public"."add_one"($1)', "deny")


def test_under_masking_a_catalog_named_calls_value_is_masked_and_a_large_object_call_is_not(lane):
    """A fast-path result is masked as the one column of the SQL call it equals (here by the
    detectors, as its function has no body to read); large-object contents are not (as for lo_get
    in SQL)."""
    from enforcer.masking import load_masking
    masker = load_masking({"rules": [{"scan_all_text": True, "detectors": ["ssn"]}]}).for_session("svc-a", {}, "db1")
    d = ready_driver(decider=allow_functions, function_by_oid=CATALOG.get, masking=masker)
    call = P.build_function_call(SSN_OF, [int4(1)], [1])
    d.client(call)
    assert d.to_server == call
    d.server(P.build_function_call_response(b"ssn 123-45-6789 on file") + Z_IDLE)
    (value,) = [body for t, body in P.split_messages(d.to_client)[0] if t == b"V"]
    assert b"123-45-6789" not in value and value.startswith(struct.pack("!i", len(value) - 4))
    assert d.to_client.endswith(Z_IDLE)
    (res,) = records(d, "pg.result")
    assert res["bytes"] == len(b"ssn 123-45-6789 on file")
    d.reset()
    d.client(P.build_function_call(ADD_ONE, [int4(1)], [1]))
    d.server(P.build_function_call_response(int4(2)) + Z_IDLE)
    assert d.to_client == P.build_function_call_response(int4(2)) + Z_IDLE
    d.reset()
    d.client(P.build_function_call(LOREAD, [int4(0), int4(64)], [1]))
    d.server(P.build_function_call_response(b"ssn 123-45-6789") + Z_IDLE)
    assert d.to_client == P.build_function_call_response(b"ssn 123-45-6789") + Z_IDLE


def test_under_masking_a_call_whose_result_type_is_unknown_is_refused(lane):
    from enforcer.masking import load_masking
    masker = load_masking({"rules": [{"scan_all_text": True, "detectors": ["ssn"]}]}).for_session("svc-a", {}, "db1")
    d = ready_driver(decider=allow_functions, function_by_oid=lambda oid: CATALOG[oid][:3], masking=masker)
    d.client(P.build_function_call(ADD_ONE, [int4(1)], [1]))
    assert not d.to_server.startswith(b"F") and b"42501" in d.to_server
    assert b"result cannot be masked" in d.to_server
