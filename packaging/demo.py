#!/usr/bin/env python3
"""`make demo`: Warden's main job end to end on this machine, then the audit trail.

Starts (all on loopback, all stopped at the end): a throwaway PostgreSQL with a `customers`
table of synthetic PII on 127.0.0.2, a small partner API on 127.0.0.3, the collector on
SQLite, and the agent governing a demo cgroup. A workload in that cgroup reads customers
(masked), tries a DELETE without WHERE (denied), runs an UPDATE that needs an approval
(approved here with a separate approver token) and calls the API. Then the `warden` CLI
prints the sessions, the events on public.customers, one replay, `warden verify`, and
the OCSF export. Needs root (BPF, cgroups). Run it as often as you like.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent import cgroups  # noqa: E402
from agent.bpfmgr import sweep_stale  # noqa: E402
from tests.pg_harness import PostgresServer  # noqa: E402  (the same throwaway-cluster helper the tests use)

BIN = Path(sys.executable).parent
OUT = Path(os.environ.get("WARDEN_DEMO_DIR", "/var/tmp/warden-demo"))

POLICY = """\
// Demo policy: the billing report may read customers, update with approval, never delete all.
@id("housekeeping")
permit (principal, action == Action::"pg:other", resource)
when { ["TransactionStmt", "VariableSetStmt", "VariableShowStmt"].contains(context.statement_kind) };

@id("billing-connect")
permit (principal == Service::"billing-report", action == Action::"pg:connect", resource == Target::"customers-db");

@id("billing-read-customers")
permit (principal == Service::"billing-report", action == Action::"pg:select", resource in Target::"customers-db");

@id("billing-write-with-where")
permit (principal == Service::"billing-report", action in [Action::"pg:update", Action::"pg:delete"],
        resource in Target::"customers-db")
when { context.has_where };

@id("customer-updates-need-approval")
@approval("required")
forbid (principal, action == Action::"pg:update", resource in Target::"customers-db")
unless { context.approved };

@id("billing-reads-partner-api")
permit (principal == Service::"billing-report", action == Action::"http:GET", resource in Target::"partner-api");
"""

SEED = """
CREATE TABLE customers (id int PRIMARY KEY, name text, email text UNIQUE, ssn text, card_number text);
INSERT INTO customers
SELECT g, 'Customer ' || g, 'customer' || g || '@example.com',
       lpad((100 + g % 500)::text, 3, '0') || '-' || lpad((10 + g % 89)::text, 2, '0') || '-' || lpad((1000 + g)::text, 4, '0'),
       '4111 1111 1111 1111'
