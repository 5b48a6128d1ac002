"""Classify SQL statements the way Postgres will execute them, using Postgres's own parser.

Each statement of a message becomes a StatementClass: the action policy decides on
("pg:select", "pg:delete", ...), the tables it reads and writes, the functions it calls
and whether an UPDATE/DELETE is restricted by a WHERE clause. The parse goes through
pglast's JSON output (parse_sql_json) and a walk over plain dicts, which is an order of
magnitude faster than building pglast's Python AST.

Rules worth knowing (each one closes a bypass):
- a table is named "schema.table"; unqualified names get schema "public", unquoted names
  are lower-cased by the parser, quoted names keep their case;
- CTE names are not tables, with Postgres's scoping (a non-recursive CTE cannot see
  itself, an inner CTE does not hide an outer real table);
- DML inside a CTE counts: `WITH d AS (DELETE ...) SELECT` is a pg:delete;
- each table gets its own access: `INSERT INTO a SELECT * FROM customers` writes `a`
  (pg:insert) and reads `customers` (pg:select); StatementClass.accesses lists the pairs;
- EXPLAIN ANALYZE is what it executes (Postgres takes the last ANALYZE option, and any value
  but false/off/0 counts); plain EXPLAIN only reads (pg:select);
- COPY of a query is pg:copy_out on every table the query reads;
- COPY to/from PROGRAM or a server file, and calls of the dangerous functions, make the
  statement "pg:function" (dangerous_functions names them: "copy_program", "copy_file");
- TRUNCATE is a pg:delete without WHERE; a WHERE counts only if it compares a column of the
  target with something other than that same column in every OR branch (`WHERE 1=1`,
  `WHERE $1`, `WHERE EXISTS (SELECT 1)`, `WHERE id = id` do not); ON CONFLICT DO UPDATE
  counts as restricted, a MERGE's WHEN MATCHED UPDATE/DELETE when its ON names the target;
- SET ROLE, SET SESSION AUTHORIZATION, SET search_path (which changes what an unqualified
  table name means), UPDATE pg_settings (set_config in disguise) and any change that would make
  the server read later texts otherwise than this parser (standard_conforming_strings not on,
  a client-only multibyte client_encoding; also through ALTER ROLE/DATABASE/SYSTEM SET) are
  pg:set_role;
- PREPARE is classified as the statement it prepares; EXECUTE is resolved by a
  SqlClassifier that remembers the session's prepared statements.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

from pglast import parser as _pg

from .postgres.native import lanes as _native_lanes

ACTIONS = (
    "pg:select", "pg:insert", "pg:update", "pg:delete", "pg:ddl", "pg:copy_out",
    "pg:copy_in", "pg:grant", "pg:set_role", "pg:function", "pg:do", "pg:other",
)

DEFAULT_DANGEROUS: frozenset[str] = frozenset({
    # server files and directories
    "pg_read_file", "pg_read_binary_file", "pg_stat_file", "pg_ls_*", "pg_file_write",
    "pg_file_rename", "pg_file_unlink",
    # large objects: data outside every table (lo_get/lo_put/lo_from_bytea/lo_unlink/...),
    # and lo_import/lo_export move it between the server's file system and the database
    "lo_*", "loread", "lowrite",
    # SQL text run by name, out of the classifier's sight: other databases, XML and text
    # search functions that run a query or read a table given as a string, tablefunc,
    # background workers, pg_cron jobs, pgRouting's edge queries
    "dblink*", "query_to_xml*", "table_to_xml*", "schema_to_xml*", "database_to_xml*",
    "cursor_to_xml*", "ts_stat", "ts_rewrite", "crosstab*", "connectby", "pg_background_*",
    "cron.schedule", "cron.schedule_in_database", "cron.alter_job", "pgr_*",
    # logical decoding reads every change of every table; slots hold back WAL
    "pg_logical_slot_*", "pg_replication_slot_advance", "pg_create_logical_replication_slot",
    "pg_create_physical_replication_slot", "pg_copy_logical_replication_slot",
    "pg_copy_physical_replication_slot", "pg_drop_replication_slot",
    # other sessions and the server itself
    "pg_terminate_backend", "pg_cancel_backend", "pg_reload_conf", "pg_rotate_logfile",
    "pg_promote", "pg_switch_wal", "pg_create_restore_point",
    # set_config('role', ...) is SET ROLE in disguise, set_config('standard_conforming_strings',
    # 'off', ...) changes how the server reads later statements
    "set_config",
})

WRITE_ACTIONS = frozenset({"pg:insert", "pg:update", "pg:delete", "pg:copy_in", "pg:ddl"})

# When one statement does several things, its action is the most consequential one.
_PRIORITY = {a: i for i, a in enumerate((
    "pg:other", "pg:select", "pg:insert", "pg:update", "pg:delete", "pg:copy_out",
    "pg:copy_in", "pg:ddl", "pg:grant", "pg:set_role", "pg:do", "pg:function",
))}

_GRANT_KINDS = frozenset({
    "GrantStmt", "GrantRoleStmt", "AlterDefaultPrivilegesStmt", "CreateRoleStmt",
    "AlterRoleStmt", "AlterRoleSetStmt", "DropRoleStmt", "ReassignOwnedStmt",
    "AlterOwnerStmt",
})
_DDL_KINDS = frozenset({"IndexStmt", "ViewStmt", "RuleStmt"})
_DDL_PREFIXES = ("Create", "Alter", "Drop", "Rename", "Comment", "Define", "Refresh",
                 "Cluster", "Reindex", "Import", "SecLabel", "Composite", "Load")
_SET_ROLE_SETTINGS = frozenset({"role", "session_authorization", "search_path"})
# The classifier reads every text as a server with standard_conforming_strings on and a UTF-8
# client does. standard_conforming_strings off makes a backslash in '...' an escape, and a
# client-only multibyte client_encoding (Shift-JIS, Big5, GBK, ...) has characters whose second
# byte is a backslash: either way `SELECT 'x\', ' ; DELETE FROM t; --'` (or its E'' form) is one
# SELECT here and a DELETE on the server, so changing them is pg:set_role too.
# (backslash_quote and escape_string_warning only decide between an error or a warning and
# the same reading, they never make the server read a text differently.)
_TRUE_VALUES = frozenset({"on", "true", "yes", "1"})
CLIENT_ONLY_ENCODINGS = frozenset({      # Postgres's names and aliases, cleaned as it cleans them
    "sjis", "shiftjis", "mskanji", "win932", "windows932", "shiftjis2004", "big5", "win950",
    "windows950", "gbk", "win936", "windows936", "uhc", "win949", "windows949", "gb18030", "johab",
})
_DROP_TABLE_TYPES = frozenset({
    "OBJECT_TABLE", "OBJECT_VIEW", "OBJECT_MATVIEW", "OBJECT_INDEX", "OBJECT_SEQUENCE",
    "OBJECT_FOREIGN_TABLE",
})
_MERGE_ACTIONS = {"CMD_INSERT": "pg:insert", "CMD_UPDATE": "pg:update", "CMD_DELETE": "pg:delete"}
# Nodes that can hold no table, function or statement: not worth walking into.
_LEAF_KINDS = frozenset({"A_Const", "ColumnRef", "ParamRef", "String", "Integer", "Float",
                         "Boolean", "BitString", "A_Star", "SQLValueFunction", "SetToDefault"})


@dataclass(frozen=True)
class StatementClass:
    action: str
    kind: str
    tables: tuple[str, ...] = ()
    tables_written: tuple[str, ...] = ()
    functions: tuple[str, ...] = ()
    dangerous_functions: tuple[str, ...] = ()
    has_where: Optional[bool] = None
    fingerprint: str = ""
    text: str = ""
    parse_error: Optional[str] = None
    # (action, table) pairs: what policy is asked for each table the statement touches
    accesses: tuple[tuple[str, str], ...] = ()
    locks_rows: bool = False              # SELECT ... FOR UPDATE/SHARE
    prepared_name: Optional[str] = None   # PREPARE / EXECUTE / DEALLOCATE target ("*" = all)
    resolved: bool = True                 # False: EXECUTE of a statement this session never prepared
    executes: Optional[str] = None        # a resolved EXECUTE: the text of the statement it runs
    prepared_kind: Optional[str] = None   # PREPARE: the kind of the statement it prepares

    def signature(self) -> tuple:
        """Everything a policy decision can depend on (the text's constants are not)."""
        return (self.action, self.kind, self.accesses, self.functions,
                self.dangerous_functions, self.has_where, self.locks_rows,
                self.parse_error is not None, self.resolved, self.fingerprint)


def is_dangerous(name: str, dangerous: frozenset[str]) -> bool:
    """`name` may be schema-qualified; the last part is matched, `*` ends a prefix."""
    short = name.rsplit(".", 1)[-1]
    if name in dangerous or short in dangerous:
        return True
    for pattern in dangerous:
        if pattern.endswith("*") and short.startswith(pattern[:-1]):
            return True
    return False


def _sval(node: dict) -> str:
    string = node.get("String")
    return string.get("sval", "") if string else ""


def _table_name(schema: Optional[str], relname: str) -> str:
    return f"{schema or 'public'}.{relname}"


class _Walker:
    """Collects accesses, functions and WHERE facts from one statement's JSON tree."""

    def __init__(self, dangerous: frozenset[str]):
        self.dangerous = dangerous
        self.accesses: list[tuple[str, str]] = []
        self.functions: list[str] = []
        self.dangerous_found: list[str] = []
        self.where_flags: list[bool] = []     # one per UPDATE/DELETE/TRUNCATE seen
        self.locks_rows = False
        self.actions: list[str] = []           # statement-level actions seen in nested statements
        self.cte_scopes: list[set[str]] = []

    # -- generic traversal -------------------------------------------------------------
    def visit(self, value: Any, rv_action: str) -> None:
        """Walk any JSON value; wrapped nodes ({"Kind": {...}}) go to their handler."""
        if type(value) is list:
            for item in value:
                if type(item) is dict or type(item) is list:
                    self.visit(item, rv_action)
            return
        if type(value) is not dict:
            return
        if len(value) == 1:
            key = next(iter(value))
            if key in _LEAF_KINDS:
                return
            handler = _HANDLERS.get(key)
            if handler is not None:
                handler(self, value[key], rv_action)
                return
            if key[:1].isupper():
                value = value[key]
                if type(value) is not dict:
                    return
        elif "relname" in value:      # a RangeVar stored unwrapped (e.g. InsertStmt.relation)
            _range_var(self, value, rv_action)
            return
        elif "funcformat" in value:   # a FuncCall stored unwrapped (CallStmt.funccall)
            _func_call(self, value, rv_action)
            return
        for child in value.values():
            if type(child) is dict or type(child) is list:
                self.visit(child, rv_action)

    def visit_fields(self, fields: Any, rv_action: str, skip: tuple[str, ...] = ()) -> None:
        if type(fields) is not dict:
            return
        for key, child in fields.items():
            if key not in skip and (type(child) is dict or type(child) is list):
                self.visit(child, rv_action)

    def add_table(self, action: str, name: str) -> None:
        self.accesses.append((action, name))

    # -- CTE scoping -------------------------------------------------------------------
    def enter_with(self, with_clause: Optional[dict]) -> bool:
        """Visit a WITH clause's CTEs and push their names; returns whether a scope was pushed."""
        if not with_clause:
            return False
        clause = with_clause.get("WithClause", with_clause)
        ctes = [c.get("CommonTableExpr", c) for c in clause.get("ctes", [])]
        names = {c.get("ctename", "") for c in ctes}
        scope: set[str] = set(names) if clause.get("recursive") else set()
        self.cte_scopes.append(scope)
        for cte in ctes:
            self.visit(cte.get("ctequery"), "pg:select")
            scope.add(cte.get("ctename", ""))
        return True

    def is_cte(self, schemaname: Optional[str], relname: str) -> bool:
        if schemaname:
            return False
        return any(relname in scope for scope in self.cte_scopes)


# -- does a WHERE restrict the rows it changes? ---------------------------------------------
# A heuristic (it cannot know the data): the condition must compare a column of the target table
# with something that is not that same column, in every branch of an OR. `WHERE 1 = 1`,
# `WHERE $1`, `WHERE EXISTS (SELECT 1)`, `WHERE (SELECT true)` and `WHERE id = id` do not count;
# `WHERE id = $1`, `WHERE expires < now()`, `WHERE id IN (SELECT ...)`, `WHERE flag`,
# `WHERE CURRENT OF c` and a correlated `WHERE EXISTS (SELECT 1 FROM u WHERE u.id = t.uid)` do.
# Column references are ColumnRef nodes: unqualified names count as the target's at the top level
# (and in subqueries without FROM), qualified ones when the qualifier is the target's name (its
# alias if it has one) and no FROM item of the subquery takes that name.
def _target_name(relation: Optional[dict]) -> str:
    relation = relation or {}
    alias = relation.get("alias") or {}
    return alias.get("aliasname") or relation.get("relname", "")


def _target_column(ref: dict, name: str, unqualified: bool) -> Optional[str]:
    parts = [_sval(f) if "String" in f else "*" for f in ref.get("fields", [])]
    if len(parts) == 1:
        return parts[0] if unqualified else None
    if name in parts[:-1]:          # t.col, schema.t.col, t.col.field
        return ".".join(parts[parts.index(name) + 1:])
    return None


def _binds(from_clause: Any, name: str) -> bool:
    """Whether a FROM list introduces `name` (which then hides an outer table of that name)."""
    for item in from_clause or ():
        if type(item) is not dict or len(item) != 1:
            continue
        kind, node = next(iter(item.items()))
        alias = (node.get("alias") or {}).get("aliasname")
        if alias == name or (kind == "RangeVar" and not alias and node.get("relname") == name):
            return True
        if kind == "JoinExpr" and _binds([node.get("larg"), node.get("rarg")], name):
            return True
    return False


def _target_columns(value: Any, name: str, unqualified: bool) -> set[str]:
    """The target's columns named anywhere in value, subqueries included where they see it."""
    found: set[str] = set()
    stack = [(value, unqualified)]
    while stack:
        item, bare = stack.pop()
        if type(item) is list:
            stack.extend((child, bare) for child in item)
            continue
        if type(item) is not dict:
            continue
        if "ColumnRef" in item and len(item) == 1:
            column = _target_column(item["ColumnRef"], name, bare)
            if column:
                found.add(column)
            continue
        if "SelectStmt" in item and len(item) == 1:
            select = item["SelectStmt"]
            if select.get("op", "SETOP_NONE") != "SETOP_NONE":     # UNION etc.: larg, rarg
                stack.extend(({"SelectStmt": select.get(side) or {}}, bare) for side in ("larg", "rarg"))
                continue
            if _binds(select.get("fromClause"), name):
                continue
            bare = bare and not select.get("fromClause")
            item = select
        stack.extend((child, bare) for child in item.values() if type(child) in (dict, list))
    return found


def _restricts(node: Any, name: str, unqualified: bool = True) -> bool:
    """Whether a boolean condition restricts the target's rows (see above)."""
    if type(node) is not dict or len(node) != 1:
        return False
    kind, body = next(iter(node.items()))
    if kind == "BoolExpr":
        args = body.get("args") or []
        if body.get("boolop") == "AND_EXPR":
            return any(_restricts(a, name, unqualified) for a in args)
        if body.get("boolop") == "OR_EXPR":
            return bool(args) and all(_restricts(a, name, unqualified) for a in args)
        return bool(args) and _restricts(args[0], name, unqualified)          # NOT
    if kind == "CurrentOfExpr":
        return True
    if kind == "TypeCast":
        return _restricts(body.get("arg"), name, unqualified)
    if kind == "SubLink" and body.get("testexpr") is None:   # EXISTS (...), (SELECT ...)
        return _restricts_in_select(body.get("subselect"), name, unqualified)
    if kind == "A_Expr":
        sides = [body.get("lexpr"), body.get("rexpr")]
    elif kind == "SubLink":                                   # x IN / op ANY / op ALL (SELECT ...)
        sides = [body.get("testexpr"), body.get("subselect")]
    elif kind == "FuncCall":
        sides = body.get("args") or []
    elif kind in ("NullTest", "BooleanTest"):
        sides = [body.get("arg")]
    else:                                                     # a column, CASE, COALESCE, ...
        sides = [node]
    columns = [_target_columns(side, name, unqualified) for side in sides if side is not None]
    if len(columns) == 1:
        return bool(columns[0])
    # some target column on one side that another side does not name too (not `id = id`)
    return any(c not in other for i, mine in enumerate(columns) for c in mine
               for j, other in enumerate(columns) if i != j)


def _restricts_in_select(select: Any, name: str, unqualified: bool) -> bool:
    """An EXISTS / scalar subquery restricts through its own WHERE correlated to the target."""
    node = (select or {}).get("SelectStmt") if type(select) is dict else None
    if not node:
        return False
    if node.get("op", "SETOP_NONE") != "SETOP_NONE":
        return all(_restricts_in_select({"SelectStmt": node.get(side) or {}}, name, unqualified)
                   for side in ("larg", "rarg"))
    if _binds(node.get("fromClause"), name):
        return False
    return _restricts(node.get("whereClause"), name, unqualified and not node.get("fromClause"))


# -- node handlers -------------------------------------------------------------------------
def _range_var(w: _Walker, node: dict, rv_action: str) -> None:
    schema, rel = node.get("schemaname"), node.get("relname", "")
    if not w.is_cte(schema, rel):
        w.add_table(rv_action, _table_name(schema, rel))


def _func_call(w: _Walker, node: dict, rv_action: str) -> None:
    name = ".".join(_sval(part) for part in node.get("funcname", []))
    w.functions.append(name)
    if is_dangerous(name, w.dangerous):
        w.dangerous_found.append(name)
    w.visit_fields(node, rv_action, skip=("funcname",))


def _with_scope(body):
    """Wrap a statement handler so its WITH clause is visited first and scoped to it."""
    def handler(w: _Walker, node: dict, rv_action: str) -> None:
        pushed = w.enter_with(node.get("withClause"))
        try:
            body(w, node, rv_action)
        finally:
            if pushed:
                w.cte_scopes.pop()
    return handler


@_with_scope
def _select(w: _Walker, node: dict, rv_action: str) -> None:
    if node.get("lockingClause"):
        w.locks_rows = True
    into = node.get("intoClause")
    if into:  # SELECT ... INTO new_table creates a table
        w.actions.append("pg:ddl")
        w.visit(into, "pg:ddl")
    w.visit_fields(node, "pg:select", skip=("withClause", "intoClause"))


@_with_scope
def _insert(w: _Walker, node: dict, rv_action: str) -> None:
    w.actions.append("pg:insert")
    relation = node.get("relation")
    w.visit(relation, "pg:insert")
    conflict = node.get("onConflictClause") or {}
    if conflict.get("action") == "ONCONFLICT_UPDATE":
        w.actions.append("pg:update")
        w.where_flags.append(True)      # DO UPDATE changes only the row that conflicted
        w.visit(relation, "pg:update")
    w.visit_fields(node, "pg:select", skip=("withClause", "relation"))


@_with_scope
def _update(w: _Walker, node: dict, rv_action: str) -> None:
    w.actions.append("pg:update")
    relation = node.get("relation") or {}
    w.where_flags.append(_restricts(node.get("whereClause"), _target_name(relation)))
    if relation.get("relname") == "pg_settings" and relation.get("schemaname") in (None, "pg_catalog"):
        w.actions.append("pg:set_role")     # its update rule calls set_config: SET in disguise
    w.visit(relation, "pg:update")
    w.visit_fields(node, "pg:select", skip=("withClause", "relation"))


@_with_scope
def _delete(w: _Walker, node: dict, rv_action: str) -> None:
    w.actions.append("pg:delete")
    w.where_flags.append(_restricts(node.get("whereClause"), _target_name(node.get("relation"))))
    w.visit(node.get("relation"), "pg:delete")
    w.visit_fields(node, "pg:select", skip=("withClause", "relation"))


@_with_scope
def _merge(w: _Walker, node: dict, rv_action: str) -> None:
    relation = node.get("relation")
    name = _target_name(relation)
    joined = _restricts(node.get("joinCondition"), name)
    for clause in node.get("mergeWhenClauses", []):
        clause = clause.get("MergeWhenClause", {})
        action = _MERGE_ACTIONS.get(clause.get("commandType", ""))
        if action:
            w.actions.append(action)
            w.visit(relation, action)
        if action in ("pg:update", "pg:delete"):
            # WHEN MATCHED changes the target rows the ON condition paired with a source row;
            # WHEN NOT MATCHED BY SOURCE the ones it did not: only its own AND condition restricts
            matched = clause.get("matchKind", "MERGE_WHEN_MATCHED") == "MERGE_WHEN_MATCHED"
            w.where_flags.append((matched and joined) or _restricts(clause.get("condition"), name))
    w.visit_fields(node, "pg:select", skip=("withClause", "relation"))


def _truncate(w: _Walker, node: dict, rv_action: str) -> None:
    w.actions.append("pg:delete")
    w.where_flags.append(False)
    w.visit(node.get("relations"), "pg:delete")


def _drop(w: _Walker, node: dict, rv_action: str) -> None:
    if node.get("removeType") not in _DROP_TABLE_TYPES:
        return
    for obj in node.get("objects", []):
        parts = [_sval(item) for item in obj.get("List", {}).get("items", [])]
        if parts:
            schema = parts[-2] if len(parts) >= 2 else None
            w.add_table(rv_action, _table_name(schema, parts[-1]))


_HANDLERS = {
    "RangeVar": _range_var,
    "FuncCall": _func_call,
    "SelectStmt": _select,
    "InsertStmt": _insert,
    "UpdateStmt": _update,
    "DeleteStmt": _delete,
    "MergeStmt": _merge,
    "TruncateStmt": _truncate,
    "DropStmt": _drop,
}


# -- statement level -----------------------------------------------------------------------
def _base_action(kind: str, node: dict) -> str:
    if kind in ("SelectStmt", "DeclareCursorStmt"):
        return "pg:select"
    if kind == "InsertStmt":
        return "pg:insert"
    if kind == "UpdateStmt":
        return "pg:update"
    if kind in ("DeleteStmt", "TruncateStmt"):
        return "pg:delete"
    if kind == "MergeStmt":
        return "pg:select"   # the WHEN clauses add the writes
    if kind == "DoStmt":
        return "pg:do"
    if kind == "VariableSetStmt":
        name = node.get("name", "").lower()
        if name in _SET_ROLE_SETTINGS or _changes_lexing(node):
            return "pg:set_role"
        return "pg:other"
    if kind in ("AlterRoleSetStmt", "AlterDatabaseSetStmt", "AlterSystemStmt") \
            and _changes_lexing(node.get("setstmt") or {}):
        return "pg:set_role"   # the same change for every later session
    if kind in _GRANT_KINDS:
        return "pg:grant"
    if kind in _DDL_KINDS or kind.startswith(_DDL_PREFIXES):
        return "pg:ddl"
    return "pg:other"


def _set_value(node: dict) -> Optional[str]:
    """The one constant a SET gives its setting, lower-cased; None for anything else."""
    args = node.get("args") or []
    if node.get("kind") != "VAR_SET_VALUE" or len(args) != 1 or "A_Const" not in args[0]:
        return None
    const = args[0]["A_Const"]
    if "sval" in const:
        return const["sval"].get("sval", "").lower()
    if "ival" in const:
        return str(const["ival"].get("ival", 0))
    if "boolval" in const:
        return "true" if const["boolval"].get("boolval") else "false"
    return None


def _changes_lexing(node: dict) -> bool:
    """Whether a SET/RESET (VariableSetStmt) could make the server read later texts otherwise
    than the classifier: standard_conforming_strings set to anything but on (RESET included),
    client_encoding set to a client-only multibyte encoding (or to a value that is not a constant)."""
    name = node.get("name", "").lower()
    if name == "standard_conforming_strings":
        return _set_value(node) not in _TRUE_VALUES
    if name == "client_encoding" and node.get("kind") == "VAR_SET_VALUE":
        value = _set_value(node)
        return value is None or re.sub(r"[^0-9a-z]", "", value) in CLIENT_ONLY_ENCODINGS
    return False


def _explain_analyzes(node: dict) -> bool:
    """Whether EXPLAIN runs its statement: Postgres takes the last ANALYZE option, and anything
    but a certain false (false/off/0) either analyzes or makes the EXPLAIN fail."""
    analyze = False
    for option in node.get("options", []):
        elem = option.get("DefElem", {})
        if elem.get("defname", "").lower() != "analyze":
            continue
        arg = elem.get("arg")
        if arg is None:
            analyze = True
        elif "Boolean" in arg:
            analyze = bool(arg["Boolean"].get("boolval", False))
        elif "String" in arg:
            analyze = arg["String"].get("sval", "").lower() not in ("false", "off")
        elif "Integer" in arg:
            analyze = arg["Integer"].get("ival", 0) != 0
        else:
            analyze = True
    return analyze


def _dedup(items: Iterable) -> tuple:
    return tuple(dict.fromkeys(items))


def _classify_node(kind: str, node: dict, dangerous: frozenset[str]) -> dict:
    """Classify one parsed statement; returns StatementClass fields (without text/fingerprint)."""
    if kind == "ExplainStmt":
        inner_kind, inner = next(iter(node.get("query", {"Node": {}}).items()))
        fields = _classify_node(inner_kind, inner, dangerous)
        if not _explain_analyzes(node):  # plans only: nothing is executed or written
            fields["accesses"] = _dedup(("pg:select", t) for _, t in fields["accesses"])
            fields["action"] = "pg:function" if fields["dangerous_functions"] else "pg:select"
            fields["has_where"] = None
        fields["kind"] = "ExplainStmt"
        return fields
    if kind == "PrepareStmt":
        inner_kind, inner = next(iter(node.get("query", {"Node": {}}).items()))
        fields = _classify_node(inner_kind, inner, dangerous)
        fields.update(kind="PrepareStmt", prepared_name=node.get("name", ""), prepared_kind=inner_kind)
        return fields
    if kind == "ExecuteStmt":
        walker = _Walker(dangerous)
        walker.visit(node.get("params"), "pg:select")
        return _fields_from(walker, "ExecuteStmt", "pg:other", prepared_name=node.get("name", ""),
                            resolved=False)
    if kind == "DeallocateStmt":
        return _fields_from(_Walker(dangerous), kind, "pg:other",
                            prepared_name=node.get("name") or "*")

    walker = _Walker(dangerous)
    base = _base_action(kind, node)
    extra_dangerous: list[str] = []
    if kind == "CopyStmt":
        copy_action = "pg:copy_in" if node.get("is_from") else "pg:copy_out"
        base = copy_action
        if node.get("relation"):
            walker.visit(node["relation"], copy_action)
        if node.get("query"):
            start = len(walker.accesses)
            walker.visit(node["query"], "pg:select")
            walker.accesses[start:] = [
                (copy_action if a == "pg:select" else a, t) for a, t in walker.accesses[start:]]
        if node.get("is_program"):
            extra_dangerous.append("copy_program")
        elif node.get("filename"):
            extra_dangerous.append("copy_file")
        walker.visit_fields(node, "pg:select", skip=("relation", "query"))
    elif kind in _HANDLERS:
        _HANDLERS[kind](walker, node, base)
    else:
        # DDL and everything else: tables named directly get the statement's own action,
        # queries nested inside (CREATE VIEW AS SELECT ...) are reads.
        walker.visit_fields(node, base)
    walker.dangerous_found.extend(extra_dangerous)
    return _fields_from(walker, kind, base)


def _fields_from(walker: _Walker, kind: str, base: str, **extra: Any) -> dict:
    accesses = _dedup(walker.accesses)
    dangerous = _dedup(walker.dangerous_found)
    candidates = [base, *walker.actions, *(a for a, _ in accesses)]
    action = max(candidates, key=_PRIORITY.__getitem__)
    if dangerous:
        action = "pg:function"
    has_where: Optional[bool] = None
    if walker.where_flags:
        has_where = all(walker.where_flags)
    fields = dict(
        action=action,
        kind=kind,
        tables=_dedup(t for _, t in accesses),
        tables_written=_dedup(t for a, t in accesses if a in WRITE_ACTIONS),
        functions=_dedup(f for f in walker.functions if f),
        dangerous_functions=dangerous,
        has_where=has_where,
        accesses=accesses,
        locks_rows=walker.locks_rows,
    )
    fields.update(extra)
    return fields


def _statement_fields_refresh(fields: dict) -> dict:
    """Recompute the derived table lists after `accesses` was rewritten."""
    accesses = fields["accesses"]
    fields["tables"] = _dedup(t for _, t in accesses)
    fields["tables_written"] = _dedup(t for a, t in accesses if a in WRITE_ACTIONS)
    return fields


def _fingerprint(text: str) -> str:
    try:
        return _pg.fingerprint(text)
    except Exception:   # noqa: BLE001 - a statement pglast can parse but not fingerprint
        return ""


def classify_sql(sql: str, dangerous_functions: frozenset[str] = DEFAULT_DANGEROUS) -> list[StatementClass]:
    """One StatementClass per statement in `sql` (empty for a message with no statement)."""
    try:
        tree = json.loads(_pg.parse_sql_json(sql))
    except _pg.ParseError as exc:
        return [_parse_failure(sql, str(exc))]
    except RecursionError:
        return [_parse_failure(sql, "statement nested too deeply to classify")]
    statements = tree.get("stmts", [])
    raw = sql.encode("utf-8") if len(statements) > 1 else None
    result = []
    for entry in statements:
        if raw is None:
            text = sql.strip().rstrip(";").strip()
        else:   # stmt_location/stmt_len are byte offsets
            start = entry.get("stmt_location", 0)
            length = entry.get("stmt_len", 0)
            end = start + length if length else len(raw)
            text = raw[start:end].decode("utf-8", "replace").strip().rstrip(";").strip()
        kind, node = next(iter(entry["stmt"].items()))
        try:
            fields = _classify_node(kind, node, dangerous_functions)
        except RecursionError:
            result.append(_parse_failure(text, "statement nested too deeply to classify"))
            continue
        if kind == "ExplainStmt":
            _statement_fields_refresh(fields)
        result.append(StatementClass(fingerprint=_fingerprint(text), text=text, **fields))
    return result


def _parse_failure(text: str, error: str) -> StatementClass:
    return StatementClass(action="pg:other", kind="ParseError", text=text, parse_error=error)


# statement kinds whose classification never reads a constant's value (A_Const is a leaf for
# the walker), so texts that differ only in their constants classify alike
_SHAPE_REUSABLE_KINDS = frozenset({"SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"})
_CONSTANT_TOKENS = frozenset({"ICONST", "FCONST", "SCONST", "BCONST", "XCONST"})
# the lexer never produces a token whose text is this (identifiers, operators and keywords
# cannot contain it, quoted identifiers keep their quotes)
_CONSTANT_MARK = "\x01"

# enforcer/postgres/_pglanes.c shapes the quote-free texts of the regex path without the regex
# engine (when built: enforcer/postgres/native.py)
_number_shape = _native_lanes.number_shape if _native_lanes is not None else None


# The common case without a lexer pass: texts with no comment, dollar quote or backslash are
# shaped by one regex substitution over the raw text, which keeps every character but the
# literals, so equal shapes are equal texts up to literal values. Leftmost matching takes
# quoted identifiers and strings as units (a digit or quote inside one is never taken for
# something else); a quote glued to a name (E'', B'', U&'', date'...') goes to the lexer.
# Non-ASCII text goes to the lexer too: Postgres takes letters like é or ٣ as identifier
# characters, where the regex would see a word boundary and take `é5`'s digit for a literal.
_NAMED_DOLLAR = re.compile(r"\$(?!\d)")
_NUMBER = r"""(?<![\w$.])(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?(?![\w.])"""
_FAST_LITERAL = re.compile(r"""("(?:[^"]|"")*")|([\w$&]')|'[^']*'|""" + _NUMBER, re.ASCII)
# without any quote character only the number alternative of _FAST_LITERAL can match, and a
# plain replacement string spares a Python callback per literal
_FAST_NUMBER = re.compile(_NUMBER, re.ASCII)


def _fast_path_safe(sql: str) -> bool:
    """No comment, backslash, named dollar quote ($ not followed by a digit), NUL, \\x01 (our
    constant mark) or non-ASCII character in sql: the regex path may shape it."""
    return (sql.isascii() and "--" not in sql and "/*" not in sql and "\\" not in sql
            and "\0" not in sql and "\x01" not in sql
            and ("$" not in sql or _NAMED_DOLLAR.search(sql) is None))


class _NeedsLexer(Exception):
    pass


def _literal_mark(match: "re.Match") -> str:
    if match.group(2):
        raise _NeedsLexer
    return match.group(1) or _CONSTANT_MARK


def statement_shape(sql: str) -> Optional[str]:
    """The text with every literal replaced by one mark: texts with the same shape differ only
    in their constants. Postgres's own lexer decides where the fast regex path may not.
    None when the text does not scan."""
    if _number_shape is not None:
        shape = _number_shape(sql)     # the quote-free case in C; None: not that case
        if shape is not None:
            return shape
    if _fast_path_safe(sql):
        if "'" not in sql and '"' not in sql:
            return "F" + _FAST_NUMBER.sub(_CONSTANT_MARK, sql)
        try:
            return "F" + _FAST_LITERAL.sub(_literal_mark, sql)
        except _NeedsLexer:
            pass
    try:
        tokens = _pg.scan(sql)
    except Exception:   # noqa: BLE001 - unterminated literal or the like: no shape, full parse
        return None
    constants = _CONSTANT_TOKENS
    return "S" + "\0".join([_CONSTANT_MARK if t.name in constants else sql[t.start:t.end + 1] for t in tokens])


def single_statement_text(sql: str) -> str:
    """A one-statement message's statement text, as classify_sql records it."""
    return sql.strip().rstrip(";").strip()


def reusable_by_shape(statement: StatementClass) -> bool:
    """Whether every text of this statement's shape classifies (and so is decided) alike."""
    return (statement.kind in _SHAPE_REUSABLE_KINDS and statement.parse_error is None and statement.resolved
            and statement.prepared_name is None)


# Every text holding an EXECUTE contains the word: a keyword cannot be quoted, escaped or split
# by a comment. Such a text means what the session's prepared statements make it mean, so no
# memo keyed on the text (or its shape) may answer for it.
def mentions_execute(sql: str) -> bool:
    """Whether `sql` may run a prepared statement (SQL EXECUTE), so its meaning depends on the session."""
    # keywords are ASCII to Postgres: lower() then `in` is ~10x cheaper than an IGNORECASE search
    # on the hot path of every new statement text
    return "execute" in sql.lower()


def _with_text(template: StatementClass, text: str) -> StatementClass:
    # a copy of a frozen dataclass without dataclasses.replace's re-validation (hot path)
    copy = object.__new__(StatementClass)
    copy.__dict__.update(template.__dict__)
    copy.__dict__["text"] = text
    return copy


class ClassificationCache:
    """Classification by exact statement text; a hit skips the parse and the fingerprint.

    A new text of a known shape (a DML statement seen before with other constants, as every
    `WHERE id = 42` of an application is) reuses that classification after one lexer pass,
    a fraction of a parse and walk.
    """

    def __init__(self, dangerous_functions: frozenset[str] = DEFAULT_DANGEROUS, max_entries: int = 20000):
        self.dangerous_functions = dangerous_functions
        self.max_entries = max_entries
        self._entries: dict[str, tuple[StatementClass, ...]] = {}
        self._shapes: dict[str, StatementClass] = {}
        self.hits = 0
        self.shape_hits = 0
        self.misses = 0

    def classify(self, sql: str) -> tuple[StatementClass, ...]:
        found = self._entries.get(sql)
        if found is not None:
            self.hits += 1
            return found
        shape = statement_shape(sql)
        template = self._shapes.get(shape) if shape is not None else None
        if template is not None:
            self.shape_hits += 1
            found = (_with_text(template, single_statement_text(sql)),)
        else:
            self.misses += 1
            found = tuple(classify_sql(sql, self.dangerous_functions))
            if shape is not None and len(found) == 1 and reusable_by_shape(found[0]):
                _bounded_put(self._shapes, shape, found[0], self.max_entries)
        _bounded_put(self._entries, sql, found, self.max_entries)
        return found

    def clear(self) -> None:
        self._entries.clear()
        self._shapes.clear()


def _bounded_put(entries: dict, key, value, max_entries: int) -> None:
    if len(entries) >= max_entries:
        # drop the oldest tenth: cheaper than LRU bookkeeping on every hit
        for old in list(entries)[: max_entries // 10 or 1]:
            del entries[old]
    entries[key] = value


class SqlClassifier:
    """Per-session classifier: resolves EXECUTE to what this session PREPAREd.

    `known` is the session's prepared statements (name -> text, SQL PREPARE and protocol Parse
    share one namespace) before the message: the Postgres enforcer follows them as the server
    holds them and passes them per decision; a name is classified only when an EXECUTE names it.
    Statements the message itself prepares or deallocates are followed here, in order.
    """

    def __init__(self, cache: Optional[ClassificationCache] = None,
                 dangerous_functions: frozenset[str] = DEFAULT_DANGEROUS,
                 known: Optional[Mapping[str, str]] = None):
        self.cache = cache or ClassificationCache(dangerous_functions)
        # None: deallocated by this message (the name is unknown, whatever `known` says)
        self.prepared: dict[str, Optional[StatementClass]] = {}
        self.known = known

    def classify(self, sql: str) -> list[StatementClass]:
        return [self._apply(statement) for statement in self.cache.classify(sql)]

    def register_prepared(self, name: str, sql: str) -> None:
        statements = self.cache.classify(sql)
        self.prepared[name] = statements[0] if len(statements) == 1 else None

    def forget(self, name: str) -> None:
        if name == "*":
            self.prepared.clear()
            self.known = None
        else:
            self.prepared[name] = None

    def lookup(self, name: str) -> Optional[StatementClass]:
        """The statement an EXECUTE of `name` runs now, or None (unknown: it stays pg:other)."""
        if name in self.prepared:
            return self.prepared[name]
        text = self.known.get(name) if self.known is not None else None
        if text is None:
            return None
        self.register_prepared(name, text)
        return self.prepared[name]

    def depends_on_session(self, statements: Iterable[StatementClass]) -> bool:
        """True when a message's meaning depends on (or changes) this session's state."""
        return any(s.prepared_name is not None or s.kind == "DiscardStmt" for s in statements)

    def _apply(self, statement: StatementClass) -> StatementClass:
        if statement.kind == "PrepareStmt" and statement.prepared_name is not None:
            self.prepared[statement.prepared_name] = statement
            return statement
        if statement.kind == "DeallocateStmt":
            self.forget(statement.prepared_name or "*")
            return statement
        if statement.kind == "DiscardStmt":
            self.forget("*")
            return statement
        if statement.kind == "ExecuteStmt":
            target = self.lookup(statement.prepared_name or "")
            if target is None or not target.resolved or target.executes is not None:
                return statement     # unknown, or itself an EXECUTE: pg:other, as without a session
            # decided as what runs (action, kind, tables, has_where); the parameters are
            # evaluated too: EXECUTE p(pg_read_file('...'))
            dangerous = _dedup(target.dangerous_functions + statement.dangerous_functions)
            accesses = _dedup(target.accesses + statement.accesses)
            return dataclasses.replace(
                target, kind=target.prepared_kind or target.kind, prepared_kind=None,
                text=statement.text, prepared_name=statement.prepared_name,
                accesses=accesses, tables=_dedup(t for _, t in accesses),
                tables_written=_dedup(t for a, t in accesses if a in WRITE_ACTIONS),
                functions=_dedup(target.functions + statement.functions),
                dangerous_functions=dangerous,
                action="pg:function" if dangerous else target.action, resolved=True,
                executes=target.text)
        return statement
