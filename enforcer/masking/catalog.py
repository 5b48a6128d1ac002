"""Resolving RowDescription's (table OID, attribute number) to schema.table.column names.

The enforcer runs CATALOG_QUERY on a catalog connection (brokered credentials or a configured
catalog DSN) and hands the rows to `catalog_from_rows`; the result is the `catalog` callable of
`MaskingEngine.for_session`. Pure: the query is run elsewhere.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

CATALOG_QUERY = (
    "SELECT c.oid::int8, a.attnum::int4, n.nspname, c.relname, a.attname "
    "FROM pg_catalog.pg_attribute a "
    "JOIN pg_catalog.pg_class c ON c.oid = a.attrelid "
    "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
    "WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p', 'v', 'm', 'f') "
    "AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'"
)


def catalog_from_rows(rows: Iterable[tuple]) -> Callable[[int, int], Optional[str]]:
    """rows of CATALOG_QUERY -> lookup(table_oid, attnum) -> 'schema.table.column' or None."""
    names = {(int(oid), int(attnum)): f"{schema}.{table}.{column}" for oid, attnum, schema, table, column in rows}

    def lookup(table_oid: int, attnum: int) -> Optional[str]:
        return names.get((table_oid, attnum))

    return lookup
