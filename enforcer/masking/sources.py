"""Which table columns each result column of a statement is computed from.

A column rule must follow a value however the query names it: `ssn AS x`, `upper(ssn)`,
`row_to_json(c)`, or a subquery or CTE column that carries it. RowDescription gives only the
output label (and, for plain columns, a table OID that needs the catalog), so the statement
itself is read with the real parser (pglast) and every result column gets its *sources*: the
(relation, column) pairs its value is computed from. A relation is None when the query does not
say which one; the column is "*" for a whole row rendered as one value.

Pure: texts in, sources out. Where the statement cannot be followed (an unknown kind, a
malformed tree), the answer is None and only labels and the catalog apply, as before.
"""
from __future__ import annotations

import functools
import json
from typing import Callable, Optional

WHOLE_ROW = "*"
# the column of a table's `*`: each result column is the table column its label names
OWN_LABEL = "\0label"

Source = tuple  # (relation name or None, column name or WHOLE_ROW)


class Expanded:
    """A `*` (or `t.*`) in a target list: any number of result columns, each of which gets
    `sources` ((table, OWN_LABEL) for a table's own columns, whose labels are their names)."""
    __slots__ = ("sources",)

    def __init__(self, sources: frozenset = frozenset()):
        self.sources = sources


# functions whose result carries nothing of their arguments' values
_VALUE_FREE = frozenset({"count"})


class _Scope:
    """The FROM items a target list can name: alias -> table name (str) or a subquery's entries
    (list), plus the CTEs in force and the enclosing scope (correlated subqueries)."""

    def __init__(self, ctes: dict, outer: Optional["_Scope"] = None):
        self.items: dict[str, object] = {}
        self.order: list[str] = []
        self.opaque: dict[str, frozenset] = {}    # functions in FROM: their argument sources
        self.joined: set[str] = set()             # aliases under a USING / NATURAL join
        self.ctes = ctes
        self.outer = outer

    def add(self, alias: str, item) -> None:
        if alias not in self.items:
            self.order.append(alias)
        self.items[alias] = item

    def tables(self) -> list[str]:
        return [v for v in self.items.values() if isinstance(v, str)]


def _entry_sources(entry) -> frozenset:
    return entry.sources if isinstance(entry, Expanded) else entry[1]


def _resolve_own(sources: frozenset, column: str) -> frozenset:
    """Sources as seen through a name (`s.col`, or a whole row when `column` is WHOLE_ROW)."""
    return frozenset((t, column if c == OWN_LABEL else c) for t, c in sources)


def _all_sources(entries) -> frozenset:
    out: frozenset = frozenset()
    for e in entries:
        out |= _entry_sources(e)
    return out


