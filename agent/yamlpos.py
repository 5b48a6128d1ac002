"""YAML with the source line of every key: the one place Warden's config loaders get positions from.

    data, where = load_yaml(text, "agent.yaml")
    where(("targets", 0, "match", "port"))       # -> "agent.yaml:7" (the line of that key)
    where.value_at(("tls",))                     # -> line of the value under that key

Paths are tuples of mapping keys (as YAML types them: `80:` is the int 80) and sequence indexes.
A path that does not exist falls back to its closest existing ancestor, so an error about a
missing key points at the mapping that should hold it.

Syntax errors and duplicate keys raise YamlPositionError(file, line, message); str() of it is
"file:line: message", ready for a loader to report as is.
"""
from __future__ import annotations

from typing import Any

import yaml

__all__ = ["Positions", "YamlPositionError", "load_yaml"]


class YamlPositionError(Exception):
    """A YAML document that cannot be read: syntax error, duplicate key, unusable key or tag."""

    def __init__(self, file: str, line: int, message: str):
        self.file = file
        self.line = line
        self.message = message
        super().__init__(f"{file}:{line}: {message}")


class Positions:
    """Source lines of a loaded document by path; calling it gives "file:line" of a key."""

    def __init__(self, filename: str):
        self.filename = filename
        self.lines: dict[tuple, int] = {}         # a key's own line, or a sequence item's / the root's line
        self.value_lines: dict[tuple, int] = {}   # where the value under a path starts

    @staticmethod
    def _lookup(table: dict[tuple, int], path: tuple) -> int:
        path = tuple(path)
        while path and path not in table:
            path = path[:-1]
        return table.get(path, 1)

    def line(self, path: tuple) -> int:
        return self._lookup(self.lines, path)

    def value_line(self, path: tuple) -> int:
        path = tuple(path)
        while path and path not in self.value_lines:
            path = path[:-1]
        return self.value_lines.get(path, self._lookup(self.lines, path))

    def where(self, path: tuple) -> str:
        return f"{self.filename}:{self.line(path)}"

    def value_at(self, path: tuple) -> str:
        return f"{self.filename}:{self.value_line(path)}"

    __call__ = where


class _Builder:
    def __init__(self, pos: Positions):
        self.pos = pos
        # a fresh constructor per document: it caches every node it constructs
        self.ctor = yaml.SafeLoader("")

    def _error(self, node: yaml.Node, message: str) -> YamlPositionError:
        return YamlPositionError(self.pos.filename, node.start_mark.line + 1, message)

    def scalar(self, node: yaml.Node) -> Any:
        try:
            return self.ctor.construct_object(node, deep=True)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or node.start_mark
            raise YamlPositionError(self.pos.filename, mark.line + 1, f"YAML error: {exc.problem}") from None
        except (ValueError, TypeError) as exc:
            raise self._error(node, f"cannot read value {node.value!r}: {exc}") from None

    def build(self, node: yaml.Node, path: tuple = ()) -> Any:
        line = node.start_mark.line + 1
        self.pos.lines.setdefault(path, line)     # a key's own line wins over its value's
        self.pos.value_lines.setdefault(path, line)
        if isinstance(node, yaml.MappingNode):
            own = {id(k) for k, _ in node.value}
            try:
                self.ctor.flatten_mapping(node)   # `<<: *anchor` merge keys, as yaml.safe_load does
            except yaml.MarkedYAMLError as exc:
                mark = exc.problem_mark or node.start_mark
                raise YamlPositionError(self.pos.filename, mark.line + 1, f"YAML error: {exc.problem}") from None
            out: dict = {}
            first: dict = {}
            for key_node, value_node in node.value:
                key = self.scalar(key_node)
                try:
                    hash(key)
                except TypeError:
                    raise self._error(key_node, "a mapping key must be a plain value, "
                                                "not a list or mapping") from None
                key_line = key_node.start_mark.line + 1
                if key in out:
                    prev_own, prev_line = first[key]
                    if prev_own and id(key_node) in own:
                        raise self._error(key_node, f"duplicate key {key!r} (first at line {prev_line}); "
                                                    f"keep one of them")
                    # a key of this mapping overrides one merged in with `<<:`
                    for table in (self.pos.lines, self.pos.value_lines):
                        for p in [p for p in table if p[:len(path) + 1] == path + (key,)]:
                            del table[p]
                first[key] = (id(key_node) in own, key_line)
                self.pos.lines[path + (key,)] = key_line
                out[key] = self.build(value_node, path + (key,))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, path + (i,)) for i, item in enumerate(node.value)]
        # scalars: resolve with the safe loader's rules (ints, bools, null, strings)
        return self.scalar(node)


def load_yaml(text: str, filename: str) -> tuple[Any, Positions]:
    """Parse one YAML document; returns (data, where). An empty document gives {}."""
    pos = Positions(filename)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else getattr(exc, "line", None) or 1
        problem = getattr(exc, "problem", None) or str(exc)
        raise YamlPositionError(filename, line, f"not valid YAML (YAML syntax error: {problem}); "
                                                f"fix this line or the one before it") from None
    if node is None:
        return {}, pos
    return _Builder(pos).build(node), pos
