"""Load Cedar policy files and the schema; refuse them with file:line and the reason.

cedarpy reports parse and validation errors without source positions, so the text is
split into its policies (each ends with `;` outside strings and comments) and every
policy remembers the file and line it starts on. Cedar numbers policies `policy0`,
`policy1`, ... in the same order, which maps its errors back to a line.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Optional

import cedarpy

SCHEMA_FILE = "schema.cedarschema"
APPROVAL_VALUES = frozenset({"required"})


class PolicyError(Exception):
    """A policy or schema file was refused. `problems` lists every (file, line, reason)."""

    def __init__(self, file: str, line: int, reason: str,
                 problems: Optional[list[tuple[str, int, str]]] = None):
        self.file, self.line, self.reason = file, line, reason
        self.problems = problems or [(file, line, reason)]
        super().__init__(self.format())

    def format(self) -> str:
        return "\n".join(_location(f, n, r) for f, n, r in self.problems)


def _location(file: str, line: int, reason: str) -> str:
    return f"{file}:{line}: {reason}" if line else f"{file}: {reason}"


@dataclass(frozen=True)
class PolicySource:
    file: str
    line: int
    text: str


@dataclass
class LoadedPolicies:
    policy_set: "cedarpy.PolicySet"
    schema: "cedarpy.Schema"
    schema_text: str
    files: tuple[str, ...]
    sources: list[PolicySource]
    names: dict[str, str] = field(default_factory=dict)            # cedar id -> @id or file:line
    approval: frozenset[str] = frozenset()                          # cedar ids of @approval forbids
    effects: dict[str, str] = field(default_factory=dict)           # cedar id -> permit | forbid
    est: dict[str, dict] = field(default_factory=dict)              # cedar id -> policy as Cedar JSON


def split_policies(text: str, file: str) -> list[PolicySource]:
    """Cut policy text into single policies with the line each starts on."""
    policies: list[PolicySource] = []
    i, n, line = 0, len(text), 1
    start: Optional[int] = None
    start_line = 0
    while i < n:
        ch = text[i]
        if ch == "\n":
            line += 1
        elif ch == "/" and text.startswith("//", i):
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        elif ch == '"':
            if start is None:
                start, start_line = i, line
            i += 1
            while i < n and text[i] != '"':
                if text[i] == "\\":
                    i += 1
                elif text[i] == "\n":
                    line += 1
                i += 1
        elif not ch.isspace():
            if start is None:
                start, start_line = i, line
            if ch == ";":
                policies.append(PolicySource(file, start_line, text[start:i + 1]))
                start = None
        i += 1
    if start is not None:
        policies.append(PolicySource(file, start_line, text[start:]))
    return policies


def policy_files(path: str) -> list[str]:
    """A file, or every *.cedar file of a directory in name order."""
    if os.path.isdir(path):
        return sorted(os.path.join(path, name) for name in os.listdir(path) if name.endswith(".cedar"))
    return [path]


def default_schema_path() -> str:
    return str(resources.files("enforcer.policy").joinpath(SCHEMA_FILE))


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(path, 0, f"cannot read: {exc}") from exc


def load_schema(schema_path: Optional[str] = None) -> tuple["cedarpy.Schema", str]:
    path = schema_path or default_schema_path()
    text = _read(path)
    try:
        return cedarpy.Schema.from_str(text), text
    except ValueError as exc:
        raise PolicyError(path, 0, f"invalid Cedar schema: {exc}") from exc


def load_policies(policy_path: str, schema_path: Optional[str] = None) -> LoadedPolicies:
    files = policy_files(policy_path)
    if not files:
        raise PolicyError(policy_path, 0, "no *.cedar files in this directory")
    texts = [(f, _read(f)) for f in files]
    return load_policy_texts(texts, schema_path)


def load_policy_texts(texts: list[tuple[str, str]], schema_path: Optional[str] = None) -> LoadedPolicies:
    """Parse, validate against the schema and index policies given as (file name, text)."""
    schema, schema_text = load_schema(schema_path)
    sources = [p for file, text in texts for p in split_policies(text, file)]
    combined = "\n".join(p.text for p in sources)
    where = texts[0][0] if texts else "<policy>"
    policy_set = _parse(sources, combined, where)
    if len(policy_set) != len(sources):   # the splitter and Cedar disagree: no lines then
        sources_by_id: dict[str, PolicySource] = {}
    else:
        sources_by_id = {f"policy{i}": p for i, p in enumerate(sources)}
    ast = json.loads(cedarpy.policies_to_json_str(combined))["staticPolicies"]

    annotated_ids = {cid: pol.get("annotations", {}).get("id") for cid, pol in ast.items()}
    problems = _validate(combined, schema, sources_by_id, annotated_ids, where)
    names: dict[str, str] = {}
    approval: set[str] = set()
    effects: dict[str, str] = {}
    seen_ids: dict[str, PolicySource] = {}
    for cedar_id, policy in ast.items():
        src = sources_by_id.get(cedar_id)
        annotations = policy.get("annotations", {})
        effects[cedar_id] = policy.get("effect", "")
        name = annotations.get("id")
        if name is None:
            name = f"{os.path.basename(src.file)}:{src.line}" if src else cedar_id
        elif name in seen_ids:
            first = seen_ids[name]
            problems.append((src.file if src else where, src.line if src else 0,
                             f'duplicate @id("{name}"), first used at {first.file}:{first.line}'))
        elif src:
            seen_ids[name] = src
        names[cedar_id] = name
        if "approval" in annotations:
            value = annotations["approval"]
            if value not in APPROVAL_VALUES:
                problems.append((src.file if src else where, src.line if src else 0,
                                 f'@approval("{value}") is not understood; use @approval("required")'))
            elif policy.get("effect") != "forbid":
                problems.append((src.file if src else where, src.line if src else 0,
                                 "@approval belongs on a forbid policy (it turns that forbid into "
                                 "'approval required')"))
            else:
                approval.add(cedar_id)
    if problems:
        raise PolicyError(*problems[0], problems=problems)
    return LoadedPolicies(policy_set=policy_set, schema=schema, schema_text=schema_text,
                          files=tuple(f for f, _ in texts), sources=sources, names=names,
                          approval=frozenset(approval), effects=effects, est=ast)


def _parse(sources: list[PolicySource], combined: str, where: str) -> "cedarpy.PolicySet":
    try:
        return cedarpy.PolicySet.from_str(combined)
    except ValueError as whole_error:
        problems = []
        for source in sources:
            try:
                cedarpy.PolicySet.from_str(source.text)
            except ValueError as exc:
                problems.append((source.file, source.line, f"cannot parse policy: {exc}"))
        if not problems:
            problems.append((where, 0, f"cannot parse policies: {whole_error}"))
        raise PolicyError(*problems[0], problems=problems) from whole_error


def _validate(combined: str, schema: "cedarpy.Schema", sources_by_id: dict[str, PolicySource],
              annotated_ids: dict[str, Optional[str]], where: str) -> list[tuple[str, int, str]]:
    result = cedarpy.validate_policies(combined, schema)
    problems = []
    for error in result.errors:
        src = sources_by_id.get(error.policy_id)
        # Cedar's positional name means nothing to the author; name the @id instead
        name = annotated_ids.get(error.policy_id)
        label = f'policy @id("{name}")' if name else "this policy"
        reason = error.error.replace(f"for policy `{error.policy_id}`", label)
        problems.append((src.file if src else where, src.line if src else 0, reason))
    return problems
