"""MaskingEngine (all rules of a deployment) and SessionMasker (what applies to one connection).

The enforcer asks `engine.for_session(identity, attrs, target)` once per connection and puts the
result (None when nothing applies) in `ConnectionContext.masking`. Everything here is pure: no I/O.
"""
from __future__ import annotations

import dataclasses
import re
from collections import OrderedDict
from typing import Callable, Optional, Sequence

from .copyrows import CachedFieldMasker, mask_csv_row, mask_text_row
from .detectors import BUILTIN, Detector, Scanner
from .jsonbody import JsonMasker
from .pgrow import (JSON_TYPES, UNCHANGED, Counter, MaskingRefused, RowPlan, detector_masker, is_text_like,
                    json_document_masker, mask_spans, null_masker, whole_value_masker)
from .rules import ON_BINARY_ERROR, Rule
from ..sqlclass import statement_shape
from .sources import OWN_LABEL, WHOLE_ROW, Expanded, align, declared_cursor, result_sources, statement_sources
from .strategies import Null, Redact, Strategy

Catalog = Callable[[int, int], Optional[str]]   # (table oid, attnum) -> "schema.table.column"

MAX_CACHED_PLANS = 256
_MISSING = object()
# statements whose result columns are those of a statement named earlier
_FOLLOWS_A_NAME = re.compile(r"\s*(?:execute|fetch|move)\b", re.IGNORECASE)
_TYPE_NAMES = {16: "boolean", 17: "bytea", 20: "bigint", 21: "smallint", 23: "integer", 700: "real",
               701: "double precision", 1700: "numeric", 1082: "date", 1114: "timestamp",
               1184: "timestamptz", 2950: "uuid"}

# How an HTTP body is read for masking, by its Content-Type: the one definition the HTTP enforcer
# also asks (through SessionMasker.http_body_kind) before holding a response back to mask it.
BODY_JSON = "json"                  # parsed: key/path rules and detectors; detectors alone if it does not parse
BODY_JSON_LINES = "json-lines"      # one JSON document per line (NDJSON, JSON Lines, JSON text sequences)
BODY_TEXT = "text"                  # detectors over the text
BODY_UNTYPED = "untyped"            # no usable Content-Type: JSON if it parses, else text; never passed unread
_JSON_LINES_SUFFIXES = ("ndjson", "jsonl", "jsonlines", "json-lines", "json-seq")


def http_body_kind(content_type: Optional[str]) -> Optional[str]:
    """How masking reads an HTTP body of this Content-Type; None: such a body is never changed.

    `application/json`, `*/*+json` and any other subtype ending in `json` (application/vnd.api.json,
    text/json) are JSON; application/x-ndjson, jsonl, json-seq and the like are JSON lines; other
    text/* is text. A body without a Content-Type (None, empty, or not `type/subtype`) could be any
    of them, and clients may sniff it as text: it is read as JSON when it parses, otherwise as text
    (bytes that are not UTF-8 pass through unchanged, detectors run over the rest)."""
    if content_type is None:
        return BODY_UNTYPED
    ctype = content_type.split(";", 1)[0].strip().lower()
    if "/" not in ctype:
        return BODY_UNTYPED
    if ctype.endswith(_JSON_LINES_SUFFIXES):
        return BODY_JSON_LINES
    if ctype.endswith("json"):
        return BODY_JSON
    if ctype.startswith("text/"):
        return BODY_TEXT
    return None


def _merge_detectors(rules: Sequence[Rule], extra: Sequence[Detector] = ()) -> tuple[Scanner, dict, dict]:
    """One scanner over the detectors of `rules` (first rule wins a detector) plus `extra`;
    returns (scanner, detector name -> Strategy, detector name -> rule name)."""
    detectors: list[Detector] = []
    strategies: dict[str, Strategy] = {}
    owners: dict[str, str] = {}
    for r in rules:
        for d in r.scanner.detectors:
            if d.name not in strategies:
                detectors.append(d)
                strategies[d.name] = r.strategy
                owners[d.name] = r.name
    for d in extra:
        if d.name not in strategies:
            detectors.append(d)
            strategies[d.name] = Redact()
            owners[d.name] = "record_detectors"
    return Scanner(detectors), strategies, owners


