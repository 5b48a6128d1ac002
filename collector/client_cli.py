"""warden: the security team's command line for the collector."""
from __future__ import annotations

import argparse
import json
import os
import sys

from rich.console import Console
from rich.table import Table

from collector.client import ClientError, CollectorClient
from collector.timeparse import TimeFormatError, parse_duration_ns, parse_time_ns

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
DEFAULT_WINDOW = "5m"  # events --at: half-width of the window
out = Console(highlight=False, soft_wrap=False)
err = Console(stderr=True, highlight=False)


def _time_arg(value: str | None) -> str | None:
    """Resolve ISO / relative times on this machine, send exact nanoseconds."""
    return None if value is None else str(parse_time_ns(value))


def _print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _short_time(value: str | None) -> str:
    return (value or "").replace("T", " ").rstrip("Z")[:23]


def _process_text(process) -> str:
    if not isinstance(process, dict):
        return ""
    exe = process.get("exe") or process.get("comm") or ""
    unit = process.get("unit") or process.get("systemd_unit")
    pid = process.get("pid")
    text = f"{exe} pid={pid}" if pid is not None else exe
    return f"{text} ({unit})" if unit else text


# --- commands -------------------------------------------------------------------

def _yes_no(flag) -> str:
    return "yes" if flag else "no" if flag is False else "not recorded"


def _session_user(s: dict) -> str:
    """sessions list's role column: role@database, "(brokered)" when Warden logged in for the client."""
    text = s.get("auth_user") or ""
    if s.get("database"):
        text += f"@{s['database']}"
    if s.get("credentials") == "brokered":
        text += " (brokered)"
    return text


def _session_tls(s: dict) -> str:
    """sessions list's TLS column: client leg / upstream leg."""
    def leg(flag):
        return "tls" if flag else "plain" if flag is False else "?"
    return f"{leg(s.get('tls_client'))}/{leg(s.get('tls_upstream'))}"


def _session_end(s: dict) -> str:
    if not s.get("end"):
        return "open"
    reason = s.get("end_reason")
    return f"{_short_time(s['end'])} {reason}" if reason else _short_time(s["end"])


def cmd_sessions_list(client: CollectorClient, args) -> int:
    items = list(client.paginate("/v1/sessions", max_items=args.limit, identity=args.identity, target=args.target,
                                 host=args.host, table=args.table, user=args.user, since=_time_arg(args.since),
                                 until=_time_arg(args.until), limit=min(args.limit, 1000)))
    if args.json:
        _print_json(items)
        return EXIT_OK
    table = Table(title=f"{len(items)} session(s)")
    for column in ("session", "start (UTC)", "end", "identity", "target", "role@db", "tls c/u", "host", "process",
                   "stmts", "reqs", "denied"):
        table.add_column(column, overflow="fold")
    for s in items:
        table.add_row(s["id"], _short_time(s["start"]), _session_end(s), s["identity"] or "",
                      s["target"] or "", _session_user(s), _session_tls(s), s["host"] or "",
                      _process_text(s["process"]), str(s["statement_count"]), str(s["request_count"]),
                      str(s["denied_count"]))
    out.print(table)
    return EXIT_OK


def _session_process(process) -> str:
    """The process that opened the session: exe, pid, OS user (uid), systemd unit, container."""
    if not isinstance(process, dict) or not process:
        return "not recorded"
    parts = [str(process.get("exe") or process.get("comm") or "?")]
    if process.get("pid") is not None:
        parts.append(f"pid={process['pid']}")
    user, uid = process.get("user"), process.get("uid")
    if user:
        parts.append(f"user={user}" + (f" (uid {uid})" if uid is not None else ""))
    elif uid is not None:
        parts.append(f"uid={uid}")
    unit = process.get("unit") or process.get("systemd_unit")
    if unit:
        parts.append(f"unit={unit}")
    container = process.get("container") or process.get("container_id")
    if container:
        parts.append(f"container={container}")
    return " ".join(parts)


def _tls_detail(flag, start: dict, leg: str) -> str:
    text = _yes_no(flag)
    if leg != "client" or not flag:
        return text
    details = []
    mode = start.get("x_client_tls")
    if mode:
        details.append({"intercept": "terminated by Warden", "sni": "relayed end to end (SNI only)"}.get(mode, mode))
    if start.get("x_tls_negotiation"):
        details.append(f"{start['x_tls_negotiation']} negotiation")
    version = start.get("x_tls_version") or start.get("tls_version")
    if version:
        details.append(str(version))
    if start.get("x_sni"):
        details.append(f"SNI {start['x_sni']}")
    alpn = start.get("x_tls_alpn")
    if alpn:
        details.append(f"ALPN {alpn}")
    return f"{text} ({', '.join(details)})" if details else text


