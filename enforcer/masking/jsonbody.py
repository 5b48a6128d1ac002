"""Masking inside parsed JSON documents (HTTP bodies): by key glob, by path, and by detectors."""
from __future__ import annotations

from typing import Optional

from .detectors import Scanner
from .pgrow import mask_spans
from .rules import Rule


def _whole(rule: Rule, value):
    """A whole JSON value under a masked key: scalars through the strategy, containers redacted whole."""
    if value is None:
        return None
    if isinstance(value, str):
        return rule.strategy.apply(value)
    if isinstance(value, (bool, int, float)):
        return rule.strategy.apply(str(value).lower() if isinstance(value, bool) else str(value))
    # an object or array under a masked key: nothing of it may leave
    return rule.strategy.apply("") if rule.strategy.is_constant else None


class JsonMasker:
    def __init__(self, field_rules: list[Rule], scanner: Optional[Scanner], strategies: dict,
                 rule_names: dict):
        self.key_rules = [r for r in field_rules if r.json_key is not None]
        self.path_rules = [r for r in field_rules if r.json_path is not None]
        self.scanner = scanner
        self.strategies = strategies          # detector name -> Strategy
        self.rule_names = rule_names          # detector name -> the rule it belongs to (for counts)

    def mask(self, doc) -> tuple[object, dict]:
        """Returns the masked document and {rule name: values masked}."""
        counts: dict[str, int] = {}
        return self._walk(doc, (), counts), counts

    def _field_rule(self, key, path: tuple) -> Optional[Rule]:
        if isinstance(key, str):
            for r in self.key_rules:
                if r.json_key.match(key):
                    return r
        for r in self.path_rules:
            if r.json_path.matches(path):
                return r
        return None

    def _walk(self, node, path: tuple, counts: dict):
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                p = path + (k,)
                rule = self._field_rule(k, p)
                if rule is not None and v is not None:
                    counts[rule.name] = counts.get(rule.name, 0) + 1
                    out[k] = _whole(rule, v)
                else:
                    out[k] = self._walk(v, p, counts)
            return out
        if isinstance(node, list):
            out = []
            for i, v in enumerate(node):
                p = path + (i,)
                rule = self._field_rule(None, p) if self.path_rules else None
                if rule is not None and v is not None:
                    counts[rule.name] = counts.get(rule.name, 0) + 1
                    out.append(_whole(rule, v))
                else:
                    out.append(self._walk(v, p, counts))
            return out
        if self.scanner is None or isinstance(node, bool) or node is None:
            return node
        if isinstance(node, str):
            text = node
        elif isinstance(node, (int, float)):
            text = str(node)
        else:
            return node
        found = self.scanner.find(text)
        if not found:
            return node
        for _s, _e, d in found:
            name = self.rule_names[d.name]
            counts[name] = counts.get(name, 0) + 1
        return mask_spans(text, found, lambda d: self.strategies[d.name])