class _RuleSet:
    """The compiled view of the rules that apply to one (identity, target): shared by sessions."""

    def __init__(self, rules: tuple[Rule, ...], record_detectors: Sequence[Detector]):
        self.rules = rules
        self.column_whole = [r for r in rules if r.selects_columns and r.whole_value]
        self.column_detect = [r for r in rules if r.selects_columns and not r.whole_value]
        self.scan_rules = [r for r in rules if r.scan_all_text]
        self.json_rules = [r for r in rules if r.selects_json]
        # only these act on HTTP bodies: column rules select Postgres result columns, and the
        # record detectors are for statement texts, parameters and errors
        self.http_bodies = bool(self.json_rules or self.scan_rules)
        self.scan = _merge_detectors(self.scan_rules) if self.scan_rules else None
        if self.scan is not None:
            self.scan_name = "+".join(r.name for r in self.scan_rules)
        # free text (statements, parameters, error details, COPY of unknown columns): every detector in
        # use, so a value masked in a column is also masked where it is echoed
        scanner, strategies, owners = _merge_detectors(
            [r for r in rules if r.scanner is not None], record_detectors)
        self.text_scanner = scanner
        self.text_strategies = {k: (Redact() if isinstance(s, Null) else s) for k, s in strategies.items()}
        self.text_owners = owners
        scan_scanner, scan_strategies, scan_owners = self.scan if self.scan else (None, {}, {})
        self.json = JsonMasker(self.json_rules, scan_scanner, scan_strategies, scan_owners)


class MaskingEngine:
    def __init__(self, rules: Sequence[Rule], record_detectors: Sequence[Detector] = (),
                 exempt: Sequence = ()):
        self.rules = tuple(rules)
        self.record_detectors = tuple(record_detectors)
        self.exempt = tuple(exempt)          # identity globs exempt from every rule
        self._rulesets: dict[tuple, _RuleSet] = {}

    def for_session(self, identity: str, identity_attrs: Optional[dict] = None, target: str = "",
                    catalog: Optional[Catalog] = None) -> Optional["SessionMasker"]:
        if any(p.match(identity) for p in self.exempt):
            return None
        applicable = tuple(r for r in self.rules if r.applies_to(identity, target))
        if not applicable:
            return None
        key = tuple(id(r) for r in applicable)
        ruleset = self._rulesets.get(key)
        if ruleset is None:
            ruleset = self._rulesets[key] = _RuleSet(applicable, self.record_detectors)
        return SessionMasker(ruleset, identity=identity, target=target, catalog=catalog)


class _CopyFields:
    """The field maskers of COPY rows with one column list, built on first use of each field."""

    def __init__(self, masker: "SessionMasker", columns: Optional[Sequence[str]]):
        self.masker = masker
        self.columns = columns
        self.fields: list = []

    def mask_field(self, i: int, value: str):
        fields = self.fields
        if i >= len(fields):
            fields.extend([None] * (i + 1 - len(fields)))
        f = fields[i]
        if f is None:
            columns = self.columns
            f = fields[i] = self.masker._copy_field_masker(columns[i] if columns and i < len(columns) else None)
        return f(value)