def _duration(session: dict) -> str:
    if session.get("start_ns") is None or session.get("end_ns") is None:
        return ""
    return f" ({(session['end_ns'] - session['start_ns']) / 1e9:.3f} s)"


def session_how(session: dict) -> list[tuple[str, str]]:
    """`warden sessions show`'s answer to "how": (label, text) rows from the session and its
    session.start / session.end fields (GET /v1/sessions/{id}: start_fields, end_fields)."""
    start = session.get("start_fields") or {}
    end = session.get("end_fields") or {}
    postgres = session.get("protocol") == "postgres"
    rows = [("identity", f"{session.get('identity') or '?'} → target {session.get('target') or '?'} "
                         f"({session.get('protocol') or '?'})"),
            ("process", _session_process(session.get("process"))),
            ("host", f"{session.get('host') or '?'} (agent {session['agent_id']})"),
            ("from", f"{session.get('client') or 'client not recorded'} → {session.get('orig_dst') or '?'}")]
    if postgres or session.get("auth_user") or session.get("database"):
        login = f"role {session.get('auth_user') or '?'} on database {session.get('database') or '?'}"
        extras = [f"{name} {start[key]}" for key, name in (("auth_method", "auth"),
                                                             ("application_name", "application")) if start.get(key)]
        rows.append(("database login", login + (f" ({', '.join(extras)})" if extras else "")))
    if session.get("credentials") == "brokered":
        text = (f"brokered by Warden: the client logged in as {session.get('client_user') or '?'}"
                f" with a {start.get('presented') or '?'}, Warden as {session.get('auth_user') or '?'}"
                f" ({start.get('upstream_auth') or '?'})")
        token = start.get("token")
        if isinstance(token, dict) and token:
            text += "; token " + " ".join(f"{k}={token[k]}" for k in ("sub", "iss", "jti") if k in token)
        rows.append(("credentials", text))
    elif session.get("credentials"):
        rows.append(("credentials", str(session["credentials"])))
    elif postgres:
        rows.append(("credentials", "the client's own (no brokered login recorded)"))
    rows.append(("TLS", f"client {_tls_detail(session.get('tls_client'), start, 'client')}; "
                        f"upstream {_tls_detail(session.get('tls_upstream'), start, 'upstream')}"))
    if start.get("x_client_tls_error"):
        rows.append(("TLS error", str(start["x_client_tls_error"])))
    rows.append(("time", f"{session.get('start') or '?'} → {session.get('end') or 'open'}{_duration(session)}"))
    if session.get("end_ns") is not None:
        ended = session.get("end_reason") or "not recorded"
        if session.get("end_sqlstate"):
            ended += f", last SQLSTATE {session['end_sqlstate']}"
        if session.get("end_error"):
            ended += f": {session['end_error']}"
        if end.get("bytes_in") is not None or end.get("bytes_out") is not None:
            ended += f" (bytes in {end.get('bytes_in', '?')}, out {end.get('bytes_out', '?')})"
        rows.append(("ended", ended))
    else:
        rows.append(("ended", "still open (no session.end stored)"))
    rows.append(("activity", f"{session.get('statement_count', 0)} statement(s), {session.get('request_count', 0)} "
                             f"request(s), {session.get('denied_count', 0)} denied, {session.get('event_count', 0)} "
                             f"event(s)"))
    return rows


def cmd_sessions_show(client: CollectorClient, args) -> int:
    session = client.get(f"/v1/sessions/{args.id}")
    if args.json:
        _print_json(session)
        return EXIT_OK
    table = Table(show_header=False, title=f"session {session['id']}")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for label, text in session_how(session):
        table.add_row(label, text)
    table.add_section()
    for key in ("agent_id", "host", "identity", "target", "protocol", "start", "end", "event_count",
                "statement_count", "request_count", "denied_count"):
        table.add_row(key, "" if session.get(key) is None else str(session[key]))
    process = session.get("process") or {}
    for key, value in process.items():
        table.add_row(f"process.{key}", json.dumps(value) if not isinstance(value, str) else value)
    out.print(table)
    return EXIT_OK


