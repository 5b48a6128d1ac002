"""`warden-agent policy check` and `warden-agent policy test`: validate and dry-run policies.

cmd_test exit codes: 0 every statement/request allowed, 1 something denied,
2 approval required (nothing denied), 3 the policy or the input could not be used.
"""
from __future__ import annotations

import json
import sys
from typing import Optional, TextIO
from urllib.parse import urlsplit

from .engine import APPROVAL, DENY, Decision, PolicyEngine
from .loader import PolicyError, load_policies

EXIT_ALLOW, EXIT_DENY, EXIT_APPROVAL, EXIT_ERROR = 0, 1, 2, 3


def cmd_check(policy_path: str, schema_path: Optional[str] = None, out: Optional[TextIO] = None) -> int:
    out = out or sys.stdout
    try:
        loaded = load_policies(policy_path, schema_path)
    except PolicyError as error:
        for file, line, reason in error.problems:
            print(f"{file}:{line}: {reason}" if line else f"{file}: {reason}", file=out)
        print(f"{len(error.problems)} problem(s): policy refused", file=out)
        return 1
    approvals = len(loaded.approval)
    print(f"OK: {len(loaded.names)} policies ({approvals} with @approval) in "
          f"{', '.join(loaded.files)}", file=out)
    return 0


def parse_http(spec: str) -> tuple[str, str, str]:
    """'GET https://host/path?q' -> ('GET', 'host', '/path?q')."""
    parts = spec.split(None, 1)
    if len(parts) != 2:
        raise ValueError(f'expected "METHOD URL", e.g. "GET https://api.example/v1/x", got {spec!r}')
    method, url = parts
    split = urlsplit(url if "://" in url else "https://" + url)
    if not split.netloc:
        raise ValueError(f"no host in {url!r}")
    path = split.path or "/"
    if split.query:
        path += "?" + split.query
    return method.upper(), split.netloc, path


def cmd_test(policy_path: str, identity: str, target: str, sql: Optional[str] = None,
             http: Optional[str] = None, identity_attrs: Optional[dict] = None, as_json: bool = False,
             groups: Optional[dict] = None, approved: bool = False, schema_path: Optional[str] = None,
             out: Optional[TextIO] = None) -> int:
    out = out or sys.stdout
    if (sql is None) == (http is None):
        print("give exactly one of --sql or --http", file=out)
        return EXIT_ERROR
    try:
        engine = PolicyEngine.from_files(policy_path, schema_path, groups)
    except PolicyError as error:
        print(error.format(), file=out)
        return EXIT_ERROR
    results = []
    if sql is not None:
        for item in engine.decide_sql(identity, identity_attrs or {}, target, sql, approved):
            s = item.statement
            results.append(dict(_decision_fields(item.decision), statement=s.text, kind=s.kind,
                                tables=list(s.tables), tables_written=list(s.tables_written),
                                functions=list(s.functions), dangerous_functions=list(s.dangerous_functions),
                                has_where=s.has_where, fingerprint=s.fingerprint, parse_error=s.parse_error))
    else:
        try:
            method, host, path = parse_http(http)
        except ValueError as error:
            print(str(error), file=out)
            return EXIT_ERROR
        decision = engine.decide_http(identity, identity_attrs or {}, target, method, host, path,
                                      approved=approved)
        results.append(dict(_decision_fields(decision), request=f"{method} {host}{path}"))
    if as_json:
        print(json.dumps({"identity": identity, "target": target, "approved": approved,
                          "results": results}, indent=2), file=out)
    else:
        for number, result in enumerate(results, 1):
            _print_result(number, result, out)
    kinds = {r["decision"] for r in results}
    if DENY in kinds:
        return EXIT_DENY
    if APPROVAL in kinds:
        return EXIT_APPROVAL
    return EXIT_ALLOW


def _decision_fields(decision: Decision) -> dict:
    return {"decision": decision.kind, "action": decision.action, "resources": list(decision.resources),
            "policies": list(decision.policy_ids), "reason": decision.reason}


def _print_result(number: int, result: dict, out: TextIO) -> None:
    subject = result.get("statement", result.get("request", ""))
    print(f"[{number}] {subject}", file=out)
    print(f"    decision:  {result['decision'].upper()}", file=out)
    print(f"    action:    {result['action']}", file=out)
    print(f"    resources: {', '.join(result['resources']) or '-'}", file=out)
    print(f"    policies:  {', '.join(result['policies']) or '-'}", file=out)
    print(f"    reason:    {result['reason']}", file=out)
    if result.get("functions"):
        print(f"    functions: {', '.join(result['functions'])}", file=out)