FROM generate_series(1, 200) g;
GRANT ALL ON customers TO alice;
"""


def say(title: str) -> None:
    print(f"\n\033[1;36m== {title}\033[0m", flush=True)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
    import httpx
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited early with {proc.returncode}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit(f"{what} did not start within {timeout}s")


def cli(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "COLUMNS": "160", **(env or {})})
    if check and res.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


def stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Demo:
    def __init__(self) -> None:
        if OUT.exists():
            shutil.rmtree(OUT)          # a fresh run every time: the demo is repeatable
        OUT.mkdir(parents=True, mode=0o700)
        self.procs: list[subprocess.Popen] = []
        self.pg: PostgresServer | None = None
        self.cgroup = Path(cgroups.cgroup2_mount()) / "warden-demo"

    def in_cgroup(self, argv: list[str], **kw) -> subprocess.Popen:
        procs = self.cgroup / "cgroup.procs"

        def enter() -> None:
            procs.write_text(str(os.getpid()))
        return subprocess.Popen(argv, preexec_fn=enter, **kw)

    def run_workload(self, argv: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
        proc = self.in_cgroup(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, **(env or {})})
        out, err = proc.communicate(timeout=60)
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def start(self) -> None:
        say("1. Throwaway PostgreSQL with synthetic customer PII (127.0.0.2)")
        self.pg = PostgresServer(host="127.0.0.2").start()
        self.pg.psql_local(SEED, dbname="app")
        print(f"   postgres on {self.pg.host}:{self.pg.port}, 200 customers with emails, SSNs and card numbers")

        say("2. Partner API on 127.0.0.3 and the collector on SQLite")
        self.api_port = free_port("127.0.0.3")
        api = subprocess.Popen([sys.executable, "-m", "uvicorn", "--app-dir", str(ROOT / "packaging"), "demo_api:app",
                                "--host", "127.0.0.3",
                                "--port", str(self.api_port), "--log-level", "warning"], cwd=ROOT)
        self.procs.append(api)
        wait_http(f"http://127.0.0.3:{self.api_port}/v1/customers/1", api, "the partner API")
        self.collector_port = free_port("127.0.0.1")
        collector_cfg = OUT / "collector.yaml"
        collector_cfg.write_text(f"listen: 127.0.0.1:{self.collector_port}\nstate_dir: {OUT}/collector\n")
        collector = subprocess.Popen([str(BIN / "warden-collector"), "serve", "--config", str(collector_cfg),
                                      "--log-level", "warning"])
        self.procs.append(collector)
        self.url = f"http://127.0.0.1:{self.collector_port}"
        wait_http(self.url + "/healthz", collector, "the collector")
        enroll = cli("warden-collector", "enroll", "create", "--config", str(collector_cfg)).stdout.split()[-1]
        self.auditor = cli("warden-collector", "token", "create", "--config", str(collector_cfg), "--role", "auditor",
                           "--subject", "demo-auditor").stdout.split()[-1]
        self.approver = cli("warden-collector", "token", "create", "--config", str(collector_cfg), "--role",
                            "approver", "--subject", "demo-approver").stdout.split()[-1]
        print(f"   collector {self.url}; tokens minted for an auditor and an approver")

        say("3. The agent governs the demo cgroup /warden-demo")
        self.cgroup.mkdir(exist_ok=True)
        sweep_stale(str(self.cgroup))
        (OUT / "policy.cedar").write_text(POLICY)
        agent_cfg = {
            "agent": {"id": "demo-host", "state_dir": str(OUT / "agent"), "event_log": str(OUT / "events.jsonl"),
                      "heartbeat_interval": "5s"},
            "collector": {"url": self.url, "enrollment": enroll},
            "scope": {"cgroups": ["/warden-demo"]},
            "targets": [
                {"name": "customers-db", "protocol": "postgres",
                 "match": {"cidr": "127.0.0.2/32", "port": self.pg.port}, "listen_port": free_port("127.0.0.1")},
                {"name": "partner-api", "protocol": "http",
                 "match": {"cidr": "127.0.0.3/32", "port": self.api_port}, "listen_port": free_port("127.0.0.1")},
            ],
            "identities": [{"name": "billing-report", "match": {"cgroup": "/warden-demo"}}],
            "policy": {"path": str(OUT / "policy.cedar")},
            "masking": {"rules": [
                {"name": "ssn", "column": "*ssn*", "strategy": "partial"},
                {"name": "cards", "column": "card_number", "strategy": "partial"},
                {"name": "emails", "column": "email", "strategy": "email"},
                {"name": "api-cards", "json_key": "card_number", "strategy": "partial"},
            ]},
            "approvals": {"timeout": "60s"},
            "inventory": {"interval": "2s"},
        }
        import yaml
        (OUT / "agent.yaml").write_text(yaml.safe_dump(agent_cfg, sort_keys=False))
        agent = subprocess.Popen([str(BIN / "warden-agent"), "--log-level", "WARNING", "run",
                                  "--config", str(OUT / "agent.yaml")])
        self.procs.append(agent)
        self.agent = agent
        deadline = time.time() + 60
        while not (OUT / "events.jsonl").exists() or "agent.start" not in (OUT / "events.jsonl").read_text():
            if agent.poll() is not None or time.time() > deadline:
                raise SystemExit("the agent did not start; see the messages above")
            time.sleep(0.2)
        print("   eBPF programs attached to /warden-demo; targets customers-db and partner-api governed")

    def workload(self) -> None:
        psql = [self.pg.bin("psql"), "-h", "127.0.0.2", "-p", str(self.pg.port), "-U", "alice", "-d", "app"]
        env = {"PGPASSWORD": "alice-pw", "PGAPPNAME": "billing-report"}

        say("4. Workload reads customers (the connection was never configured for Warden)")
        res = self.run_workload(psql + ["-c", "SELECT id, name, email, ssn, card_number FROM customers "
                                              "ORDER BY id LIMIT 3"], env)
        print(res.stdout or res.stderr)

        say("5. Workload tries DELETE without WHERE")
        res = self.run_workload(psql + ["-c", "DELETE FROM customers"], env)
        print("   " + (res.stderr.strip() or res.stdout.strip()))

        say("6. Workload runs an UPDATE that needs a human approval")
        waiting = self.in_cgroup(psql + ["-c", "UPDATE customers SET email = 'ada@new.example' WHERE id = 1"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, **env})
        env_approver = {"WARDEN_COLLECTOR": self.url, "WARDEN_TOKEN": self.approver}
        approval = None
        deadline = time.time() + 30
        while approval is None and time.time() < deadline:
            items = json.loads(cli("warden", "approvals", "list", "--json", env=env_approver).stdout)
            items = items.get("items", items) if isinstance(items, dict) else items
            pending = [a for a in items if a["status"] == "pending"]
            approval = pending[0] if pending else None
            time.sleep(0.3)
        if approval is None:
            raise SystemExit("no approval request arrived at the collector")
        print(f"   pending approval {approval['id']}: {approval['identity']} wants: {approval['statement']}")
        print("   an approver runs: warden approvals approve", approval["id"], "--reason \"ticket CHG-4711\"")
        cli("warden", "approvals", "approve", approval["id"], "--reason", "ticket CHG-4711", env=env_approver)
        out, err = waiting.communicate(timeout=60)
        print("   the workload's UPDATE then ran:", (out.strip() or err.strip()))

        say("7. Workload calls the partner API over HTTP")
        res = self.run_workload(["curl", "-sS", "--max-time", "10", f"http://127.0.0.3:{self.api_port}/v1/customers/1"])
        print("   " + (res.stdout.strip() or res.stderr.strip()))

    def audit_trail(self) -> None:
        env = {"WARDEN_COLLECTOR": self.url, "WARDEN_TOKEN": self.auditor}
        # records are shipped in batches: wait until the collector holds the agent's sessions
        deadline = time.time() + 60
        while time.time() < deadline:
            res = cli("warden", "sessions", "list", "--json", env=env, check=False)
            if res.returncode == 0:
                data = json.loads(res.stdout)
                sessions = data.get("sessions", data) if isinstance(data, dict) else data
                if len(sessions) >= 4:
                    break
            time.sleep(0.5)
        say("8. Audit trail: sessions (warden sessions list)")
        print(cli("warden", "sessions", "list", env=env).stdout)
        say("9. Who touched public.customers, how, from which process (warden events --table public.customers)")
        print(cli("warden", "events", "--table", "public.customers", env=env).stdout)
        data = json.loads(cli("warden", "sessions", "list", "--table", "public.customers", "--json", env=env).stdout)
        sessions = data.get("sessions", data) if isinstance(data, dict) else data
        if sessions:
            sid = sessions[-1].get("id") or sessions[-1].get("session_id")
            say(f"10. Replay of one session (warden replay {sid})")
            print(cli("warden", "replay", sid, env=env).stdout)
        say("11. Evidence integrity (warden verify)")
        res = cli("warden", "verify", env=env, check=False)
        print(res.stdout or res.stderr)
        export = OUT / "export.ocsf.jsonl"
        cli("warden", "export", "--format", "ocsf", "-o", str(export), env=env)
        say("12. OCSF export for the SIEM")
        print(f"   {sum(1 for _ in export.open())} OCSF records written to {export}")
        if res.returncode != 0:
            raise SystemExit("warden verify reported a problem")

    def cleanup(self) -> None:
        for proc in reversed(self.procs):     # the agent first: it detaches its programs on SIGTERM
            stop(proc)
        if self.cgroup.exists():
            try:
                sweep_stale(str(self.cgroup))
            except Exception:
                pass
            cgroups.remove(str(self.cgroup))
        if self.pg is not None:
            self.pg.stop()


def main() -> int:
    if os.geteuid() != 0:
        print("make demo needs root: it attaches eBPF programs to a demo cgroup", file=sys.stderr)
        return 1
    demo = Demo()
    try:
        demo.start()
        demo.workload()
        demo.audit_trail()
    finally:
        demo.cleanup()
    say("Done")
    print(f"   everything it started is stopped and detached; files kept in {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