class _Reader:
    def __init__(self, lookup: Optional[Callable[[str, str], Optional[str]]],
                 functions: Optional[Callable[[str], tuple]] = None):
        self.lookup = lookup
        self.functions = functions
        self.depth = 0

    # -- statements ------------------------------------------------------------------------
    def statement(self, kind: str, node: dict):
        """The result entries of one statement: a list of (label, sources) and Expanded."""
        if kind == "SelectStmt":
            return self.select(node, None, {})
        if kind in ("InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"):
            returning = (node.get("returningClause") or {}).get("exprs") or node.get("returningList")
            if not returning:
                return []
            ctes = self.ctes(node.get("withClause"), None, {})
            scope = _Scope(ctes)
            rel = node.get("relation") or {}
            self.range_var(rel, scope)
            for item in node.get("fromClause") or node.get("usingClause") or []:
                self.from_item(item, scope)
            return self.targets(returning, scope)
        if kind == "ExecuteStmt" and self.lookup is not None:
            text = self.lookup("prepared", node.get("name") or "")
            return self.text(text) if text is not None else None
        if kind == "FetchStmt" and self.lookup is not None:
            text = self.lookup("cursor", node.get("portalname") or "")
            return self.text(text) if text is not None else None
        if kind in ("DeclareCursorStmt", "PrepareStmt"):
            query = node.get("query") or {}
            return self.statement(*next(iter(query.items()))) if query else None
        return None

    def text(self, text: str):
        tree = _parse(text)
        if tree is None or len(tree) != 1:
            return None
        return self.statement(*next(iter(tree[0]["stmt"].items())))

    def ctes(self, with_clause: Optional[dict], outer: Optional[_Scope], inherited: dict) -> dict:
        ctes = dict(inherited)
        for c in (with_clause or {}).get("ctes", []):
            cte = c.get("CommonTableExpr", {})
            query = cte.get("ctequery") or {}
            kind, node = next(iter(query.items())) if query else (None, None)
            if kind == "SelectStmt":
                entries = self.select(node, outer, ctes)
            else:
                entries = self.statement(kind, node) if kind else None
            if entries is None:
                entries = [Expanded(frozenset({(None, WHOLE_ROW)}))]
            names = [n["String"]["sval"] for n in cte.get("aliascolnames", []) if "String" in n]
            ctes[cte.get("ctename", "")] = _renamed(entries, names)
        return ctes

    def select(self, node: dict, outer: Optional[_Scope], inherited_ctes: dict):
        self.depth += 1
        try:
            if self.depth > 64:
                raise _TooDeep()
            ctes = self.ctes(node.get("withClause"), outer, inherited_ctes)
            op = node.get("op", "SETOP_NONE")
            if op != "SETOP_NONE":
                left = self.select(node.get("larg") or {}, outer, ctes)
                right = self.select(node.get("rarg") or {}, outer, ctes)
                if (all(not isinstance(e, Expanded) for e in left + right) and len(left) == len(right)):
                    return [(l[0], l[1] | r[1]) for l, r in zip(left, right)]
                return [Expanded(_all_sources(left) | _all_sources(right))]
            values = node.get("valuesLists")
            if values:
                first = values[0].get("List", {}).get("items", [])
                scope = _Scope(ctes, outer)
                return [("column%d" % (i + 1), self.expression(v, scope)) for i, v in enumerate(first)]
            scope = _Scope(ctes, outer)
            for item in node.get("fromClause") or []:
                self.from_item(item, scope)
            return self.targets(node.get("targetList") or [], scope)
        finally:
            self.depth -= 1

    # -- FROM ------------------------------------------------------------------------------
    def range_var(self, rv: dict, scope: _Scope, under_join: bool = False) -> None:
        name = rv.get("relname") or ""
        alias = (rv.get("alias") or {}).get("aliasname") or name
        if not rv.get("schemaname") and name in scope.ctes:
            item = _renamed(scope.ctes[name], _colnames(rv.get("alias")))
        else:
            item = name
        scope.add(alias, item)
        if under_join:
            scope.joined.add(alias)

    def from_item(self, item: dict, scope: _Scope, under_join: bool = False) -> None:
        kind, node = next(iter(item.items()))
        if kind == "RangeVar":
            self.range_var(node, scope, under_join)
        elif kind == "RangeSubselect":
            sub = node.get("subquery", {})
            sk, sn = next(iter(sub.items()))
            # LATERAL subqueries may name earlier items: this scope is their outer one
            entries = self.select(sn, scope, scope.ctes) if sk == "SelectStmt" else None
            if entries is None:
                entries = [Expanded(frozenset({(None, WHOLE_ROW)}))]
            alias = (node.get("alias") or {}).get("aliasname") or f"?sub{len(scope.order)}"
            scope.add(alias, _renamed(entries, _colnames(node.get("alias"))))
            if under_join:
                scope.joined.add(alias)
        elif kind == "JoinExpr":
            natural = node.get("isNatural") or node.get("usingClause")
            for side in ("larg", "rarg"):
                if node.get(side):
                    self.from_item(node[side], scope, under_join or bool(natural))
            alias = (node.get("alias") or {}).get("aliasname")
            if alias:
                # a named join: its columns are both sides' columns
                merged = [Expanded(self.scope_sources(scope, OWN_LABEL))]
                scope.add(alias, merged)
        else:
            # functions, XMLTABLE, JSON_TABLE, TABLESAMPLE: their columns come from their arguments
            sources = self.expression(node, scope)
            alias = (node.get("alias") or {}).get("aliasname") or f"?fn{len(scope.order)}"
            scope.opaque[alias] = sources
            scope.add(alias, [Expanded(sources)])
            if kind == "RangeTableSample":
                inner = node.get("relation")
                if inner:
                    self.from_item(inner, scope, under_join)

    def scope_sources(self, scope: _Scope, own: str) -> frozenset:
        """Everything the FROM items hold: a table's columns as (table, own)."""
        out: set = set()
        for alias in scope.order:
            item = scope.items[alias]
            if isinstance(item, str):
                out.add((item, own))
            else:
                out |= _resolve_own(_all_sources(item), own)
        return frozenset(out)

    # -- target lists ----------------------------------------------------------------------
    def targets(self, target_list: list, scope: _Scope) -> list:
        entries: list = []
        for t in target_list:
            res = t.get("ResTarget", {})
            val = res.get("val") or {}
            label = res.get("name")
            ref = val.get("ColumnRef")
            if ref is not None:
                fields = ref.get("fields", [])
                if fields and "A_Star" in fields[-1]:
                    entries.extend(self.star([_sval(f) for f in fields[:-1]], scope))
                    continue
                names = [_sval(f) for f in fields]
                entries.append((label or names[-1] or "?column?", self.column_ref(names, scope)))
                continue
            entries.append((label or "?column?", self.expression(val, scope)))
        return entries

    def star(self, qualifier: list, scope: _Scope) -> list:
        if qualifier:
            item = scope.items.get(qualifier[-1])
            if item is None or isinstance(item, str):
                return [Expanded(frozenset({(item or qualifier[-1], OWN_LABEL)}))]
            return list(item) if qualifier[-1] not in scope.joined else [Expanded(_all_sources(item))]
        if any(a in scope.joined for a in scope.order):
            # USING / NATURAL joins merge columns: the order of the result is not the items' order
            return [Expanded(self.scope_sources(scope, OWN_LABEL))]
        out: list = []
        for alias in scope.order:
            item = scope.items[alias]
            out.extend([Expanded(frozenset({(item, OWN_LABEL)}))] if isinstance(item, str) else item)
        return out

    def column_ref(self, names: list, scope: Optional[_Scope]) -> frozenset:
        """Sources of a column reference: `col`, `alias.col`, `schema.table.col`, or a whole row
        (`alias` alone)."""
        if any(n is None for n in names):
            return frozenset({(None, WHOLE_ROW)})
        column = names[-1]
        if len(names) >= 2:
            qualifier = names[-2]
            s = scope
            while s is not None:
                item = s.items.get(qualifier)
                if item is not None:
                    if isinstance(item, str):
                        return frozenset({(item, column)})
                    found = [e[1] for e in item if not isinstance(e, Expanded) and e[0] == column]
                    return frozenset().union(*found) if found else _resolve_own(_all_sources(item), column)
                s = s.outer
            return frozenset({(qualifier, column)})
        out: set = set()
        s = scope
        while s is not None:
            found = False
            item = s.items.get(column)
            if item is not None:
                # a bare relation alias is the whole row (row_to_json(c), c::text); Postgres
                # prefers a column of that name, so both are counted
                out |= {(item, WHOLE_ROW)} if isinstance(item, str) else _resolve_own(_all_sources(item), WHOLE_ROW)
                found = True
            for alias in s.order:
                sub = s.items[alias]
                if isinstance(sub, str):
                    continue
                for e in sub:
                    if isinstance(e, Expanded):
                        out |= _resolve_own(e.sources, column)
                    elif e[0] == column:
                        out |= e[1]
                        found = True
            tables = s.tables()
            if tables:
                out |= {(t, column) for t in tables} if len(tables) > 1 or s.opaque else {(tables[0], column)}
                if s.outer is not None:
                    # it may also be a column of the enclosing query (a correlated subquery)
                    out |= {(t, column) for t in s.outer.tables()}
                found = True
            if found:
                return frozenset(out)
            s = s.outer
        out.add((None, column))
        return frozenset(out)

    def whole_rows(self, qualifier: list, scope: _Scope) -> frozenset:
        """`t.*` or `*` inside an expression (row_to_json(t.*)): every column of what it names."""
        if qualifier:
            item = scope.items.get(qualifier[-1])
            if isinstance(item, str):
                return frozenset({(item, WHOLE_ROW)})
            if item is not None:
                return _resolve_own(_all_sources(item), WHOLE_ROW)
            return frozenset({(qualifier[-1], WHOLE_ROW)})
        return self.scope_sources(scope, WHOLE_ROW) or frozenset({(None, WHOLE_ROW)})

    def expression(self, node, scope: _Scope) -> frozenset:
        """Sources of every column an expression reads, through functions, casts, CASE, arrays,
        subqueries; count() carries none of its arguments' values."""
        out: set = set()
        stack = [node]
        while stack:
            n = stack.pop()
            if isinstance(n, list):
                stack.extend(n)
                continue
            if not isinstance(n, dict):
                continue
            for k, v in n.items():
                if k == "ColumnRef":
                    fields = v.get("fields", [])
                    if fields and "A_Star" in fields[-1]:
                        out |= self.whole_rows([_sval(f) for f in fields[:-1]], scope)
                    else:
                        out |= self.column_ref([_sval(f) for f in fields], scope)
                elif k == "FuncCall" and _func_name(v) in _VALUE_FREE:
                    continue
                elif k == "FuncCall" and self.functions is not None:
                    out |= self.function_result(v)
                    stack.append(v)          # and its arguments
                elif k == "SelectStmt":
                    entries = self.select(v, scope, scope.ctes)
                    out |= _all_sources(entries)
                elif isinstance(v, (dict, list)):
                    stack.append(v)
        return frozenset(out)


    def function_result(self, call: dict) -> frozenset:
        """What a call of a function the catalog knows by its SQL body can return: the sources of
        its last statement's result (every overload of the name, in any schema when unqualified);
        a body this reader cannot follow may return anything."""
        names = [_sval(n) for n in call.get("funcname", [])]
        bodies = self.functions(".".join(n for n in names if n)) if names else ()
        out: set = set()
        for body in bodies or ():
            self.depth += 1
            try:
                if self.depth > 64:
                    raise _TooDeep()
                if isinstance(body, PlpgsqlDefinition):
                    out |= self.plpgsql_result(body)
                    continue
                tree = _parse(body)
                entries = self.statement(*next(iter(tree[-1]["stmt"].items()))) if tree else None
            finally:
                self.depth -= 1
            if entries is None:
                out.add((None, WHOLE_ROW))
                continue
            # one value of the result's columns: a table's own columns are its whole row
            out |= {(t, WHOLE_ROW if c == OWN_LABEL else c) for t, c in _all_sources(entries)}
        return frozenset(out)


    def plpgsql_result(self, definition: "PlpgsqlDefinition") -> frozenset:
        """What a PL/pgSQL function can return: everything any query in its body reads. A value
        reaches the result only through a query, an argument or a constant, so the union is
        safe; it is also wide (a boolean computed from `ssn` counts as `ssn`), which errs toward
        masking. Dynamic SQL (EXECUTE, RETURN QUERY EXECUTE, OPEN ... FOR EXECUTE) or a body
        this reader cannot follow may return anything."""
        program = _plpgsql_program(str(definition))
        if program is None:
            return frozenset({(None, WHOLE_ROW)})
        variables, queries = program
        out: set = set()
        for text, statement in queries:
            tree = _parse(text)
            if tree is None or len(tree) != 1:
                return frozenset({(None, WHOLE_ROW)})
            kind, node = next(iter(tree[0]["stmt"].items()))
            entries = self.statement(kind, node)
            if entries is None:
                if statement and kind not in _READING_KINDS:
                    continue        # a utility statement (CREATE TEMP TABLE, LOCK, ...): no values
                return frozenset({(None, WHOLE_ROW)})
            for table, column in _all_sources(entries):
                # names of the function's own variables, records and rows carry what earlier
                # queries read, which are counted themselves
                if (table is None and column in variables) or (table in variables):
                    continue
                out.add((table, WHOLE_ROW if column == OWN_LABEL else column))
        return frozenset(out)


