"""Reading a Postgres target's catalog through its `catalog_dsn`: the columns, views and function
bodies masking follows, and the function OIDs that name fast-path calls for policy. The agent
re-reads it every minute; `warden-agent check` reads it once to show that it can."""
from __future__ import annotations

CONNECT_TIMEOUT_S = 10


def load_catalog(dsn: str):
    import psycopg

    from enforcer.masking.catalog import (CATALOG_QUERY, FUNCTION_OIDS_QUERY, FUNCTIONS_QUERY, VIEWS_QUERY,
                                          catalog_from_rows)
    with psycopg.connect(dsn, connect_timeout=CONNECT_TIMEOUT_S) as conn:
        return catalog_from_rows(conn.execute(CATALOG_QUERY).fetchall(), conn.execute(VIEWS_QUERY).fetchall(),
                                 conn.execute(FUNCTIONS_QUERY).fetchall(),
                                 conn.execute(FUNCTION_OIDS_QUERY).fetchall())


def check_catalogs(cfg) -> tuple[list[str], list[str]]:
    """(problems, notes) for each Postgres target's catalog_dsn: read it as the agent will. The
    DSN itself is never shown (it may hold a password)."""
    problems: list[str] = []
    notes: list[str] = []
    for target in cfg.targets:
        dsn = target.options.get("catalog_dsn") if target.protocol == "postgres" else None
        if not dsn:
            continue
        try:
            catalog = load_catalog(dsn)
        except Exception as exc:
            problems.append(f"target {target.name}: its catalog_dsn cannot be read ({_first_line(exc)}); "
                            f"until it can, schema.table.column masking rules match by the table names "
                            f"statements use and fast-path calls of functions other than the large-object "
                            f"ones are refused. Check the DSN's host, port, database and credentials "
                            f"(`psql \"<catalog_dsn>\"` from this host should connect)")
            continue
        notes.append(f"target {target.name}: catalog_dsn readable ({catalog.size_summary()})")
    return problems, notes


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