def cmd_events(client: CollectorClient, args) -> int:
    # validate before asking: a window nobody applies would silently widen the answer
    if args.window is not None and parse_duration_ns(args.window) <= 0:
        err.print(f"error: --window {args.window!r} must be longer than 0 (it is the half-width around --at)")
        return EXIT_USAGE
    if args.window is not None and not args.at:
        err.print("error: --window needs --at TIME (it is the half-width of the window around --at); "
                  "for a range use --since/--until")
        return EXIT_USAGE
    if args.at and (args.since or args.until):
        err.print("error: --at/--window and --since/--until both set the time range: use one or the other")
        return EXIT_USAGE
    params = dict(table=args.table, identity=args.identity, type=args.type, sid=args.session,
                  since=_time_arg(args.since), until=_time_arg(args.until), limit=min(args.limit, 1000))
    if args.at:
        params.update(at=_time_arg(args.at), window=args.window or DEFAULT_WINDOW)
    items = list(client.paginate("/v1/events", max_items=args.limit, **params))
    if args.json:
        _print_json(items)
        return EXIT_OK
    table = Table(title=f"{len(items)} event(s)")
    for column in ("time (UTC)", "type", "identity", "target", "tables", "summary", "decision", "session", "agent:seq"):
        table.add_column(column, overflow="fold")
    for e in items:
        table.add_row(_short_time(e["time"]), e["type"], e["identity"] or "", e["target"] or "",
                      ", ".join(e.get("tables") or []), e["summary"] or "", e["decision"] or "", e["sid"] or "",
                      f"{e['agent_id']}:{e['seq']}")
    out.print(table)
    return EXIT_OK


def _index_of(f: dict):
    for key in ("statement_index", "request_index"):
        if f.get(key) is not None:
            return f[key]
    return None


def replay_steps(items: list[dict]) -> list[dict]:
    """The timeline as steps: one per statement or request, carrying its decision, result
    and masking (matched by statement/request index, else by order); other events stand alone."""
    steps: list[dict] = []
    by_index: dict = {}
    current = None
    for e in items:
        kind, f = e["type"], e.get("fields") or {}
        if kind in ("pg.statement", "http.request"):
            if kind == "pg.statement":
                params = f.get("params")
                text = f.get("text") or ""
                detail = f"params={json.dumps(params)}" if params else ""
            else:
                query = f"?{f['query']}" if f.get("query") else ""
                text = f"{f.get('method', '')} {f.get('host', '')}{f.get('path', '')}{query}"
                detail = ""
            if f.get("reason"):
                detail = (detail + " " if detail else "") + f"reason: {f['reason']}"
            current = {"ts": e["ts"], "step": "SQL" if kind == "pg.statement" else "HTTP", "text": text,
                       "detail": detail, "decision": f.get("decision") or e.get("decision"),
                       "policies": list(f.get("policy_ids") or []),
                       "result": None, "masking": [], "seq": e["seq"]}
            steps.append(current)
            if _index_of(f) is not None:
                by_index[_index_of(f)] = current
            continue
        owner = by_index.get(_index_of(f), current) if _index_of(f) is not None else current
        if kind == "policy.decision" and owner is not None:
            owner["decision"] = f.get("decision") or owner["decision"]
            owner["policies"] = list(f.get("policy_ids") or [])
            if f.get("reason"):
                owner["detail"] = (owner["detail"] + " " if owner["detail"] else "") + f"reason: {f['reason']}"
        elif kind in ("pg.result", "http.response") and owner is not None:
            owner["result"] = e.get("summary") or ""
        elif kind == "mask.applied" and owner is not None:
            owner["masking"].append(e.get("summary") or "masked")
        else:
            steps.append({"ts": e["ts"], "step": kind, "text": e.get("summary") or "", "detail": "",
                          "decision": e.get("decision") if kind.startswith("approval.") else None, "policies": [],
                          "result": None, "masking": [], "seq": e["seq"]})
    return steps


