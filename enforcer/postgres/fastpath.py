"""The fast-path function calls (protocol FunctionCall) that policy can decide: PostgreSQL's
built-in large-object functions, which libpq's and the JDBC driver's lo_* calls use (psql's
\\lo_import, \\lo_export, \\lo_unlink). A FunctionCall names its function by OID only; the
built-in functions' OIDs are fixed in every server's catalog (pg_proc.dat) and below the first
OID a database object can get (16384), so these calls are known exactly, and each is decided
and recorded as the SQL call it is: `SELECT pg_catalog.lo_open($1, $2)`. Any other OID
(a function the workload created, or a built-in not listed here) stays refused."""
from __future__ import annotations

from typing import Optional

BYTEA = 17

# function OID -> (name in pg_catalog, argument type OIDs); verified against PostgreSQL 15
_LARGE_OBJECT_FUNCTIONS: dict[int, tuple[str, tuple[int, ...]]] = {
    715: ("lo_create", (26,)),
    952: ("lo_open", (26, 23)),
    953: ("lo_close", (23,)),
    954: ("loread", (23, 23)),
    955: ("lowrite", (23, BYTEA)),
    956: ("lo_lseek", (23, 23, 23)),
    957: ("lo_creat", (23,)),
    958: ("lo_tell", (23,)),
    964: ("lo_unlink", (26,)),
    1004: ("lo_truncate", (23, 23)),
    3170: ("lo_lseek64", (23, 20, 23)),
    3171: ("lo_tell64", (23,)),
    3172: ("lo_truncate64", (23, 20)),
}


def known_call(function_oid: int, nargs: int) -> Optional[tuple[str, tuple[int, ...]]]:
    """(the SQL text the call equals, its argument types), or None for a call policy cannot see:
    an unknown OID, or arguments the function does not take (the server would refuse it too)."""
    entry = _LARGE_OBJECT_FUNCTIONS.get(function_oid)
    if entry is None or len(entry[1]) != nargs:
        return None
    name, types = entry
    return f"SELECT pg_catalog.{name}({', '.join(f'${i + 1}' for i in range(nargs))})", types
