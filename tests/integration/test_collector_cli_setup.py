"""The README's first-configuration steps: `sudo warden-collector enroll create` / `token create`
(no --config) and then the service, which runs as its own user, on the same state dir.
Never touches /etc/warden or /var/lib/warden-collector: temp dirs stand in for both."""
from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import sqlite3
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from collector import cli as collector_cli
from collector.simulate import SimulatedAgent
from tests.collectorproc import BIN, free_port

ROOT = Path(__file__).resolve().parents[2]
SETPRIV = shutil.which("setpriv")


# --- (a) the packaged config is the default -------------------------------------------

def test_default_config_is_what_the_unit_passes():
    unit = (ROOT / "packaging/systemd/warden-collector.service").read_text()
    exec_start = re.search(r"^ExecStart=.*\bserve\b.*--config\s+(\S+)", unit, re.MULTILINE)
    assert exec_start and exec_start.group(1) == collector_cli.DEFAULT_CONFIG


def test_commands_without_config_read_the_packaged_file(tmp_path, monkeypatch, capsys):
    db = tmp_path / "elsewhere" / "evidence.db"
    packaged = tmp_path / "collector.yaml"
    packaged.write_text(f"db: sqlite:///{db}\nstate_dir: {tmp_path / 'state'}\n")
    monkeypatch.delenv("WARDEN_COLLECTOR_CONFIG", raising=False)
    monkeypatch.setattr(collector_cli, "DEFAULT_CONFIG", str(packaged))
    parse = collector_cli.build_parser().parse_args

    # Checked before anything runs: without the fix this would be the built-in defaults
    # (the real /var/lib/warden-collector), which a test must never write to.
    config = collector_cli._load(parse(["enroll", "create"]))
    assert (config.source, config.db, config.state_dir) == (str(packaged), f"sqlite:///{db}", str(tmp_path / "state"))

    assert collector_cli.main(["enroll", "create"]) == 0
    token = capsys.readouterr().out.strip()
    with sqlite3.connect(db) as connection:  # the enrollment token is in the configured database
        assert connection.execute("SELECT count(*) FROM tokens WHERE kind = 'enroll'").fetchone() == (1,)
    assert token.startswith("wenr_")

    # $WARDEN_COLLECTOR_CONFIG and --config still win; no packaged file: built-in defaults.
    other = tmp_path / "other.yaml"
    other.write_text(f"state_dir: {tmp_path / 'other-state'}\n")
    monkeypatch.setenv("WARDEN_COLLECTOR_CONFIG", str(other))
    assert collector_cli._load(parse(["migrate"])).source == str(other)
    assert collector_cli._load(parse(["migrate", "--config", str(packaged)])).source == str(packaged)
    monkeypatch.delenv("WARDEN_COLLECTOR_CONFIG")
    monkeypatch.setattr(collector_cli, "DEFAULT_CONFIG", str(tmp_path / "absent.yaml"))
    assert collector_cli._load(parse(["migrate"])).source == "<defaults>"


# --- (b) run as root, the files belong to the state dir's owner ---------------------------

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or SETPRIV is None, reason="needs root and setpriv to act as another user")


@pytest.fixture
def service_user():
    try:
        user = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no unprivileged 'nobody' user")
    return user


@pytest.fixture
def packaged_layout(service_user):
    """/var/lib/warden-collector as the postinstall script makes it: 0700, owned by the service
    user; the config beside it (readable by that user, as the package's 0640 root:group)."""
    base = Path(tempfile.mkdtemp(prefix="warden-setup-"))
    os.chmod(base, 0o755)
    state = base / "state"
    state.mkdir(mode=0o700)
    os.chown(state, service_user.pw_uid, service_user.pw_gid)
    port = free_port()
    config = base / "collector.yaml"
    config.write_text(f"listen: 127.0.0.1:{port}\nstate_dir: {state}\n")
    config.chmod(0o644)
    yield {"base": base, "state": state, "config": config, "port": port, "url": f"http://127.0.0.1:{port}"}
    shutil.rmtree(base, ignore_errors=True)


def as_root(*args: str) -> subprocess.CompletedProcess:
    """A command the admin runs with sudo (umask 022, as sudo leaves it)."""
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=60,
                          umask=0o022)