def cmd_replay(client: CollectorClient, args) -> int:
    session = client.get(f"/v1/sessions/{args.id}")
    items = list(client.paginate(f"/v1/sessions/{args.id}/events", limit=1000))
    items.sort(key=lambda e: (e["ts"], e["agent_id"], e["seq"]))
    steps = replay_steps(items)
    if args.json:
        _print_json({"session": session, "events": items, "steps": steps})
        return EXIT_OK
    start = session.get("start_ns") or (items[0]["ts"] if items else 0)
    out.print(f"[bold]session {session['id']}[/bold]  {session.get('identity') or '?'} → "
              f"{session.get('target') or '?'}  on {session.get('host') or session['agent_id']}  "
              f"{_process_text(session.get('process'))}  started {session.get('start')}")
    table = Table()
    for column in ("+time", "step", "statement / request", "decision", "result", "masking", "detail"):
        table.add_column(column, overflow="fold")
    for step in steps:
        decision = step["decision"] or ""
        if decision in ("deny", "denied"):
            decision = f"[red]{decision}[/red]"
        elif decision.startswith("approv") or decision == "pending":
            decision = f"[yellow]{decision}[/yellow]"
        if step["policies"]:
            decision += f" ({', '.join(map(str, step['policies']))})"
        table.add_row(f"{(step['ts'] - start) / 1e9:+.3f}s", step["step"], step["text"], decision,
                      step["result"] or "", "; ".join(step["masking"]), step["detail"])
    out.print(table)
    masked = sum(1 for step in steps if step["masking"])
    denied = sum(1 for step in steps if step["decision"] in ("deny", "denied"))
    out.print(f"{sum(1 for s in steps if s['step'] in ('SQL', 'HTTP'))} statement(s)/request(s), "
              f"{denied} denied, {masked} with masking")
    return EXIT_OK


def cmd_pcap(client: CollectorClient, args) -> int:
    from collector.pcap import write_session_pcap
    session = client.get(f"/v1/sessions/{args.id}")
    items = list(client.paginate(f"/v1/sessions/{args.id}/events", limit=1000))
    summary = write_session_pcap(args.output, session, items)
    summary["file"] = args.output
    if args.json:
        _print_json(summary)
        return EXIT_OK
    out.print(f"wrote {summary['packets']} packet(s) ({summary['messages']} message(s), {summary['statements']} "
              f"statement(s)/request(s)) {summary['client']} → {summary['server']} to {args.output}")
    if summary.get("decode_as"):
        out.print(f"port {summary['server'].rsplit(':', 1)[1]} is not a default {summary['dissector']} port: "
                  f"open with `tshark -r {args.output} -d {summary['decode_as']}` (Wireshark: Decode As…)")
    out.print("synthetic capture: messages rebuilt from the record; row values and bodies are not recorded")
    return EXIT_OK


def cmd_approvals_list(client: CollectorClient, args) -> int:
    status = None if args.status == "all" else args.status
    items = client.get("/v1/approvals", status=status)["items"]
    if args.json:
        _print_json(items)
        return EXIT_OK
    table = Table(title=f"{len(items)} approval(s)" + (f" ({status})" if status else ""))
    for column in ("id", "created (UTC)", "status", "identity", "target", "statement", "session", "decided by", "reason"):
        table.add_column(column, overflow="fold")
    for a in items:
        table.add_row(a["id"], _short_time(a["created"]), a["status"], a["identity"] or "", a["target"] or "",
                      a["statement"] or "", a["session_id"] or "", a["decided_by"] or "", a["reason"] or "")
    out.print(table)
    return EXIT_OK


def cmd_approvals_decide(client: CollectorClient, args) -> int:
    result = client.post(f"/v1/approvals/{args.id}/decision",
                         {"decision": args.approvals_command, "reason": args.reason})
    if args.json:
        _print_json(result)
    else:
        out.print(f"approval {result['id']}: {result['status']} by {result['decided_by']} ({result['reason']})")
    return EXIT_OK


def cmd_agents(client: CollectorClient, args) -> int:
    items = client.get("/v1/agents")["items"]
    if args.json:
        _print_json(items)
        return EXIT_OK
    table = Table(title=f"{len(items)} agent(s)")
    for column in ("agent", "host", "last seen", "lag s", "last seq", "events", "chain", "key", "keys",
                   "problems"):
        table.add_column(column, overflow="fold")
    for a in items:
        chain = "[green]ok[/green]" if a["chain_ok"] else "[red]FLAGGED[/red]"
        problems = "; ".join(f"{p['kind']}@{p['seq']}" for p in a["problems"][:3])
        keys = a.get("keys") or []
        current = next((k for k in keys if k["current"]), None)
        # the key signing now, since when; and how many keys the agent has had (rotations)
        key = f"{current['key_id'][:16]} since {_short_time(current['enrolled'])}" if current else ""
        table.add_row(a["agent_id"], a["hostname"] or "", _short_time(a["last_seen"]), str(a["lag_seconds"] or ""),
                      str(a["last_seq"]), str(a["events"]), chain, key,
                      f"{len(keys)} ({a.get('key_rotations', 0)} rotated)" if keys else "", problems)
    out.print(table)
    return EXIT_OK


