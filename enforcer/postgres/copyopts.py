"""What a COPY ... TO STDOUT statement asks for: row format, delimiter, quote, column names (or
the query of a COPY (query) TO).

The masking point needs these to split each CopyData row into fields. pglast normalises the
legacy spellings (`WITH CSV HEADER`, `DELIMITER '|'`) into the same option list as the
parenthesised form, so one reading covers both. Pure: no I/O.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Optional

from pglast import parser as _pg


@dataclasses.dataclass(frozen=True)
class CopyOptions:
    format: str = "text"                   # text | csv | binary
    delimiter: str = "\t"                  # the COPY's DELIMITER; tab (text) or comma (csv) by default
    quote: str = '"'
    columns: Optional[tuple] = None   # "schema.table.column" or "table.column" when listed
    # COPY (query) TO: the query's parse tree ({kind: node}), for masking to trace its columns
    query: Optional[dict] = dataclasses.field(default=None, compare=False)


def _sval(node: Optional[dict]) -> Optional[str]:
    if not isinstance(node, dict):
        return None
    inner = node.get("String")
    if isinstance(inner, dict):
        return inner.get("sval")
    return None


def copy_options(sql: Optional[str]) -> CopyOptions:
    """Options of the first COPY in `sql`; defaults (text) when it cannot be read."""
    if not sql:
        return CopyOptions()
    try:
        tree = json.loads(_pg.parse_sql_json(sql))
    except Exception:       # noqa: BLE001 - the server accepted it; detectors still run on text
        return CopyOptions()
    for entry in tree.get("stmts", ()):
        node = entry.get("stmt", {}).get("CopyStmt")
        if node is None:
            continue
        fmt, delimiter, quote = "text", None, '"'
        for opt in node.get("options") or ():
            de = opt.get("DefElem", {})
            name = de.get("defname")
            value = _sval(de.get("arg"))
            if name == "format" and value:
                fmt = value.lower()
            elif name == "delimiter" and value:
                delimiter = value
            elif name == "quote" and value:
                quote = value
        columns = None
        rel = node.get("relation")
        if rel and node.get("attlist"):
            prefix = ".".join(p for p in (rel.get("schemaname"), rel.get("relname")) if p)
            columns = tuple(f"{prefix}.{_sval(a)}" for a in node["attlist"] if _sval(a))
        return CopyOptions(fmt, delimiter or ("," if fmt == "csv" else "\t"), quote, columns,
                           node.get("query") or None)
    return CopyOptions()