class SessionMasker:
    """Masking for one connection: row plans, COPY rows, free text, HTTP bodies, and tallies."""

    def __init__(self, ruleset: _RuleSet, identity: str = "", target: str = "",
                 catalog: Optional[Catalog] = None):
        self.ruleset = ruleset
        self.identity = identity
        self.target = target
        self.catalog = catalog
        self._plans: OrderedDict = OrderedDict()
        self._counters: dict[tuple[str, str], Counter] = {}
        self._retired_rows = 0
        self._names: dict[tuple[int, int], Optional[str]] = {}
        self._texts_masked = 0
        self._json_counts: dict[str, int] = {}
        self._copy_rows = 0
        self._copy_fields: dict = {}          # COPY column names (or None) -> _CopyFields
        self._taken: Optional[dict] = None
        self._entries: dict = {}              # statement shape -> result_sources (None: unknown)
        self._cursors: dict[str, str] = {}    # cursor name -> the DECLARE text

    @property
    def needs_column_names(self) -> bool:
        """Column rules are in force: output whose columns cannot be named cannot be masked by them."""
        return bool(self.ruleset.column_whole or self.ruleset.column_detect)

    # -- Postgres rows -------------------------------------------------------------------
    def _counter(self, rule: str, column: str) -> Counter:
        c = self._counters.get((rule, column))
        if c is None:
            c = self._counters[(rule, column)] = Counter(rule, column)
        return c

    def _qualified(self, table_oid: int, attnum: int) -> Optional[str]:
        if not table_oid or self.catalog is None:
            return None
        key = (table_oid, attnum)
        if key not in self._names:
            try:
                self._names[key] = self.catalog(table_oid, attnum)
            except Exception:     # a failing lookup leaves label rules and detectors in force
                self._names[key] = None
        return self._names[key]

    def plan_for(self, fields, text: Optional[str] = None,
                 lookup: Optional[Callable[[str, str], Optional[str]]] = None) -> Optional[RowPlan]:
        """A plan for the DataRows following this RowDescription, or None when no column can need
        masking. `text` is the statement the rows answer: a column computed from a masked column
        (`ssn AS x`, `upper(ssn)`, a subquery's column) is masked too (sources.py); `lookup`
        gives the texts behind EXECUTE and FETCH. Raises MaskingRefused when a rule with
        on_binary: error meets a non-text column."""
        sources = self._sources(text, lookup, len(fields)) if text and self.needs_column_names else None
        key = (tuple((f.name, f.table_oid, f.column_attnum, f.type_oid, f.format) for f in fields), sources)
        if key in self._plans:
            self._plans.move_to_end(key)
            return self._plans[key]
        plan = self._build_plan(fields, sources)
        self._plans[key] = plan
        if len(self._plans) > MAX_CACHED_PLANS:
            _, old = self._plans.popitem(last=False)
            if old is not None:
                self._retired_rows += old.rows
        return plan

    def _sources(self, text: str, lookup, nfields: int) -> Optional[tuple]:
        functions = getattr(self.catalog, "function_bodies", None)
        if _FOLLOWS_A_NAME.match(text):
            # EXECUTE and FETCH mean what their name means now: never cached
            entries = result_sources(text, lookup, functions)
        else:
            key = statement_shape(text) or text
            entries = self._entries.get(key, _MISSING)
            if entries is _MISSING:
                entries = result_sources(text, None, functions)
                if len(self._entries) >= MAX_CACHED_PLANS:
                    self._entries.pop(next(iter(self._entries)))
                self._entries[key] = entries
        return align(entries, nfields)

    def cursor_declared(self, text: str) -> None:
        """A DECLARE ... CURSOR completed: its FETCHes return what its query returns."""
        name = declared_cursor(text)
        if name is not None:
            if len(self._cursors) >= MAX_CACHED_PLANS and name not in self._cursors:
                self._cursors.pop(next(iter(self._cursors)))
            self._cursors[name] = text

    def cursor_text(self, name: str) -> Optional[str]:
        return self._cursors.get(name)

    @staticmethod
    def _rule_for(rules, label: str, qualified: Optional[str], sources: Optional[frozenset]):
        for r in rules:
            if r.matches_column(label, qualified):
                return r
        if qualified is not None:
            # the catalog names the table column behind an alias: label rules see its name
            column = qualified.rsplit(".", 1)[-1]
            rule = next((r for r in rules if r.column is not None and r.column.match(column)), None)
            if rule is not None:
                return rule
        if sources:
            for r in rules:
                for table, column in sources:
                    if r.matches_source(table, column):
                        return r
        return None

    def _whole_row_document(self, index: int, sources: frozenset, type_oid: int, fmt: int, label: str):
        """A JSON value made of whole rows and nothing else a rule selects: masked by key (the
        column rules of those rows' tables) and by the scan rules, keeping the document."""
        rs = self.ruleset
        rows = {table for table, column in sources if column == WHOLE_ROW}
        if not rows or any(r.matches_source(t, c) for r in rs.column_whole for t, c in sources if c != WHOLE_ROW):
            return None
        key_rules = [dataclasses.replace(r, json_key=r.column if r.column is not None else r.source_column,
                                         json_key_glob=None, column=None, qualified=None)
                     for r in rs.column_whole if any(r.matches_source(t, WHOLE_ROW) for t in rows)]
        scanner, strategies, owners = rs.scan if rs.scan is not None else (None, {}, {})
        masker = JsonMasker(key_rules, scanner, strategies, owners)
        counter = self._counter("+".join(r.name for r in key_rules), label)
        return json_document_masker(index, masker.mask_body, type_oid, fmt, counter)

    def _view_sources(self, table_oid: int, attnum: int) -> Optional[frozenset]:
        sources = getattr(self.catalog, "sources", None)
        if sources is None:
            return None
        try:
            return sources(table_oid, attnum)
        except Exception:     # a failing lookup leaves label rules and detectors in force
            return None

    def _build_plan(self, fields, sources: Optional[tuple] = None) -> Optional[RowPlan]:
        rs = self.ruleset
        actions = []
        counters = []
        for i, f in enumerate(fields):
            label = f.name
            type_oid, fmt = f.type_oid, f.format
            # with a catalog every plain column is named by its table column, whatever its label
            qualified = self._qualified(f.table_oid, f.column_attnum)
            from_columns = None
            if qualified is not None:
                # the catalog knows this column: a table's is exact, a view's shows table columns
                from_columns = self._view_sources(f.table_oid, f.column_attnum)
            elif sources is not None:
                from_columns = frozenset((t, label if c == OWN_LABEL else c) for t, c in sources[i])
            rule = self._rule_for(rs.column_whole, label, qualified, from_columns)
            if rule is not None and type_oid in JSON_TYPES and not rule.matches_column(label, qualified):
                step = self._whole_row_document(i, from_columns, type_oid, fmt, label)
                if step is not None:
                    actions.append(step)
                    counters.append(step.counter)
                    continue
            if rule is not None:
                counter = self._counter(rule.name, label)
                if is_text_like(type_oid, fmt):
                    actions.append(whole_value_masker(i, rule.strategy, type_oid, fmt, counter))
                elif rule.on_binary == ON_BINARY_ERROR:
                    tname = _TYPE_NAMES.get(type_oid, f"type oid {type_oid}")
                    raise MaskingRefused(
                        f'Warden refused the result: column "{label}" is masked by rule "{rule.name}" but its '
                        f"type ({tname}, {'binary' if fmt else 'text'} format) cannot carry a masked value; "
                        f"cast it to text in the query (e.g. {label}::text) or set on_binary: null on the rule")
                else:
                    actions.append(null_masker(i, counter))
                counters.append(counter)
                continue
            rule = self._rule_for(rs.column_detect, label, qualified, from_columns)
            if rule is not None:
                counter = self._counter(rule.name, label)
                strategies = {d.name: rule.strategy for d in rule.scanner.detectors}
                actions.append(detector_masker(i, rule.scanner, strategies, type_oid, fmt, counter))
                counters.append(counter)
                continue
            if rs.scan is not None and is_text_like(type_oid, fmt):
                scanner, strategies, _owners = rs.scan
                counter = self._counter(rs.scan_name, label)
                actions.append(detector_masker(i, scanner, strategies, type_oid, fmt, counter))
                counters.append(counter)
        if not actions:
            return None
        return RowPlan(actions, counters)

    # -- COPY TO STDOUT ------------------------------------------------------------------
    def mask_copy_line(self, line: bytes, format: str = "text", columns: Optional[Sequence] = None,
                       delimiter: Optional[str] = None, quote: str = '"') -> bytes:
        """One CopyData row of COPY TO STDOUT. `format`: text | csv (from the COPY statement's
        options) | binary (refused: it cannot be masked). `columns`: the column names when known
        (label rules then apply), or for COPY (query) TO the (label, sources) of each field
        (copy_query_columns); without them every detector in use runs on every field."""
        if format == "binary":
            raise MaskingRefused("Warden refused COPY ... (FORMAT binary) on a target with masking rules; "
                                 "use FORMAT text or csv")
        key = tuple(columns) if columns is not None else None
        fields = self._copy_fields.get(key)
        if fields is None:
            if len(self._copy_fields) >= MAX_CACHED_PLANS:
                self._copy_fields.clear()
            fields = self._copy_fields[key] = _CopyFields(self, key)
        text = line.decode("utf-8", "surrogateescape")
        if format == "csv":
            out = mask_csv_row(text, fields.mask_field, delimiter or ",", quote)
        elif format == "text":
            out = mask_text_row(text, fields.mask_field, delimiter or "\t")
        else:
            raise ValueError(f"unknown COPY format {format!r} (text, csv or binary)")
        if out is None:
            return line
        self._copy_rows += 1
        return out.encode("utf-8", "surrogateescape")

    def copy_query_columns(self, query: dict, ncols: int) -> Optional[tuple]:
        """The fields of a COPY (query) TO as (label, sources) each, for mask_copy_line's
        `columns`; None when they cannot all be named (a table's `*`: COPY has no
        RowDescription to give those labels)."""
        entries = statement_sources(query, getattr(self.catalog, "function_bodies", None))
        aligned = align(entries, ncols)
        if aligned is None:
            return None
        stars = [e for e in entries if isinstance(e, Expanded)]
        if any(c == OWN_LABEL for e in stars for _t, c in e.sources):
            return None
        # a `*` of a subquery or function: its columns' labels are unknown, their sources known
        labels = [None] * ncols if stars else [e[0] for e in entries]
        return tuple((label or "?column?", sources) for label, sources in zip(labels, aligned))

    def _copy_field_masker(self, column) -> CachedFieldMasker:
        rs = self.ruleset
        if isinstance(column, tuple):
            # a COPY (query) field: its label and the columns it is computed from
            label, sources = column
            rule = self._rule_for(rs.column_whole, label, None, sources)
            if rule is not None:
                apply = rule.strategy.apply

                def whole_of_query(value: str):
                    return apply(value), 1
                return CachedFieldMasker(whole_of_query, self._counter(rule.name, label))
            rule = self._rule_for(rs.column_detect, label, None, sources)
            if rule is not None:
                return CachedFieldMasker(
                    self._detecting(rule.scanner, {d.name: rule.strategy for d in rule.scanner.detectors}),
                    self._counter(rule.name, label))
            return CachedFieldMasker(self._detecting(rs.text_scanner, rs.text_strategies),
                                     self._counter("detectors", label))
        if column is not None:
            qualified = column if column.count(".") == 2 else None
            table_column = column if column.count(".") == 1 else None      # COPY of an unqualified table
            label = column.rsplit(".", 1)[-1]
            rule = next((r for r in rs.column_whole if r.matches_column(label, qualified, table_column)), None)
            if rule is not None:
                apply = rule.strategy.apply

                def whole(value: str):
                    return apply(value), 1
                return CachedFieldMasker(whole, self._counter(rule.name, label))
            rule = next((r for r in rs.column_detect if r.matches_column(label, qualified, table_column)), None)
            if rule is not None:
                return CachedFieldMasker(
                    self._detecting(rule.scanner, {d.name: rule.strategy for d in rule.scanner.detectors}),
                    self._counter(rule.name, label))
        return CachedFieldMasker(self._detecting(rs.text_scanner, rs.text_strategies),
                                 self._counter("detectors", column or "copy"))

    @staticmethod
    def _detecting(scanner: Scanner, strategies: dict) -> Callable[[str], tuple]:
        def pick(d):
            return strategies[d.name]

        def mask(value: str):
            found = scanner.find(value)
            if not found:
                return UNCHANGED, 0
            return mask_spans(value, found, pick), len(found)
        return mask

    # -- free text -----------------------------------------------------------------------
    def mask_text(self, text: str) -> tuple[str, int]:
        """Statement texts, parameters, error/notice details: every detector in use, NULL -> redact."""
        rs = self.ruleset
        found = rs.text_scanner.find(text)
        if not found:
            return text, 0
        self._texts_masked += len(found)
        strategies = rs.text_strategies
        masked = mask_spans(text, found, lambda d: strategies[d.name])
        return (masked if masked is not None else Redact().apply(text)), len(found)

    def mask_error_fields(self, fields: dict) -> tuple[dict, int]:
        """ErrorResponse/NoticeResponse fields ({'M': ..., 'D': ...}): message, detail, hint, where."""
        out = dict(fields)
        total = 0
        for code in ("M", "D", "H", "W", "q"):
            value = out.get(code)
            if value:
                out[code], n = self.mask_text(value)
                total += n
        return out, total

    # -- HTTP bodies ---------------------------------------------------------------------
    @property
    def masks_http_bodies(self) -> bool:
        """A rule that acts on HTTP bodies (json_key, json_path, scan_all_text) is in force. Without
        one no body is changed, so the HTTP enforcer streams every response instead of holding
        maskable ones back (column rules alone are for Postgres results)."""
        return self.ruleset.http_bodies

    def http_body_kind(self, content_type: Optional[str]) -> Optional[str]:
        """`http_body_kind(content_type)` when this session's rules can change such a body, else None:
        what the HTTP enforcer holds back (up to mask_max_body_bytes) to pass to mask_json_body."""
        rs = self.ruleset
        if not rs.http_bodies:
            return None
        kind = http_body_kind(content_type)
        if kind == BODY_TEXT and not rs.text_scanner.detectors:
            return None
        return kind

    def mask_json_body(self, body: bytes, content_type: Optional[str] = "application/json") -> tuple[bytes, dict]:
        """A decoded (not gzip) response body, read as `http_body_kind(content_type)` says: JSON by
        key/path rules and detectors, JSON lines line by line, text (and JSON that does not parse) by
        detectors; other types unchanged. Returns (body, {rule: values masked})."""
        kind = http_body_kind(content_type)
        if kind is None:
            return body, {}
        if kind == BODY_JSON_LINES:
            return self._mask_json_lines(body)
        if kind != BODY_TEXT:
            result = self._mask_json(body)
            if result is not None:
                return result
        return self._mask_body_text(body)

    def _mask_json(self, body: bytes) -> Optional[tuple[bytes, dict]]:
        """(masked, counts) of a JSON document, or None when it is not JSON (then it is text)."""
        # a body that turns out not to be JSON goes to the text detectors; with none in use it would
        # come back unchanged, so the JSON masker may skip parsing it
        try:
            result = self.ruleset.json.mask_body(body, may_skip_parse=not self.ruleset.text_scanner.detectors)
        except RecursionError:
            # deeper than Python's parser goes: its keys cannot be found, so it cannot leave
            raise MaskingRefused("the JSON body nests too deeply for Warden to mask it, so it is not sent "
                                 "unmasked") from None
        if result is not None:
            for k, v in result[1].items():
                self._json_counts[k] = self._json_counts.get(k, 0) + v
        return result

    def _mask_body_text(self, body: bytes) -> tuple[bytes, dict]:
        text = body.decode("utf-8", "surrogateescape")
        masked_text, n = self.mask_text(text)
        if not n:
            return body, {}
        return masked_text.encode("utf-8", "surrogateescape"), {"detectors": n}

    def _mask_json_lines(self, body: bytes) -> tuple[bytes, dict]:
        """NDJSON / JSON Lines / JSON text sequences (RS-prefixed): each line as a JSON document,
        so key and path rules reach every record; a line that is not JSON goes to the detectors."""
        lines = body.split(b"\n")
        counts: dict[str, int] = {}
        changed = False
        for i, line in enumerate(lines):
            record = line.lstrip(b"\x1e")
            if not record.strip():
                continue
            result = self._mask_json(record)
            if result is None:
                result = self._mask_body_text(record)
            masked, found = result
            if masked is not record:
                lines[i] = line[:len(line) - len(record)] + masked
                changed = True
            for k, v in found.items():
                counts[k] = counts.get(k, 0) + v
        return (b"\n".join(lines) if changed else body), counts

    # -- tallies -------------------------------------------------------------------------
    def stats(self) -> dict:
        """Fields of a `mask.applied` event: counts per rule and column, never values."""
        rules: dict[str, int] = {}
        columns: dict[str, int] = {}
        values = nulled = 0
        for c in self._counters.values():
            if not c.values and not c.nulled:
                continue
            rules[c.rule] = rules.get(c.rule, 0) + c.values
            columns[c.column] = columns.get(c.column, 0) + c.values
            values += c.values
            nulled += c.nulled
        for k, v in self._json_counts.items():
            rules[k] = rules.get(k, 0) + v
            values += v
        rows = self._retired_rows + sum(p.rows for p in self._plans.values() if p is not None)
        return {"rules": rules, "columns": columns, "values_masked": values, "values_nulled": nulled,
                "rows": rows, "copy_rows": self._copy_rows, "text_values_masked": self._texts_masked}

    def take_stats(self) -> Optional[dict]:
        """What was masked since the previous call (None if nothing): one `mask.applied` per result."""
        now = self.stats()
        before = self._taken or {}
        self._taken = now
        delta = {}
        for key, value in now.items():
            if isinstance(value, dict):
                prev = before.get(key, {})
                d = {k: v - prev.get(k, 0) for k, v in value.items() if v - prev.get(k, 0)}
                delta[key] = d
            else:
                delta[key] = value - before.get(key, 0)
        if not any(delta[k] for k in ("values_masked", "values_nulled", "rows", "copy_rows", "text_values_masked")):
            return None
        return delta


__all__ = ["MaskingEngine", "SessionMasker", "MaskingRefused", "BUILTIN", "http_body_kind", "BODY_JSON",
           "BODY_JSON_LINES", "BODY_TEXT", "BODY_UNTYPED"]