class PlpgsqlDefinition(str):
    """A PL/pgSQL function's whole CREATE FUNCTION text (pg_get_functiondef), which the
    PL/pgSQL parser needs for the argument names; Catalog.function_bodies hands it out beside
    the bodies of SQL functions."""
    __slots__ = ()


# statements whose result the reader follows; any other statement of a body yields no values
_READING_KINDS = frozenset({"SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt",
                            "ExecuteStmt", "FetchStmt", "DeclareCursorStmt", "PrepareStmt"})
# PL/pgSQL expression parse modes (PLpgSQL_expr.parseMode): a whole statement, an expression,
# and the three forms of an assignment `target := expression`
_PLPGSQL_STATEMENT, _PLPGSQL_EXPRESSION = 0, 2
_PLPGSQL_ASSIGNMENTS = (3, 4, 5)


@functools.lru_cache(maxsize=512)
def _plpgsql_program(definition: str) -> Optional[tuple]:
    """(names of the function's variables, [(SQL text, is a whole statement)]) of every query and
    expression in a PL/pgSQL definition, expressions written as SELECTs; None when the body cannot
    be parsed or runs dynamic SQL."""
    from pglast import parser as pg_parser
    try:
        tree = json.loads(pg_parser.parse_plpgsql_json(definition))
    except Exception:   # noqa: BLE001 - a body the parser cannot read may return anything
        return None
    variables: set = set()
    queries: list = []
    for node in _json_objects(tree):
        if "dynquery" in node or "PLpgSQL_stmt_dynexecute" in node or "PLpgSQL_stmt_dynfors" in node:
            return None
        for kind in ("PLpgSQL_var", "PLpgSQL_rec", "PLpgSQL_row"):
            datum = node.get(kind)
            if datum is not None and datum.get("refname"):
                variables.add(datum["refname"])
        expr = node.get("PLpgSQL_expr")
        if expr is not None:
            text, mode = expr.get("query") or "", expr.get("parseMode", _PLPGSQL_STATEMENT)
            if mode == _PLPGSQL_STATEMENT:
                queries.append((text, True))
            elif mode == _PLPGSQL_EXPRESSION:
                queries.append(("SELECT " + text, False))
            elif mode in _PLPGSQL_ASSIGNMENTS:
                _target, operator, value = text.partition(":=")
                if not operator:
                    _target, operator, value = text.partition("=")
                if not operator:
                    return None
                queries.append(("SELECT " + value, False))
            else:
                return None
    return frozenset(variables), queries


