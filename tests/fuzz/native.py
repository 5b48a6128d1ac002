"""Differential fuzz targets for the C cores, each against the Python code it stands in for.

- native_lanes_mutated: a Postgres session past its first execution (record templates built),
  fed mutated client and server bytes, cut anywhere. The legs' C Reader and the session's C
  lanes must do exactly what the Python handlers and loops do: the same records (fields in
  order), the same bytes to each leg, the same end of the connection, the same session state.
  Some inputs also make a record refused mid-stream (spool full).
- native_rows_mutated: masking plans from a real masking config over mutated DataRow runs
  (lengths that lie, short rows, foreign messages): `_pgrows` against RowPlan.py_mask_rows,
  the same results or exceptions and the same plan state.

The property is sameness, so a C slip that still produces well-formed bytes is caught too.
`python -m tests.sanitize` runs these with the C modules built under ASan and UBSan, which
adds the other property: no out-of-bounds access, use after free or undefined behaviour.
"""
from __future__ import annotations

import random

from enforcer.masking import pgrow
from enforcer.postgres import protocol as P
from tests.fuzz.common import PropertyViolation, Stats, mutate, run_one, split_points, timed
from tests.fuzz.pg import boundaries_of
from tests.unit import test_pg_lanes as lanes
from tests.unit import test_pgrow_native as rows


# -- the Postgres steady state ---------------------------------------------------------------------
def _client_pieces() -> list[bytes]:
    return [
        lanes.execution(b"42"), lanes.execution(b"43", "p1"), lanes.execution("é".encode()),
        P.build_bind("", "s1", [None], param_formats=[1], result_formats=[1]) + P.build_execute("", 0) + P.SYNC,
        P.build_bind("p2", "s1", [b"7"]) + P.build_execute("p2", 1) + P.build_flush(),
        P.build_execute("p2", 0) + P.build_close("P", "p2") + P.SYNC,
        P.build_query("SELECT 1"), P.build_query("SELECT 1; SELECT 2"), P.build_query("DELETE FROM forbidden"),
        P.build_parse("", "DELETE FROM forbidden") + P.build_bind("", "") + P.build_execute("", 0) + P.SYNC,
        P.build_parse("s2", "SELECT $1::int", [23]) + P.build_describe("S", "s2") + P.SYNC,
        P.build_describe("P", "") + P.build_close("S", "s2") + P.SYNC,
    ]


def _server_pieces() -> list[bytes]:
    return [
        lanes.answer(0), lanes.answer(1), lanes.answer(3),
        P.build_bind_complete() + P.build_data_row([None, b"x"]) + P.build_command_complete("SELECT 1"),
        P.build_portal_suspended(), P.build_ready_for_query("T"), P.build_ready_for_query("I"),
        P.build_error_response("42601", "boom") + P.build_ready_for_query("E"),
        P.build_notice_response({"S": "NOTICE", "C": "00000", "M": "hi"}),
        P.build_parameter_status("TimeZone", "UTC"), P.build_notification(7, "chan", "payload"),
        P.build_parse_complete() + P.build_parameter_description([23]) + P.build_row_description(lanes.FIELDS),
        P.build_close_complete() + P.build_no_data() + P.build_empty_query_response(),
    ]


CLIENT_PIECES = _client_pieces()
SERVER_PIECES = _server_pieces()
WARM = [("c", lanes.PREPARE), ("s", lanes.PREPARED_REPLY), ("c", lanes.execution(b"1")), ("s", lanes.answer(1))]


def lanes_steps(rng: random.Random) -> list:
    """The warm-up, then rounds of client then server bytes, mutated or not, cut into reads."""
    steps = list(WARM)
    for _ in range(rng.randint(1, 4)):
        for side, pieces in (("c", CLIENT_PIECES), ("s", SERVER_PIECES)):
            data = b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 4)))
            if rng.random() < 0.35:     # most rounds stay valid, so later ones reach the lanes
                data = mutate(rng, data, boundaries_of(data), corpus=pieces)
            steps += [(side, chunk) for chunk in split_points(rng, data) if chunk]
    return steps