def _unknown_agent(report: dict, agent: str | None) -> bool:
    """A named agent the collector has no evidence for (misspelt, or never enrolled here)."""
    return bool(agent) and not any(a["agent_id"] == agent for a in report["agents"])


def cmd_verify(client: CollectorClient, args) -> int:
    params = dict(agent=args.agent, since=_time_arg(args.since), until=_time_arg(args.until))
    if args.json:
        report = client.get("/v1/verify", **params)
        _print_json(report)
        return EXIT_OK if report["ok"] and not _unknown_agent(report, args.agent) else EXIT_FAIL
    with err.status("verifying stored evidence…"):
        report = client.get("/v1/verify", **params)
    if _unknown_agent(report, args.agent):
        err.print(f"error: no agent {args.agent!r} is enrolled at this collector: no evidence to verify "
                  f"(`warden agents` lists them)")
        return EXIT_FAIL
    for agent in report["agents"]:
        mark = "[green]intact[/green]" if agent["ok"] else "[red]PROBLEMS[/red]"
        checkpoint = agent.get("checkpoint")
        since = ""
        if checkpoint:
            state = "signed checkpoint" if checkpoint["signature_ok"] else "[red]INVALID checkpoint[/red]"
            since = f" from {state} at seq {checkpoint['seq']} (retention purged before {checkpoint['purged_before']})"
        out.print(f"agent {agent['agent_id']}: {mark} — {agent['batches_checked']} batch(es), "
                  f"{agent['events_checked']} event(s) checked{since}")
    if report["problems"]:
        table = Table(title=f"{len(report['problems'])} problem(s)")
        for column in ("agent", "kind", "seq", "batch id", "batch seqs", "detail"):
            table.add_column(column, overflow="fold")
        for p in report["problems"]:
            table.add_row(p["agent_id"], p["kind"], str(p["seq"] if p["seq"] is not None else ""),
                          str(p["batch_id"] if p["batch_id"] is not None else ""), p.get("batch_seq") or "",
                          p["detail"] or "")
        out.print(table)
    if not report["agents"]:
        # Nothing enrolled yet: nothing is missing or altered (exit 0); a named agent is handled above.
        out.print("no agents have enrolled yet: nothing to verify")
    return EXIT_OK if report["ok"] else EXIT_FAIL


def cmd_export(client: CollectorClient, args) -> int:
    path = "/v1/export/ocsf" if args.format == "ocsf" else "/v1/export/ndjson"
    lines = client.stream_lines(path, since=_time_arg(args.since), until=_time_arg(args.until))
    target = open(args.output, "w") if args.output else sys.stdout
    count = 0
    try:
        if args.output:
            with err.status(f"exporting {args.format}…") as status:
                for record in lines:
                    target.write(json.dumps(record, separators=(",", ":")) + "\n")
                    count += 1
                    if count % 1000 == 0:
                        status.update(f"exporting {args.format}… {count} records")
            err.print(f"wrote {count} {args.format} record(s) to {args.output}")
        else:
            for record in lines:
                target.write(json.dumps(record, separators=(",", ":")) + "\n")
    finally:
        if args.output:
            target.close()
    return EXIT_OK