def _json_objects(tree):
    """Every object (dict) of a parsed JSON tree, at any depth."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            yield node
            stack.extend(v for v in node.values() if isinstance(v, (dict, list)))


class _TooDeep(Exception):
    pass


def _sval(field: dict) -> Optional[str]:
    s = field.get("String")
    return s.get("sval") if s is not None else None


def _func_name(call: dict) -> str:
    names = [_sval(n) for n in call.get("funcname", [])]
    return (names[-1] or "") if names else ""


def _colnames(alias: Optional[dict]) -> list:
    return [_sval(n) for n in (alias or {}).get("colnames", [])]


def _renamed(entries: list, names: list) -> list:
    """A subquery or CTE whose alias renames its columns: `(...) AS s(a, b)`."""
    if not names:
        return entries
    out = []
    it = iter(names)
    for e in entries:
        if isinstance(e, Expanded):
            out.append(e)
            continue
        name = next(it, None)
        out.append((name or e[0], e[1]))
    return out


def _parse(text: str) -> Optional[list]:
    from pglast import parser as pg_parser
    try:
        return json.loads(pg_parser.parse_sql_json(text)).get("stmts", [])
    except Exception:   # noqa: BLE001 - what the parser cannot read has no known sources
        return None


def result_sources(text: str, lookup: Optional[Callable[[str, str], Optional[str]]] = None,
                   functions: Optional[Callable[[str], tuple]] = None) -> Optional[list]:
    """The result entries of a one-statement text: (label, sources) per column and Expanded for
    each `*`; None when they cannot be known. `lookup(kind, name)` gives the text behind
    `EXECUTE name` ("prepared") and `FETCH ... name` ("cursor": the text that declared it);
    `functions(name)` the SQL bodies of the functions called so (Catalog.function_bodies), whose
    results carry what their bodies read."""
    try:
        return _Reader(lookup, functions).text(text)
    except Exception:   # noqa: BLE001 - a tree this reader does not follow: labels and catalog only
        return None


def statement_sources(tree: dict, functions: Optional[Callable[[str], tuple]] = None) -> Optional[list]:
    """result_sources for a statement already parsed ({kind: node}, e.g. the query of a COPY)."""
    try:
        return _Reader(None, functions).statement(*next(iter(tree.items())))
    except Exception:   # noqa: BLE001 - as result_sources
        return None


def align(entries: Optional[list], nfields: int) -> Optional[tuple]:
    """Sources per result column, given the entries and the RowDescription's column count.
    Columns of an Expanded entry get its sources; where two or more `*` make positions
    uncertain, every column between the first and the last gets the union of what lies there."""
    if entries is None:
        return None
    stars = [i for i, e in enumerate(entries) if isinstance(e, Expanded)]
    known = len(entries) - len(stars)
    if not stars:
        return tuple(e[1] for e in entries) if known == nfields else None
    if known > nfields:
        return None
    first, last = stars[0], stars[-1]
    head = [e[1] for e in entries[:first]]
    tail = [e[1] for e in entries[last + 1:]]
    if first == last:
        middle = [entries[first].sources] * (nfields - known)
    else:
        middle = [_all_sources(entries[first:last + 1])] * (nfields - len(head) - len(tail))
    return tuple(head + middle + tail)


def declared_cursor(text: str) -> Optional[str]:
    """The cursor name of a DECLARE ... CURSOR FOR text, else None."""
    tree = _parse(text)
    if not tree or len(tree) != 1:
        return None
    kind, node = next(iter(tree[0]["stmt"].items()))
    return (node.get("portalname") or "") if kind == "DeclareCursorStmt" else None
