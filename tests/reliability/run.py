"""`make reliability`: run the fault scenarios end to end and print one table.

    python -m tests.reliability.run [--quick] [--only NAME ...] [--json]

Needs root, BPF (BCC + kernel headers) and PostgreSQL 15 (`make setup`). Loopback only;
every process it starts is stopped by pid. Exit code 0 only if every scenario passed.
The last line is `RESULT {json}` for scripts.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from tests.reliability.scenarios import SCENARIOS, ScenarioResult

# events: the agent's chain; stored: at the collector; spooled: the tail (agent.stop etc.) still in the
# stopped agent's spool, shipped at its next start; lost = events - stored - spooled
COLUMNS = ("scenario", "runs", "sessions", "events", "stored", "spooled", "lost", "dup", "verify", "result", "time_s")


def prerequisites() -> str | None:
    from tests.bpfenv import bpf_unavailable_reason
    from tests.pg_harness import postgres_available
    reason = bpf_unavailable_reason()
    if reason:
        return reason
    if not postgres_available():
        return "PostgreSQL 15 is not installed (run make setup)"
    return None


def row(result: ScenarioResult, seconds: float) -> dict:
    return {"scenario": result.name, "runs": result.runs, "sessions": result.sessions, "events": result.produced,
            "stored": result.stored, "spooled": result.notes.get("spooled_at_stop", 0), "lost": result.lost, "dup": result.duplicated, "verify": result.verify,
            "result": "PASS" if result.ok else "FAIL", "time_s": round(seconds, 1)}


def render(rows: list[dict]) -> str:
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in COLUMNS}
    line = "  ".join(c.ljust(widths[c]) for c in COLUMNS)
    out = [line, "  ".join("-" * widths[c] for c in COLUMNS)]
    for r in rows:
        out.append("  ".join(str(r[c]).ljust(widths[c]) for c in COLUMNS))
    return "\n".join(out)


def run(names: list[str], quick: bool, stream=sys.stdout) -> tuple[list[dict], list[ScenarioResult]]:
    rows, results = [], []
    for name in names:
        print(f"--- {name} ({'quick' if quick else 'full'}) ...", file=stream, flush=True)
        started = time.monotonic()
        result = SCENARIOS[name](quick)
        seconds = time.monotonic() - started
        rows.append(row(result, seconds))
        results.append(result)
        status = "PASS" if result.ok else "FAIL"
        print(f"    {status} in {seconds:.1f}s  {json.dumps(result.notes, default=str)}", file=stream, flush=True)
        if result.error:
            print(f"    error: {result.error}", file=stream, flush=True)
        for failure in result.failures:
            print(f"    failed: {failure}", file=stream, flush=True)
    return rows, results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.reliability.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shortened scenarios (CI, smoke test)")
    parser.add_argument("--only", nargs="+", choices=sorted(SCENARIOS), help="run only these scenarios")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    reason = prerequisites()
    if reason:
        print(f"reliability scenarios cannot run: {reason}", file=sys.stderr)
        print("RESULT " + json.dumps({"ok": False, "error": reason, "scenarios": []}))
        return 2
    names = args.only or list(SCENARIOS)
    rows, results = run(names, args.quick)
    print()
    print(render(rows))
    ok = all(r.ok for r in results)
    print("RESULT " + json.dumps({"ok": ok, "quick": args.quick, "scenarios": [
        {**r_row, "notes": r.notes, "failures": r.failures, "error": r.error} for r_row, r in zip(rows, results)]},
        default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