# --- parser ---------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="warden", description="Query Warden's collector: sessions, events, "
                                     "replays, approvals, integrity and exports. Times: ISO-8601 (UTC if no "
                                     "zone) or relative ages like 2h, 30m.")
    parser.add_argument("--collector", default=os.environ.get("WARDEN_COLLECTOR"),
                        help="collector URL (default $WARDEN_COLLECTOR)")
    parser.add_argument("--token", default=os.environ.get("WARDEN_TOKEN"), help="bearer token (default $WARDEN_TOKEN)")
    parser.add_argument("--ca", default=os.environ.get("WARDEN_CA"), help="CA bundle for the collector's TLS certificate")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def json_flag(p):
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")
        return p

    sessions = commands.add_parser("sessions", help="sessions (one client connection each)").add_subparsers(
        dest="sessions_command", required=True, metavar="ACTION")
    slist = json_flag(sessions.add_parser("list", help="list sessions, newest first"))
    for name in ("identity", "target", "table", "host"):
        slist.add_argument(f"--{name}")
    slist.add_argument("--user", help="database role the session ran as (brokered: the role Warden logged in as)")
    slist.add_argument("--since", help="sessions active at or after this time")
    slist.add_argument("--until", help="sessions started at or before this time")
    slist.add_argument("--limit", type=int, default=100)
    slist.set_defaults(func=cmd_sessions_list)
    show = json_flag(sessions.add_parser("show", help="one session: who, how it connected (process, client, "
                                                           "database role, TLS, brokered) and how it ended"))
    show.add_argument("id")
    show.set_defaults(func=cmd_sessions_show)

    events = json_flag(commands.add_parser("events", help="events by table, identity, type and time"))
    events.add_argument("--table", help="schema.table, or table in any schema")
    events.add_argument("--identity")
    events.add_argument("--type", help="event type, e.g. pg.statement or approval.*")
    events.add_argument("--session", help="only this session id")
    events.add_argument("--at", metavar="TIME", help="center of a time window")
    events.add_argument("--window", default=None,
                        help=f"half-width of the window around --at (default {DEFAULT_WINDOW}; only with --at)")
    events.add_argument("--since")
    events.add_argument("--until")
    events.add_argument("--limit", type=int, default=200)
    events.set_defaults(func=cmd_events)

    replay = json_flag(commands.add_parser("replay", help="a session as a timeline"))
    replay.add_argument("id")
    replay.set_defaults(func=cmd_replay)

    pcap = json_flag(commands.add_parser("pcap", help="a session as a synthetic TCP capture for Wireshark",
                                         description="Write the session's recorded messages as a synthetic TCP "
                                                     "capture (PostgreSQL or HTTP) that Wireshark/tshark dissect."))
    pcap.add_argument("id")
    pcap.add_argument("-o", "--output", required=True, metavar="FILE", help="pcap file to write")
    pcap.set_defaults(func=cmd_pcap)

    approvals = commands.add_parser("approvals", help="pending and decided approvals").add_subparsers(
        dest="approvals_command", required=True, metavar="ACTION")
    alist = json_flag(approvals.add_parser("list", help="list approvals"))
    alist.add_argument("--status", default="pending", choices=["pending", "approved", "denied", "expired", "all"])
    alist.set_defaults(func=cmd_approvals_list)
    for verb in ("approve", "deny"):
        decide = json_flag(approvals.add_parser(verb, help=f"{verb} a pending approval"))
        decide.add_argument("id")
        decide.add_argument("--reason", required=True, help="why (recorded with your name)")
        decide.set_defaults(func=cmd_approvals_decide)

    agents = json_flag(commands.add_parser("agents", help="enrolled agents and their chain state"))
    agents.set_defaults(func=cmd_agents)

    verify = json_flag(commands.add_parser("verify", help="re-verify stored evidence (exit 1 if anything is wrong)",
                                           description="Re-verify stored evidence. Exit 0 when it is intact (also "
                                                       "when no agent has enrolled yet), 1 on any problem or an "
                                                       "unknown --agent."))
    verify.add_argument("--agent", help="only this agent (exit 1 if the collector does not know it)")
    verify.add_argument("--since")
    verify.add_argument("--until")
    verify.set_defaults(func=cmd_verify)

    export = commands.add_parser("export", help="stream events as OCSF or plain NDJSON")
    export.add_argument("--format", choices=["ocsf", "ndjson"], default="ocsf")
    export.add_argument("--since")
    export.add_argument("--until")
    export.add_argument("-o", "--output", metavar="FILE", help="write to FILE (default stdout)")
    export.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        client = CollectorClient(args.collector, args.token, verify=args.ca or True)
    except ClientError as exc:
        err.print(f"error: {exc}")
        return EXIT_USAGE
    try:
        return args.func(client, args)
    except TimeFormatError as exc:
        err.print(f"error: {exc}")
        return EXIT_USAGE
    except ClientError as exc:
        err.print(f"error: {exc}")
        return EXIT_FAIL
    except BrokenPipeError:
        return EXIT_OK
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