def check_lanes(steps: list, emit_fails_at: int) -> bool:
    """The Reader against the handlers, then the feed lanes against the Python loops.
    True if the connection ended (the documented refusal path)."""
    with_reader = lanes.run_shell(steps, True, emit_fails_at)
    with_handlers = lanes.run_shell(steps, False, emit_fails_at)
    for name, got, want in zip(("records", "bytes to the server", "bytes to the client", "outcome",
                                "client reads", "session state"), with_reader, with_handlers):
        if got != want:
            raise PropertyViolation(f"the C Reader and the Python handlers differ in {name}: "
                                    f"{_first_difference(got, want)}")
    lanes._templates.clear()
    want = lanes.replay(steps, False)
    lanes._templates.clear()
    got = lanes.replay(steps, True, inline=True)
    if got != want:
        raise PropertyViolation(f"the C lanes and the Python loops differ: {_first_difference(got, want)}")
    return with_handlers[3] is not None


def _first_difference(got, want) -> str:
    if isinstance(got, (list, tuple)) and isinstance(want, (list, tuple)):
        for i, (a, b) in enumerate(zip(got, want)):
            if a != b:
                return f"at {i}: C {a!r:.200} / Python {b!r:.200}"
        return f"lengths {len(got)} / {len(want)}"
    return f"C {got!r:.200} / Python {want!r:.200}"


# -- masking rows ----------------------------------------------------------------------------------
def rows_run(rng: random.Random):
    """Fields with masked and clear columns, and a run of DataRows for them, mutated."""
    ncols = rng.randint(1, 7)
    fields = []
    for i in range(ncols):
        type_oid, fmt = rng.choice(rows.TYPES)
        fields.append(P.FieldDescription(rng.choice(rows.NAMES), 16400, i + 1, type_oid, -1, -1, fmt))
    messages = []
    for _ in range(rng.randint(1, 10)):
        if rng.random() < 0.1:
            messages.append(rows.COMMAND_COMPLETE)
            continue
        width = ncols if rng.random() < 0.85 else rng.randint(0, ncols + 1)
        messages.append(rows.data_row([_row_value(rng) for _ in range(width)]))
    wire = b"".join(messages)
    if rng.random() < 0.8:
        wire = mutate(rng, wire, _row_length_words(wire), corpus=messages)
    cuts = sorted(rng.sample(range(len(wire) + 1), min(len(wire) + 1, rng.randint(0, 3))))
    return fields, wire, cuts, rng.choice((1, 2, 4096))


def _row_value(rng: random.Random) -> bytes | None:
    pick = rng.random()
    if pick < 0.1:
        return None
    if pick < 0.8:
        return rng.choice(rows.ENGINE_POOL)
    return rng.randbytes(rng.randint(0, 12))


def _row_length_words(wire: bytes) -> list[int]:
    """Where the message lengths and the column lengths of a well-formed run are."""
    out, pos = [], 0
    while pos + 7 <= len(wire):
        length = int.from_bytes(wire[pos + 1:pos + 5], "big")
        out.append(pos + 1)
        if wire[pos:pos + 1] == b"D":
            at, left = pos + 7, int.from_bytes(wire[pos + 5:pos + 7], "big")
            while left > 0 and at + 4 <= pos + 1 + length:
                out.append(at)
                size = int.from_bytes(wire[at:at + 4], "big", signed=True)
                at += 4 + max(size, 0)
                left -= 1
        pos += 1 + length
    return out


def check_rows(run) -> bool:
    """True if the plan was refused or the run raised (in both, alike)."""
    fields, wire, cuts, entries = run
    with rows.cache_limits(entries, 256):
        try:
            py, c = rows.engine_plan(fields), rows.engine_plan(fields)
        except pgrow.MaskingRefused:
            return True
        if py is None:
            return True
        want = rows.drive(py.py_mask_rows, wire, 0, cuts)
        got = rows.drive(c.native_mask_rows, wire, 0, cuts)
        if got != want:
            raise PropertyViolation(f"_pgrows and the Python loop differ: {_first_difference(got, want)}")
        if rows.state(c) != rows.state(py):
            raise PropertyViolation(f"plan state differs: {_first_difference(rows.state(c), rows.state(py))}")
        return any(r[0] != "ok" for r in want)


def mutation_target(name: str, n: int, seed: int) -> Stats:
    rng = random.Random(seed)
    stats = Stats(name)
    with timed(stats):
        for _ in range(n):
            if name == "native_lanes_mutated":
                steps = lanes_steps(rng)
                fails_at = rng.randint(0, 12) if rng.random() < 0.15 else -1
                run_one(stats, lambda s: check_lanes(s, fails_at), steps)
            elif name == "native_rows_mutated":
                run_one(stats, check_rows, rows_run(rng))
            else:
                raise ValueError(name)
    return stats
