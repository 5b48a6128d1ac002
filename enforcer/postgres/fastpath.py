"""The fast-path function calls (protocol FunctionCall) that policy can decide. A FunctionCall
names its function by OID only, so each call is decided and recorded as the SQL call it equals
(`SELECT pg_catalog.lo_open($1, $2)`) once its function is known:

- PostgreSQL's built-in large-object functions, which libpq's and the JDBC driver's lo_* calls use
  (psql's \\lo_import, \\lo_export, \\lo_unlink). Their OIDs are fixed in every server's catalog
  (pg_proc.dat) and below the first OID a database object can get (16384), so they are known
  exactly, with no catalog.
- Any other plain function, named by the target's catalog (`catalog_dsn`, FUNCTION_OIDS_QUERY):
  `SELECT "public"."add_one"($1)`.

An OID neither names (no catalog, or a function created since it was last read) stays refused,
as does a call with a number of arguments its function does not take (the server would refuse
it too)."""
from __future__ import annotations

from typing import Callable, Optional

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


def is_large_object_call(function_oid: int) -> bool:
    return function_oid in _LARGE_OBJECT_FUNCTIONS


def known_call(function_oid: int, nargs: int,
               function_by_oid: Optional[Callable[[int], Optional[tuple]]] = None,
               ) -> Optional[tuple[str, tuple[int, ...]]]:
    """(the SQL text the call equals, its argument types), or None for a call policy cannot see:
    an OID neither the large-object list nor `function_by_oid` (the catalog's: OID -> (schema,
    name, argument types, result type)) names, or arguments the function does not take."""
    entry = _LARGE_OBJECT_FUNCTIONS.get(function_oid)
    if entry is not None:
        name, types = entry
        qualified = f"pg_catalog.{name}"
    else:
        found = function_by_oid(function_oid) if function_by_oid is not None else None
        if found is None:
            return None
        schema, name, types = found[:3]
        qualified = f"{quote_identifier(schema)}.{quote_identifier(name)}"
    if len(types) != nargs:
        return None
    return f"SELECT {qualified}({', '.join(f'${i + 1}' for i in range(nargs))})", tuple(types)


def quote_identifier(name: str) -> str:
    """Always quoted: the name is the catalog's, exactly (case, keywords and all)."""
    return '"' + name.replace('"', '""') + '"'
