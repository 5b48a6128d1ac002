"""Resolving RowDescription's (table OID, attribute number) to schema.table.column names, and a
view's columns to the table columns they show.

The enforcer runs CATALOG_QUERY, VIEWS_QUERY, FUNCTIONS_QUERY and FUNCTION_OIDS_QUERY on a catalog
connection (a configured catalog DSN) and hands the rows to `catalog_from_rows`; the result is the
`catalog` of `MaskingEngine.for_session`, and names the functions of fast-path calls (protocol
FunctionCall, which gives only an OID) for policy. Pure: the queries are run elsewhere.
"""
from __future__ import annotations

from typing import Iterable, Optional

from .sources import OWN_LABEL, WHOLE_ROW, PlpgsqlDefinition, align, result_sources

CATALOG_QUERY = (
    "SELECT c.oid::int8, a.attnum::int4, n.nspname, c.relname, a.attname "
    "FROM pg_catalog.pg_attribute a "
    "JOIN pg_catalog.pg_class c ON c.oid = a.attrelid "
    "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
    "WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p', 'v', 'm', 'f') "
    "AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'"
)

# views and materialized views: their definitions, read with the statement reader (sources.py)
VIEWS_QUERY = (
    "SELECT c.oid::int8, pg_catalog.pg_get_viewdef(c.oid) "
    "FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
    "WHERE c.relkind IN ('v', 'm') "
    "AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'"
)

# functions written in SQL (`LANGUAGE sql AS $$ ... $$`) and in PL/pgSQL: their bodies, read with
# the statement reader, so a function that returns a table column is masked like the column. A
# PL/pgSQL function comes as its whole definition (the PL/pgSQL parser needs its arguments).
# SQL-standard bodies (BEGIN ATOMIC, RETURN) and other languages are not read: labels and
# detectors apply to them.
FUNCTIONS_QUERY = (
    "SELECT n.nspname, p.proname, "
    "CASE WHEN l.lanname = 'sql' THEN p.prosrc ELSE pg_catalog.pg_get_functiondef(p.oid) END, l.lanname "
    "FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace "
    "JOIN pg_catalog.pg_language l ON l.oid = p.prolang "
    "WHERE ((l.lanname = 'sql' AND p.prosrc <> '') OR (l.lanname = 'plpgsql' AND p.prokind = 'f')) "
    "AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'"
)

# every plain function by OID, with its argument and result types: a FunctionCall names its
# function by OID only, so this is how policy, the records and masking learn which function it calls
FUNCTION_OIDS_QUERY = (
    "SELECT p.oid::int8, n.nspname, p.proname, p.proargtypes::pg_catalog.oid[], p.prorettype::int8 "
    "FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace "
    "WHERE p.prokind = 'f'"
)

_VIEW_DEPTH = 8      # views over views followed this deep


class Catalog:
    """lookup(table_oid, attnum) -> 'schema.table.column' or None; `sources(oid, attnum)`: for a
    view's column, the (table, column) pairs it shows (through views over views), else None;
    `function_bodies(name)`: the bodies of the functions called `name` (qualified or not): SQL
    texts, and PlpgsqlDefinition for PL/pgSQL functions; `function_by_oid(oid)`: (schema, name,
    argument type OIDs, result type OID) of a plain function, else None."""

    def __init__(self, rows: Iterable[tuple], views: Iterable[tuple] = (), functions: Iterable[tuple] = (),
                 function_oids: Iterable[tuple] = ()):
        self._by_function_oid: dict[int, tuple[str, str, tuple[int, ...], int]] = {
            int(oid): (schema, name, tuple(int(t) for t in (argtypes or ())), int(rettype))
            for oid, schema, name, argtypes, rettype in function_oids}
        self._functions: dict[str, tuple] = {}
        for schema, name, body, *language in functions:
            if language and language[0] == "plpgsql":
                body = PlpgsqlDefinition(body)
            for key in (f"{schema}.{name}", name):
                self._functions[key] = self._functions.get(key, ()) + (body,)
        self.names: dict[tuple[int, int], str] = {}
        columns: dict[int, dict[int, str]] = {}
        relname: dict[int, str] = {}
        for oid, attnum, schema, table, column in rows:
            self.names[(int(oid), int(attnum))] = f"{schema}.{table}.{column}"
            columns.setdefault(int(oid), {})[int(attnum)] = column
            relname[int(oid)] = table
        # view name -> {column name: sources}, read from each definition
        self._view_columns: dict[str, dict[str, frozenset]] = {}
        self._by_attnum: dict[tuple[int, int], frozenset] = {}
        for oid, definition in views:
            oid = int(oid)
            cols = columns.get(oid)
            if not cols or not definition:
                continue
            ordered = [cols[k] for k in sorted(cols)]
            aligned = align(result_sources(definition), len(ordered))
            if aligned is None:
                # a definition this reader cannot follow: every column of it may show anything
                aligned = (frozenset({(None, WHOLE_ROW)}),) * len(ordered)
            named = {name: frozenset((t, name if c == OWN_LABEL else c) for t, c in srcs)
                     for name, srcs in zip(ordered, aligned)}
            self._view_columns[relname[oid]] = named
            for attnum, name in zip(sorted(cols), ordered):
                self._by_attnum[(oid, attnum)] = named[name]

    def function_bodies(self, name: str) -> tuple:
        return self._functions.get(name, ())

    def function_by_oid(self, oid: int) -> Optional[tuple[str, str, tuple[int, ...], int]]:
        return self._by_function_oid.get(oid)

    def size_summary(self) -> str:
        return f"{len(self.names)} columns, {len(self._view_columns)} views, {len(self._by_function_oid)} functions"

    def __call__(self, table_oid: int, attnum: int) -> Optional[str]:
        return self.names.get((table_oid, attnum))

    def sources(self, table_oid: int, attnum: int) -> Optional[frozenset]:
        found = self._by_attnum.get((table_oid, attnum))
        if found is None:
            return None
        out: set = set()
        todo = [(pair, 0) for pair in found]
        while todo:
            (table, column), depth = todo.pop()
            inner = self._view_columns.get(table) if depth < _VIEW_DEPTH else None
            if inner is None:
                out.add((table, column))
            elif column == WHOLE_ROW:
                todo.extend((pair, depth + 1) for srcs in inner.values() for pair in srcs)
            else:
                todo.extend((pair, depth + 1) for pair in inner.get(column, {(table, column)}))
        return frozenset(out)


def catalog_from_rows(rows: Iterable[tuple], views: Iterable[tuple] = (), functions: Iterable[tuple] = (),
                      function_oids: Iterable[tuple] = ()) -> Catalog:
    """rows of CATALOG_QUERY (and of VIEWS_QUERY, FUNCTIONS_QUERY and FUNCTION_OIDS_QUERY) -> the
    catalog of the session maskers and of fast-path calls."""
    return Catalog(rows, views, functions, function_oids)
