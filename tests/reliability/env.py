"""The real parts a reliability scenario runs: collector process, PostgreSQL, agent, workloads,
and the accounting that compares what the agent produced with what the collector stored.

Everything listens on loopback; every process started here is stopped here, by pid.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import httpx

from tests.agentproc import AgentProcess
from tests.pg_harness import PostgresServer, free_port

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]


def cli(*args, env=None, check=True, timeout=120) -> subprocess.CompletedProcess:
    res = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "COLUMNS": "250", **(env or {})})
    if check and res.returncode != 0:
        raise RuntimeError(f"{args} -> {res.returncode}\n{res.stdout}\n{res.stderr}")
    return res


def wait_until(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------
class CollectorProcess:
    """`warden-collector serve` on SQLite; can be stopped and started again on the same port and state."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = os.path.join(workdir, "collector.yaml")
        Path(self.config).write_text(f"state_dir: {workdir}/state\nlisten: 127.0.0.1:{self.port}\n")
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = os.path.join(workdir, "collector.log")
        self.enroll_token = ""
        self.auditor = ""

    @property
    def db_path(self) -> str:
        return os.path.join(self.workdir, "state", "collector.db")

    def start(self) -> "CollectorProcess":
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen([str(BIN / "warden-collector"), "serve", "--config", self.config,
                                      "--listen", f"127.0.0.1:{self.port}", "--log-level", "warning"],
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()

        def healthy():
            if self.proc.poll() is not None:
                raise RuntimeError(f"collector exited: {Path(self.log_path).read_text()[-2000:]}")
            try:
                return httpx.get(self.url + "/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False
        wait_until(healthy, 60, "the collector to answer /healthz", 0.1)
        if not self.auditor:
            self.enroll_token = cli("warden-collector", "enroll", "create", "--config",
                                    self.config).stdout.strip().split()[-1]
            self.auditor = cli("warden-collector", "token", "create", "--config", self.config, "--role", "auditor",
                               "--subject", "reliability").stdout.strip().split()[-1]
        return self

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    @property
    def cli_env(self) -> dict:
        return {"WARDEN_COLLECTOR": self.url, "WARDEN_TOKEN": self.auditor}

    def get(self, path: str, **params):
        r = httpx.get(self.url + path, params=params, timeout=60,
                      headers={"Authorization": f"Bearer {self.auditor}"})
        r.raise_for_status()
        return r.json()

    def agent_row(self, agent_id: str) -> Optional[dict]:
        rows = self.get("/v1/agents")
        rows = rows.get("items", rows) if isinstance(rows, dict) else rows
        return next((a for a in rows if a["agent_id"] == agent_id), None)

    def all_events(self, agent_id: str) -> list[dict]:
        out = []
        with httpx.stream("GET", self.url + "/v1/export/ndjson", timeout=120,
                          headers={"Authorization": f"Bearer {self.auditor}"}) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if line.strip():
                    ev = json.loads(line)
                    if ev["agent_id"] == agent_id:
                        out.append(ev)
        return out

    def batch_ranges(self, agent_id: str) -> list[tuple[int, int]]:
        # the evidence table itself (read-only): a batch stored twice would show here
        conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=30)
        try:
            return conn.execute("SELECT first_seq, last_seq FROM batches WHERE agent_id = ?", (agent_id,)).fetchall()
        finally:
            conn.close()

    def verify(self) -> tuple[bool, str]:
        res = cli("warden", "verify", "--json", env=self.cli_env, check=False)
        return res.returncode == 0, (res.stdout + res.stderr)[-1500:]


# ---------------------------------------------------------------------------------------------
def start_postgres(extra_conf: Optional[dict] = None) -> PostgresServer:
    conf = {"log_connections": "on"}
    conf.update(extra_conf or {})
    return PostgresServer(extra_conf=conf).start()


def server_log(pg: PostgresServer) -> str:
    try:
        return Path(pg.base, "log").read_text(errors="replace")
    except OSError:
        return ""


def restart_postgres(pg: PostgresServer) -> None:
    """pg_ctl restart -m fast: every backend's client gets FATAL 57P01."""
    pg._run(pg.bin("pg_ctl"), "-D", pg.datadir, "-l", os.path.join(pg.base, "log"), "-m", "fast", "-w",
            "-t", "60", "restart")
    with open(os.path.join(pg.datadir, "postmaster.pid")) as f:
        pg.pid = int(f.readline())


def agent_config(agent_id: str, collector: CollectorProcess, cgroup_rel: str, pg: PostgresServer,
                 listen_port: int, spool_max: Optional[int] = None, target_options: Optional[dict] = None,
                 heartbeat: str = "1s") -> dict:
    target = {"name": "reliability-db", "protocol": "postgres",
              "match": {"cidr": f"{pg.host}/32", "port": pg.port}, "listen_port": listen_port,
              "on_enforcer_down": "refuse"}
    target.update(target_options or {})
    config = {
        "agent": {"id": agent_id, "heartbeat_interval": heartbeat},
        "collector": {"url": collector.url, "enrollment": collector.enroll_token},
        "scope": {"cgroups": [cgroup_rel]},
        "targets": [target],
        "identities": [{"name": "reliability-svc", "match": {"cgroup": cgroup_rel}}],
    }
    if spool_max is not None:
        config["spool"] = {"max_bytes": spool_max, "on_full": "refuse"}
    return config


def chain_head(agent: AgentProcess) -> int:
    """The agent's own last sequence number, from its durable chain-head file and spool."""
    state = agent.config["agent"]["state_dir"]
    best = 0
    try:
        data = Path(state, "records", "chain-head").read_bytes()
        if len(data) == 40:
            best = int.from_bytes(data[:8], "little")
    except FileNotFoundError:
        pass
    for _first, last in spooled_ranges(agent):
        best = max(best, last)
    return best


def spooled_ranges(agent: AgentProcess) -> list[tuple[int, int]]:
    """Sequence ranges still waiting in the (stopped) agent's spool."""
    from records.batch import decode_batch
    from records.spool import Spool
    path = agent.config.get("spool", {}).get("path") or os.path.join(agent.config["agent"]["state_dir"], "spool")
    if not os.path.isdir(path):
        return []
    spool = Spool(path, max_bytes=1 << 40)
    try:
        out = []
        for _ref, data in spool.pending():
            b = decode_batch(data)
            out.append((b.first_seq, b.last_seq))
        return out
    finally:
        spool.close()


def latest_heartbeat(agent: AgentProcess) -> Optional[dict]:
    beats = agent.events("agent.heartbeat")
    return beats[-1]["f"] if beats else None


def wait_drained(agent: AgentProcess, collector: CollectorProcess, agent_id: str, timeout: float,
                 quiet_since: float) -> None:
    """Until the collector holds everything the agent had chained at a heartbeat sent well after the
    workload stopped at `quiet_since` (so every workload event was sealed into the chain by then)."""
    settle_ns = int((quiet_since + 1.5) * 1e9)      # the writer seals within its 0.5 s batch delay

    def drained():
        beats = [b for b in agent.events("agent.heartbeat") if b["ts"] > settle_ns]
        if not beats:
            return False
        row = collector.agent_row(agent_id)
        return row is not None and row["last_seq"] >= beats[-1]["f"].get("chain_seq", 0)
    wait_until(drained, timeout, "the spool to drain to the collector", 0.5)


# ---------------------------------------------------------------------------------------------
@dataclass
class Accounting:
    produced: int                 # the agent's chain head: every event it made durable
    stored: int                   # distinct events at the collector
    spooled: int                  # still in the stopped agent's spool (not lost: shipped at next start)
    lost: int                     # in the chain, neither stored nor spooled
    duplicated: int               # stored more than once (event rows or overlapping batches)
    chain_ok: bool                # the collector flagged no gap / broken chain for this agent
    verify_ok: bool
    verify_out: str
    problems: list = field(default_factory=list)
    events: list = field(default_factory=list)


def account(collector: CollectorProcess, agent: AgentProcess, agent_id: str) -> Accounting:
    """Call with the agent stopped: compares its chain with the collector's store."""
    produced = chain_head(agent)
    events = collector.all_events(agent_id)
    seqs = [e["seq"] for e in events]
    stored = set(seqs)
    spooled = set()
    for first, last in spooled_ranges(agent):
        spooled.update(range(first, last + 1))
    expected = set(range(1, produced + 1))
    lost = expected - stored - spooled
    covered = []
    for first, last in collector.batch_ranges(agent_id):
        covered.extend(range(first, last + 1))
    duplicated = max(len(seqs) - len(stored), len(covered) - len(set(covered)))
    row = collector.agent_row(agent_id) or {}
    verify_ok, verify_out = collector.verify()
    return Accounting(produced=produced, stored=len(stored), spooled=len(spooled - stored), lost=len(lost),
                      duplicated=duplicated, chain_ok=bool(row.get("chain_ok")) and not row.get("problem_count"),
                      verify_ok=verify_ok, verify_out=verify_out, problems=row.get("problems", []), events=events)


def sessions_by_app(events: list[dict]) -> dict[str, dict]:
    """application_name -> {"sids", "start": n, "end": n} from stored events (workloads name each session)."""
    app_of: dict[str, str] = {}
    for ev in events:
        if ev["type"] == "session.start" and ev.get("sid") and ev["fields"].get("application_name"):
            app_of[ev["sid"]] = ev["fields"]["application_name"]
    out: dict[str, dict] = {}
    for ev in events:
        app = app_of.get(ev.get("sid"))
        if app is None or ev["type"] not in ("session.start", "session.end"):
            continue
        entry = out.setdefault(app, {"sids": set(), "start": 0, "end": 0})
        entry["sids"].add(ev["sid"])
        entry["start" if ev["type"] == "session.start" else "end"] += 1
    return out


def statements_by_app(events: list[dict]) -> dict[str, list[str]]:
    """application_name -> the texts of its sessions' pg.statement events, from stored events."""
    app_of = {ev["sid"]: ev["fields"]["application_name"] for ev in events
              if ev["type"] == "session.start" and ev.get("sid") and ev["fields"].get("application_name")}
    out: dict[str, list[str]] = {}
    for ev in events:
        if ev["type"] == "pg.statement" and ev.get("sid") in app_of:
            out.setdefault(app_of[ev["sid"]], []).append(ev["fields"].get("text", ""))
    return out


# ---------------------------------------------------------------------------------------------
class Workload:
    """A workload process in the test cgroup, its JSON lines collected as it runs."""

    def __init__(self, cgroup, *args: str, stdin: bool = False):
        self.proc = cgroup.popen([sys.executable, "-m", "tests.reliability.workload", *args], cwd=str(REPO),
                                 stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        self.lines: list[dict] = []
        import threading
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.stderr_lines: list[str] = []
        self._err_reader = threading.Thread(target=self._read_err, daemon=True)
        self._err_reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            line = line.strip()
            if line:
                try:
                    item = json.loads(line)
                except ValueError:
                    continue
                with self._lock:
                    self.lines.append(item)

    def _read_err(self) -> None:
        for line in self.proc.stderr:
            self.stderr_lines.append(line)

    def results(self) -> list[dict]:
        with self._lock:
            return list(self.lines)

    def wait_line(self, predicate, timeout: float, what: str) -> dict:
        def found():
            for item in self.results():
                if predicate(item):
                    return item
            if self.proc.poll() is not None and not self._reader.is_alive():
                raise RuntimeError(f"workload exited ({self.proc.returncode}) before {what}: "
                                   f"{''.join(self.stderr_lines)[-2000:]}")
            return None
        return wait_until(found, timeout, what, 0.1)

    def send_line(self, text: str = "go") -> None:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class Scene:
    """Work directory + cleanup stack for one scenario."""

    def __init__(self, name: str):
        self.name = name
        self.workdir = tempfile.mkdtemp(prefix=f"warden-rel-{name}-")
        self._cleanups: list = []

    def on_exit(self, fn, *args) -> None:
        self._cleanups.append((fn, args))

    def close(self, keep: bool = False) -> None:
        for fn, args in reversed(self._cleanups):
            try:
                fn(*args)
            except Exception as exc:       # cleanup goes on; the scenario result already says what failed
                print(f"[{self.name}] cleanup {getattr(fn, '__name__', fn)} failed: {exc}", file=sys.stderr)
        if keep:
            print(f"[{self.name}] work directory kept: {self.workdir}", file=sys.stderr)
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)
