"""Masking rules as loaded from config, and how they select columns, JSON fields and identities."""
from __future__ import annotations

import dataclasses
import fnmatch
import re
from typing import Optional

from .detectors import Scanner
from .sources import WHOLE_ROW
from .strategies import Strategy

ON_BINARY_NULL = "null"
ON_BINARY_ERROR = "error"


def glob_regex(pattern: str) -> re.Pattern:
    """Case-insensitive glob (Postgres folds unquoted identifiers to lower case)."""
    return re.compile(fnmatch.translate(pattern), re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class JsonPath:
    """`$.customer.cards[*].number` or `customer.cards.*.number`; `*` matches any key or index."""

    source: str
    segments: tuple[str, ...]

    @staticmethod
    def parse(text: str) -> "JsonPath":
        s = text.strip()
        if s.startswith("$"):
            s = s[1:]
        s = s.lstrip(".")
        if not s:
            raise ValueError("empty JSON path")
        segments = []
        for part in re.split(r"\.(?![^\[]*\])", s):
            m = re.fullmatch(r"([^\[\]]*)((?:\[[^\]]*\])*)", part)
            if m is None:
                raise ValueError(f"cannot parse JSON path segment {part!r}")
            key, indexes = m.groups()
            if key:
                segments.append(key)
            for idx in re.findall(r"\[([^\]]*)\]", indexes):
                idx = idx.strip().strip("'\"")
                if idx != "*" and not idx.isdigit():
                    segments.append(idx)
                else:
                    segments.append(idx)
            if not key and not indexes:
                raise ValueError(f"empty segment in JSON path {text!r}")
        return JsonPath(text, tuple(segments))

    def matches(self, path: tuple) -> bool:
        if len(path) != len(self.segments):
            return False
        for want, got in zip(self.segments, path):
            if want != "*" and want != str(got):
                return False
        return True


@dataclasses.dataclass
class Rule:
    name: str
    strategy: Strategy
    targets: tuple[re.Pattern, ...] = ()          # empty: every target
    exempt: tuple[re.Pattern, ...] = ()
    column: Optional[re.Pattern] = None            # label glob
    qualified: Optional[re.Pattern] = None         # schema.table.column glob (needs the catalog)
    # its table.column part, for a COPY that names its table without a schema: over-masking a
    # same-named table elsewhere is the safe side of not knowing the search_path
    table_column: Optional[re.Pattern] = None
    # its table and column parts, for a value the statement computes from a column (sources.py)
    source_table: Optional[re.Pattern] = None
    source_column: Optional[re.Pattern] = None
    scanner: Optional[Scanner] = None              # detectors; with a column: only there, else scan_all_text
    scan_all_text: bool = False
    json_key: Optional[re.Pattern] = None
    json_key_glob: Optional[str] = None            # the glob json_key was built from (body pre-filter)
    json_path: Optional[JsonPath] = None
    on_binary: str = ON_BINARY_NULL

    @property
    def whole_value(self) -> bool:
        """Masks a whole column/field value (as opposed to detected parts of text)."""
        return self.scanner is None

    @property
    def selects_columns(self) -> bool:
        return self.column is not None or self.qualified is not None

    @property
    def selects_json(self) -> bool:
        return self.json_key is not None or self.json_path is not None

    def applies_to(self, identity: str, target: str) -> bool:
        if self.targets and not any(p.match(target) for p in self.targets):
            return False
        return not any(p.match(identity) for p in self.exempt)

    def matches_column(self, label: str, qualified: Optional[str], table_column: Optional[str] = None) -> bool:
        """`qualified`: schema.table.column when known; else `table_column` (table.column) when
        only that is known."""
        if self.column is not None and self.column.match(label):
            return True
        if self.qualified is None:
            return False
        if qualified is not None:
            return bool(self.qualified.match(qualified))
        return table_column is not None and bool(self.table_column.match(table_column))

    def matches_source(self, table: Optional[str], column: str) -> bool:
        """A result value computed from `table`.`column` (table None: the statement does not say
        which; column WHOLE_ROW: a whole row as one value, which holds every column)."""
        if self.column is not None:
            return column == WHOLE_ROW or bool(self.column.match(column))
        if self.qualified is None:
            return False
        if column != WHOLE_ROW and not self.source_column.match(column):
            return False
        return table is None or bool(self.source_table.match(table))