def as_user(user, *args: str, **kwargs):
    command = [SETPRIV, f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
               str(BIN / args[0]), *args[1:]]
    if kwargs.pop("background", False):
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return subprocess.run(command, capture_output=True, text=True, timeout=60, **kwargs)


def owners_and_modes(state: Path) -> dict:
    return {p.name: (p.lstat().st_uid, p.lstat().st_gid, stat.S_IMODE(p.lstat().st_mode)) for p in state.iterdir()}


@needs_root
def test_readme_first_configuration_then_service_as_its_user(packaged_layout, service_user):
    layout, cfg = packaged_layout, str(packaged_layout["config"])
    enrolled = as_root("warden-collector", "enroll", "create", "--config", cfg)
    assert enrolled.returncode == 0, enrolled.stderr
    minted = as_root("warden-collector", "token", "create", "--config", cfg, "--role", "auditor",
                     "--subject", "alice@bank.example", "--ttl", "8h")
    assert minted.returncode == 0, minted.stderr

    files = owners_and_modes(layout["state"])
    assert {"collector.db", "collector.db.writer-lock", "collector_signing_key.pem"} <= set(files)
    for name, (uid, gid, mode) in files.items():
        assert (uid, gid) == (service_user.pw_uid, service_user.pw_gid), f"{name} owned by {uid}:{gid}"
        assert mode & 0o077 == 0, f"{name} has mode {mode:o}: the database and key must stay private"

    # `systemctl start warden-collector`: the service runs as the state dir's owner.
    server = as_user(service_user, "warden-collector", "serve", "--config", cfg, "--log-level", "warning",
                     background=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert server.poll() is None, f"collector exited: {server.stdout.read().decode()}"
            try:
                if httpx.get(layout["url"] + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "collector did not become healthy"
            time.sleep(0.1)
        url, agent = layout["url"], SimulatedAgent("web-1")
        # The enrollment token and the bearer token root minted are the service's.
        assert httpx.post(f"{url}/v1/agents/enroll", json=agent.enroll_body(enrolled.stdout.strip())).status_code == 200
        _, events = agent.session(identity="billing", target="customers-db", statements=[("SELECT 1", [])])
        stored = httpx.post(f"{url}/v1/ingest", content=agent.batch_bytes(events), headers=agent.headers())
        assert stored.status_code == 200 and stored.json()["accepted"] is True  # a write: the writer lock
        listed = httpx.get(f"{url}/v1/agents", headers={"Authorization": f"Bearer {minted.stdout.strip()}"})
        assert listed.status_code == 200 and [a["agent_id"] for a in listed.json()["items"]] == ["web-1"]
    finally:
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()

    # Root again after the service: still the service user's files.
    assert as_root("warden-collector", "token", "create", "--config", cfg, "--role", "admin",
                   "--subject", "ops").returncode == 0
    assert {uid for uid, _, _ in owners_and_modes(layout["state"]).values()} == {service_user.pw_uid}


@needs_root
def test_root_owned_files_from_an_earlier_run_are_handed_back(packaged_layout, service_user):
    """What the old CLI left behind is repaired by the next command run as root, without
    following links the state dir's owner could have planted."""
    state, cfg = packaged_layout["state"], str(packaged_layout["config"])
    lock = state / "collector.db.writer-lock"
    lock.write_text("")
    lock.chmod(0o644)
    victim = packaged_layout["base"] / "victim"
    victim.write_text("root's")
    (state / "collector_signing_key.pem").symlink_to(victim)

    # The service (and the CLI run as the user) cannot use a root-owned lock: a clear error.
    refused = as_user(service_user, "warden-collector", "migrate", "--config", cfg)
    assert refused.returncode == 1, refused.stderr
    assert "cannot open the SQLite writer lock" in refused.stderr and "uid 0" in refused.stderr
    assert "Traceback" not in refused.stderr

    migrated = as_root("warden-collector", "migrate", "--config", cfg)
    assert migrated.returncode == 0, migrated.stderr
    assert victim.stat().st_uid == 0 and (state / "collector_signing_key.pem").is_symlink()  # not followed
    info = lock.stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (service_user.pw_uid, 0o600)
    assert as_user(service_user, "warden-collector", "migrate", "--config", cfg).returncode == 0
