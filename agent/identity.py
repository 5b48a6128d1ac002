"""Service identities: `identities` rules from agent.yaml, first match wins."""
from __future__ import annotations

import fnmatch
import os
from typing import Iterable, Optional

from agent.config import IdentityRule
from enforcer.context import ProcessInfo


def _glob(pattern: str, value: str) -> bool:
    return bool(value) and fnmatch.fnmatchcase(value, pattern)


def rule_matches(rule: IdentityRule, proc: ProcessInfo, claims: Optional[dict] = None) -> bool:
    """Every key in the rule's match must hold (an AND); values may be globs."""
    for key, expected in rule.match.items():
        if key == "systemd_unit":
            ok = _glob(str(expected), proc.systemd_unit)
        elif key == "cgroup":
            ok = _glob(str(expected), proc.cgroup_path)
        elif key == "exe":
            ok = _glob(str(expected), proc.exe)
        elif key == "comm":
            ok = _glob(str(expected), proc.comm)
        elif key == "uid":
            ok = proc.uid == expected
        elif key == "user":
            ok = _glob(str(expected), proc.user)
        elif key == "container":
            ok = _glob(str(expected), proc.container_id)
        elif key == "claim":
            ok = bool(claims) and all(str(claims.get(k)) == str(v) for k, v in dict(expected).items())
        else:
            ok = False
        if not ok:
            return False
    return True


def unknown_identity(proc: ProcessInfo) -> str:
    """Deterministic name for a connection no rule matched."""
    if proc.systemd_unit:
        return f"unknown:{proc.systemd_unit}"
    if proc.exe:
        return f"unknown:{os.path.basename(proc.exe)}"
    return f"unknown:{proc.comm or 'process'}"


class IdentityResolver:
    def __init__(self, rules: Iterable[IdentityRule], host: str = ""):
        self.rules = tuple(rules)
        self.host = host

    def resolve(self, proc: ProcessInfo, claims: Optional[dict] = None) -> tuple[str, dict]:
        """(identity name, principal attributes for policy)."""
        name = None
        groups: tuple[str, ...] = ()
        for rule in self.rules:
            if rule_matches(rule, proc, claims):
                name, groups = rule.name, rule.groups
                break
        if name is None:
            name = unknown_identity(proc)
        attrs = {
            "unit": proc.systemd_unit, "user": proc.user, "uid": proc.uid, "exe": proc.exe,
            "host": self.host, "container": proc.container_id, "groups": list(groups),
        }
        if claims:
            attrs["claims"] = dict(claims)
        return name, attrs
