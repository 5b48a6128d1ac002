"""Two collector replicas sharing one real PostgreSQL (started here with initdb/pg_ctl)."""
import json
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import httpx
import psycopg
import pytest

from collector.simulate import SimulatedAgent
from tests.integration.test_collector_cli import free_port, run, start_server, stop

pytestmark = pytest.mark.postgres
T0 = 1_714_530_900 * 10**9


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(candidate)
    return None


@pytest.fixture(scope="module")
def postgres():
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl or not shutil.which("runuser"):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) or runuser not installed")
    # Outside pytest's 0700 tmp tree so the postgres user can reach it.
    root = Path(tempfile.mkdtemp(prefix="warden-collector-pg-"))
    data, sockets = root / "data", root / "sock"
    sockets.mkdir()
    shutil.chown(root, "postgres")
    shutil.chown(sockets, "postgres")
    port = free_port()
    as_postgres = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_postgres, initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"],
                   check=True, capture_output=True, timeout=120)
    options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=60"
    subprocess.run([*as_postgres, pg_ctl, "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"],
                   check=True, capture_output=True, timeout=60)
    try:
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", autocommit=True) as connection:
            connection.execute("CREATE DATABASE warden")
        yield f"postgresql://postgres@127.0.0.1:{port}/warden"
    finally:
        subprocess.run([*as_postgres, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def replicas(postgres, tmp_path):
    # Both replicas share the database and the state dir (the token signing key).
    config = tmp_path / "collector.yaml"
    config.write_text(f"db: {postgres}\nstate_dir: {tmp_path / 'state'}\n")
    ports = [free_port(), free_port()]
    processes: list = [None, None]

    def launch(i):
        processes[i] = start_server(config, ports[i])
    threads = [threading.Thread(target=launch, args=(i,)) for i in range(2)]  # start together: migration race
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert all(processes), "a replica failed to start"
        yield config, [f"http://127.0.0.1:{p}" for p in ports]
    finally:
        for process in processes:
            if process is not None:
                stop(process)


def test_two_replicas_over_one_postgres(replicas, postgres):
    config, (url_a, url_b) = replicas
    cfg = str(config)
    auditor = run("warden-collector", "token", "create", "--config", cfg, "--role", "auditor", "--subject", "eve").stdout.strip()
    approver = run("warden-collector", "token", "create", "--config", cfg, "--role", "approver", "--subject", "fay").stdout.strip()
    agents = [SimulatedAgent(f"pg-agent-{i}", hostname=f"app-{i}") for i in range(2)]
    for agent in agents:
        enrollment = run("warden-collector", "enroll", "create", "--config", cfg).stdout.strip()
        assert httpx.post(f"{url_a}/v1/agents/enroll", json=agent.enroll_body(enrollment)).status_code == 200

    sid, first = agents[0].session(identity="billing", target="crm", start_ns=T0,
                                   statements=[("SELECT * FROM public.customers", ["public.customers"])])
    _, second = agents[0].session(identity="billing", target="crm", start_ns=T0 + 10**9,
                                  statements=[("UPDATE public.orders SET x = 1", ["public.orders"])])
    # Consecutive batches of one agent land on different replicas; the retry on the other one.
    assert httpx.post(f"{url_a}/v1/ingest", content=agents[0].batch_bytes(first), headers=agents[0].headers()).json()["duplicate"] is False
    raw_second = agents[0].batch_bytes(second)
    assert httpx.post(f"{url_b}/v1/ingest", content=raw_second, headers=agents[0].headers()).json()["duplicate"] is False
    assert httpx.post(f"{url_a}/v1/ingest", content=raw_second, headers=agents[0].headers()).json()["duplicate"] is True

    # Concurrent ingest from another agent through both replicas at once.
    other_batches = [agents[1].session(identity="etl", target="crm", start_ns=T0 + i * 10**9,
                                       statements=[("SELECT 1 FROM public.customers", ["public.customers"])])[1]
                     for i in range(6)]
    raws = [agents[1].batch_bytes(b) for b in other_batches]
    results = []
    for index, raw in enumerate(raws):  # in order, alternating replicas, two in flight
        url = (url_a, url_b)[index % 2]
        results.append(httpx.post(f"{url}/v1/ingest", content=raw, headers=agents[1].headers()).json())
    assert all(r["accepted"] for r in results)

    env = {"WARDEN_TOKEN": auditor}
    for url in (url_a, url_b):
        found = json.loads(run("warden", "--collector", url, "events", "--table", "public.customers", "--at",
                               "2024-05-01T02:35:00Z", "--window", "1m", "--json", env=env).stdout)
        assert {e["identity"] for e in found} == {"billing", "etl"} and len(found) == 7
        sessions = json.loads(run("warden", "--collector", url, "sessions", "list", "--table", "public.orders",
                                  "--json", env=env).stdout)
        assert [s["id"] for s in sessions] == [second[0]["sid"]]
    agents_view = httpx.get(f"{url_b}/v1/agents", headers={"Authorization": f"Bearer {auditor}"}).json()["items"]
    assert all(a["chain_ok"] for a in agents_view)
    assert run("warden", "--collector", url_b, "verify", env=env).returncode == 0

    # An approval created on A, decided on B, seen by a long-poll on A.
    agent_headers = {"Authorization": f"Bearer {agents[0].token()}"}
    approval = httpx.post(f"{url_a}/v1/approvals", json={"statement": "DROP TABLE x", "session_id": sid},
                          headers=agent_headers).json()
    decider = threading.Timer(0.5, lambda: run("warden", "--collector", url_b, "--token", approver, "approvals",
                                                 "approve", approval["id"], "--reason", "change 17"))
    decider.start()
    waited = httpx.get(f"{url_a}/v1/approvals/{approval['id']}", params={"wait": 15}, headers=agent_headers,
                       timeout=20).json()
    decider.join()
    assert waited["status"] == "approved" and waited["decided_by"] == "fay"

    # Tamper in PostgreSQL: both replicas' verify report it.
    with psycopg.connect(postgres, autocommit=True) as connection:
        batch_id, first_seq, last_seq = connection.execute(
            "SELECT id, first_seq, last_seq FROM batches WHERE agent_id = 'pg-agent-0' ORDER BY first_seq LIMIT 1").fetchone()
        connection.execute("UPDATE batches SET raw = %s WHERE id = %s", (b"tampered", batch_id))
    for url in (url_a, url_b):
        failed = run("warden", "--collector", url, "verify", "--agent", "pg-agent-0", "--json", env=env, check=False)
        assert failed.returncode == 1
        problem = json.loads(failed.stdout)["problems"][0]
        assert problem["batch_id"] == batch_id and problem["batch_seq"] == f"{first_seq}..{last_seq}"


def test_retention_on_postgres(postgres, tmp_path):
    from collector.config import CollectorConfig
    from tests.unit.test_collector_retention import Env, exercise_retention
    # Its own database, so the replica test's agents and checkpoints stay apart.
    admin_url = postgres.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin_url, autocommit=True) as connection:
        connection.execute("CREATE DATABASE warden_retention")
    env = Env(CollectorConfig(state_dir=str(tmp_path / "state"), db=postgres.rsplit("/", 1)[0] + "/warden_retention"))
    try:
        exercise_retention(env, "pg-ret-agent")
    finally:
        env.close()
