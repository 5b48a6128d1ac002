"""The real `warden-collector serve` process on 127.0.0.1 and the real `warden` CLI against it."""
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from collector.simulate import SimulatedAgent

BIN = Path(sys.executable).parent
T0 = 1_714_530_900 * 10**9  # 2024-05-01T02:35:00Z


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(*args, env=None, check=True):
    result = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "COLUMNS": "250", **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"{args} -> {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def start_server(config: Path, port: int, extra=()) -> subprocess.Popen:
    process = subprocess.Popen([str(BIN / "warden-collector"), "serve", "--config", str(config),
                                "--listen", f"127.0.0.1:{port}", "--log-level", "warning", *extra],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"collector exited: {process.stdout.read().decode()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.1)
    stop(process)
    raise AssertionError("collector did not become healthy")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def collector(tmp_path):
    db = tmp_path / "collector.db"
    config = tmp_path / "collector.yaml"
    config.write_text(f"listen: 127.0.0.1:1\ndb: sqlite:///{db}\nstate_dir: {tmp_path / 'state'}\n"
                      "tokens:\n  issuer: warden-test\n  audience: warden-test-api\nretention:\n  days: 10000\n")
    port = free_port()
    process = start_server(config, port)
    yield {"config": config, "db": db, "url": f"http://127.0.0.1:{port}"}
    stop(process)


def test_serve_and_warden_cli_end_to_end(collector):
    cfg = str(collector["config"])
    enrollment = run("warden-collector", "enroll", "create", "--config", cfg, "--ttl", "10m").stdout.strip()
    auditor = run("warden-collector", "token", "create", "--config", cfg, "--role", "auditor",
                  "--subject", "carol").stdout.strip()
    approver = run("warden-collector", "token", "create", "--config", cfg, "--role", "approver",
                   "--subject", "dave", "--ttl", "1h").stdout.strip()
    url = collector["url"]
    agent = SimulatedAgent("host-a", hostname="app-1")
    assert httpx.post(f"{url}/v1/agents/enroll", json=agent.enroll_body(enrollment)).status_code == 200
    sid, evs = agent.session(identity="billing", target="customers-db", start_ns=T0,
                             statements=[("SELECT name FROM public.customers WHERE id = 7", ["public.customers"])])
    _, later = agent.session(identity="reports", target="customers-db", start_ns=T0 + 7200 * 10**9,
                             statements=[("SELECT 1 FROM public.invoices", ["public.invoices"])])
    for batch in (evs, later):
        answer = httpx.post(f"{url}/v1/ingest", content=agent.batch_bytes(batch), headers=agent.headers())
        assert answer.json()["accepted"] is True

    cli_env = {"WARDEN_COLLECTOR": url, "WARDEN_TOKEN": auditor}
    sessions = json.loads(run("warden", "sessions", "list", "--table", "public.customers", "--json", env=cli_env).stdout)
    assert [s["id"] for s in sessions] == [sid] and sessions[0]["identity"] == "billing"
    table_view = run("warden", "sessions", "list", "--identity", "billing", env=cli_env).stdout
    assert sid in table_view and "/usr/bin/psql" in table_view

    # Who touched public.customers around 02:36Z?
    found = json.loads(run("warden", "events", "--table", "public.customers", "--at", "2024-05-01T02:36:00Z",
                           "--window", "5m", "--json", env=cli_env).stdout)
    assert [(e["identity"], e["summary"]) for e in found] == [
        ("billing", "SELECT name FROM public.customers WHERE id = 7")]
    assert "billing" in run("warden", "events", "--table", "customers", "--since", "2024-05-01T00:00:00",
                            "--until", "2024-05-01T03:00:00", env=cli_env).stdout

    agents_view = run("warden", "agents", env=cli_env).stdout
    listed = json.loads(run("warden", "agents", "--json", env=cli_env).stdout)[0]
    assert "host-a" in agents_view and listed["keys"][0]["key_id"][:16] in agents_view
    assert "1 (0 rotated)" in agents_view

    replay = run("warden", "replay", sid, env=cli_env).stdout
    assert replay.index("SELECT name FROM public.customers") < replay.index("SELECT 1") < replay.index("session.end")
    assert "billing" in run("warden", "sessions", "show", sid, env=cli_env).stdout
    capture = collector["db"].parent / "session.pcap"
    wrote = run("warden", "pcap", sid, "-o", str(capture), env=cli_env).stdout
    assert "wrote" in wrote and capture.stat().st_size > 200

    # Approvals: an agent asks, an approver decides through the CLI.
    approval = httpx.post(f"{url}/v1/approvals", json={"identity": "billing", "target": "customers-db",
                                                       "statement": "DELETE FROM customers", "session_id": sid},
                          headers={"Authorization": f"Bearer {agent.token()}"}).json()
    assert approval["id"] in run("warden", "approvals", "list", env=cli_env).stdout
    refused = run("warden", "approvals", "approve", approval["id"], "--reason", "ok", env=cli_env, check=False)
    assert refused.returncode == 1 and "403" in refused.stderr
    run("warden", "--token", approver, "approvals", "deny", approval["id"], "--reason", "no ticket", env=cli_env)
    decided = httpx.get(f"{url}/v1/approvals/{approval['id']}", params={"wait": 1},
                        headers={"Authorization": f"Bearer {agent.token()}"}).json()
    assert decided["status"] == "denied" and decided["decided_by"] == "dave"

    ocsf = [json.loads(line) for line in run("warden", "export", "--format", "ocsf", env=cli_env).stdout.splitlines()]
    assert [r["class_uid"] for r in ocsf] == [6005, 6005]
    assert run("warden", "verify", env=cli_env).returncode == 0

    # Tamper with the stored evidence directly in the database.
    with sqlite3.connect(collector["db"]) as db:
        batch_id, raw = db.execute("SELECT id, raw FROM batches ORDER BY first_seq LIMIT 1").fetchone()
        db.execute("UPDATE batches SET raw = ? WHERE id = ?", (raw[:-8] + b"\x00" * 8, batch_id))
    failed = run("warden", "verify", env=cli_env, check=False)
    assert failed.returncode == 1, failed.stdout
    assert "PROBLEMS" in failed.stdout and f"1..{len(evs)}" in failed.stdout
    report = json.loads(run("warden", "verify", "--json", env=cli_env, check=False).stdout)
    assert report["ok"] is False and report["problems"][0]["batch_id"] == batch_id


def test_cli_errors_are_clear(collector, tmp_path):
    expired_result = run("warden-collector", "token", "create", "--config", str(collector["config"]), "--role",
                         "auditor", "--subject", "x", "--ttl", "1s")
    time.sleep(2.1)
    expired = run("warden", "--collector", collector["url"], "--token", expired_result.stdout.strip(),
                  "sessions", "list", check=False)
    assert expired.returncode == 1 and "expired" in expired.stderr
    unreachable = run("warden", "--collector", f"http://127.0.0.1:{free_port()}", "--token", "t", "agents", check=False)
    assert unreachable.returncode == 1 and "cannot reach the collector" in unreachable.stderr
    bad_time = run("warden", "--collector", collector["url"], "--token", "t", "events", "--at", "noonish", check=False)
    assert bad_time.returncode == 2 and "bad time" in bad_time.stderr
    for command in (["warden", "--help"], ["warden", "events", "--help"], ["warden-collector", "serve", "--help"],
                    ["warden-collector", "token", "create", "--help"], ["warden-collector", "enroll", "create", "--help"]):
        assert run(*command).returncode == 0


def test_serve_refuses_plain_http_off_loopback_and_bad_config(tmp_path):
    refused = run("warden-collector", "serve", "--state-dir", str(tmp_path), "--db", f"sqlite:///{tmp_path}/c.db",
                  "--listen", "0.0.0.0:8443", check=False)
    assert refused.returncode == 2 and "refusing plain HTTP on 0.0.0.0" in refused.stderr
    config = tmp_path / "collector.yaml"
    config.write_text("listen: 127.0.0.1:8443\nretention:\n  days: 30\n  weeks: 2\n")
    bad = run("warden-collector", "serve", "--config", str(config), check=False)
    assert bad.returncode == 2 and f"{config}:4: unknown key retention.weeks" in bad.stderr
    config.write_text("listen: [oops\n")
    assert f"{config}:2: not valid YAML" in run("warden-collector", "serve", "--config", str(config), check=False).stderr


def _token_rows(db: Path) -> int:
    with sqlite3.connect(db) as connection:
        return connection.execute("SELECT count(*) FROM tokens").fetchone()[0]


def test_token_ttl_under_a_second_is_refused(collector, tmp_path):
    cfg = str(collector["config"])
    for ttl in ("500ms", "0.9s", "0s", "0m"):
        refused = run("warden-collector", "token", "create", "--config", cfg, "--role", "auditor", "--subject", "x",
                      "--ttl", ttl, check=False)
        assert refused.returncode == 2 and refused.stdout == "", (ttl, refused.stdout)
        assert f"--ttl '{ttl}' is shorter than one second" in refused.stderr
        enroll = run("warden-collector", "enroll", "create", "--config", cfg, "--ttl", ttl, check=False)
        assert enroll.returncode == 2 and "shorter than one second" in enroll.stderr and enroll.stdout == ""
    assert _token_rows(collector["db"]) == 0  # nothing was minted
    short_default = tmp_path / "short.yaml"
    short_default.write_text(collector["config"].read_text().replace("tokens:\n", "tokens:\n  default_ttl: 100ms\n"))
    refused = run("warden-collector", "token", "create", "--config", str(short_default), "--role", "auditor",
                  "--subject", "x", check=False)
    assert refused.returncode == 2 and "tokens.default_ttl '100ms' is shorter than one second" in refused.stderr
    assert run("warden-collector", "token", "create", "--config", cfg, "--role", "auditor", "--subject", "x",
               "--ttl", "1s").returncode == 0


def test_token_create_shows_the_jti_and_revoke_takes_it_or_the_token(collector):
    import jwt
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    cfg, url = str(collector["config"]), collector["url"]
    as_json = json.loads(run("warden-collector", "token", "create", "--config", cfg, "--role", "auditor",
                             "--subject", "carol", "--json").stdout)
    assert as_json["jti"] == jwt.decode(as_json["token"], options={"verify_signature": False})["jti"]
    plain = run("warden-collector", "token", "create", "--config", cfg, "--role", "auditor", "--subject", "dave")
    token = plain.stdout.strip()
    assert plain.stdout == token + "\n"  # stdout stays the token alone, for TOKEN=$(...)
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    assert f"jti {jti}" in plain.stderr and f"warden-collector token revoke {jti}" in plain.stderr

    def agents(bearer):
        return httpx.get(f"{url}/v1/agents", headers={"Authorization": f"Bearer {bearer}"})

    assert agents(as_json["token"]).status_code == 200 and agents(token).status_code == 200
    by_token = run("warden-collector", "token", "revoke", "--config", cfg, token)
    assert by_token.stdout.strip() == f"revoked {jti}"
    by_jti = run("warden-collector", "token", "revoke", "--config", cfg, as_json["jti"])
    assert by_jti.stdout.strip() == f"revoked {as_json['jti']}"
    for revoked in (token, as_json["token"]):
        answer = agents(revoked)
        assert answer.status_code == 401 and "revoked" in answer.text
    cli_refused = run("warden", "--collector", url, "--token", token, "agents", check=False)
    assert cli_refused.returncode == 1 and "revoked" in cli_refused.stderr

    unknown = run("warden-collector", "token", "revoke", "--config", cfg, "0" * 32, check=False)
    assert unknown.returncode == 1 and "no minted token with jti" in unknown.stderr
    foreign = jwt.encode({"sub": "x", "jti": as_json["jti"]}, Ed25519PrivateKey.generate(), algorithm="EdDSA")
    refused = run("warden-collector", "token", "revoke", "--config", cfg, foreign, check=False)
    assert refused.returncode == 2 and "not signed by this collector's key" in refused.stderr
    garbage = run("warden-collector", "token", "revoke", "--config", cfg, "a.b.c", check=False)
    assert garbage.returncode == 2 and "cannot read that token" in garbage.stderr


def test_verify_of_an_unknown_agent_fails(collector):
    cfg, url = str(collector["config"]), collector["url"]
    auditor = run("warden-collector", "token", "create", "--config", cfg, "--role", "auditor",
                  "--subject", "carol").stdout.strip()
    cli_env = {"WARDEN_COLLECTOR": url, "WARDEN_TOKEN": auditor}

    def refused_for(agent_id):
        """A named agent the collector has no evidence for is never "complete evidence"."""
        missing = run("warden", "verify", "--agent", agent_id, env=cli_env, check=False)
        assert missing.returncode == 1, missing.stdout
        assert f"no agent '{agent_id}' is enrolled at this collector" in missing.stderr
        as_json = run("warden", "verify", "--agent", agent_id, "--json", env=cli_env, check=False)
        report = json.loads(as_json.stdout)
        assert as_json.returncode == 1 and report["ok"] is False
        assert [(p["kind"], p["agent_id"]) for p in report["problems"]] == [("unknown_agent", agent_id)]

    refused_for("ghost")  # on an empty collector
    # Verifying everything where no agent has enrolled yet finds nothing missing or altered:
    # exit 0, saying there was nothing to check.
    assert "no agents have enrolled yet: nothing to verify" in run("warden", "verify", env=cli_env).stdout

    agent = SimulatedAgent("host-a")
    enrollment = run("warden-collector", "enroll", "create", "--config", cfg).stdout.strip()
    assert httpx.post(f"{url}/v1/agents/enroll", json=agent.enroll_body(enrollment)).status_code == 200
    _, evs = agent.session(identity="billing", target="db", statements=[("SELECT 1", [])])
    assert httpx.post(f"{url}/v1/ingest", content=agent.batch_bytes(evs), headers=agent.headers()).json()["accepted"]
    assert run("warden", "verify", "--agent", "host-a", env=cli_env).returncode == 0
    assert run("warden", "verify", env=cli_env).returncode == 0
    refused_for("host-b")  # a misspelt name beside a known agent


def test_events_window_needs_at_and_a_valid_duration(collector):
    auditor = run("warden-collector", "token", "create", "--config", str(collector["config"]), "--role", "auditor",
                  "--subject", "carol").stdout.strip()
    cli_env = {"WARDEN_COLLECTOR": collector["url"], "WARDEN_TOKEN": auditor}
    at = ["--at", "2024-05-01T02:36:00Z"]
    for args, message in ((["--window", "10m"], "--window needs --at"),
                          (["--window", "banana"], "bad duration 'banana'"),
                          ([*at, "--window", "banana"], "bad duration 'banana'"),
                          ([*at, "--window", "0s"], "must be longer than 0"),
                          ([*at, "--since", "2h"], "use one or the other"),
                          ([*at, "--window", "1m", "--until", "now"], "use one or the other")):
        refused = run("warden", "events", *args, env=cli_env, check=False)
        assert refused.returncode == 2 and message in refused.stderr, (args, refused.stdout, refused.stderr)
    assert json.loads(run("warden", "events", *at, "--json", env=cli_env).stdout) == []  # default window 5m
    assert json.loads(run("warden", "events", *at, "--window", "1h", "--json", env=cli_env).stdout) == []
