"""Both daemons speak systemd's notify protocol (their units are Type=notify with a watchdog)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def collect_notifications(listener: socket.socket, watchdogs: int = 2, timeout: float = 30) -> list[str]:
    """Datagrams from the daemon until READY=1 and `watchdogs` watchdog pings arrived (or time ran out)."""
    messages: list[str] = []
    deadline = time.time() + timeout
    while time.time() < deadline and not (any("READY=1" in m for m in messages)
                                           and sum("WATCHDOG=1" in m for m in messages) >= watchdogs):
        messages.append(listener.recv(4096).decode())
    return messages


def test_collector_notifies_ready_and_pets_the_watchdog():
    work = tempfile.mkdtemp(prefix="warden-notify-")
    sock_path = os.path.join(work, "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(sock_path)
    listener.settimeout(30)
    port = free_port()
    Path(work, "collector.yaml").write_text(f"listen: 127.0.0.1:{port}\nstate_dir: {work}/state\n")
    proc = subprocess.Popen([str(BIN / "warden-collector"), "serve", "--config", f"{work}/collector.yaml",
                             "--log-level", "warning"],
                            env={**os.environ, "NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "400000"})
    try:
        messages = collect_notifications(listener)
        assert any("READY=1" in m for m in messages), messages
        assert sum("WATCHDOG=1" in m for m in messages) >= 2, messages
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        listener.close()


def test_agent_notifies_ready_and_pets_the_watchdog(test_cgroup):
    from tests.agentproc import AgentProcess
    work = tempfile.mkdtemp(prefix="warden-notify-agent-")
    sock_path = os.path.join(work, "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(sock_path)
    listener.settimeout(60)
    agent = AgentProcess({"scope": {"cgroups": [test_cgroup.rel]}, "targets": []}, workdir=work,
                         env={"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "400000"}).start()
    try:
        messages = collect_notifications(listener)
        assert any(m.startswith("READY=1") for m in messages), messages
        assert sum("WATCHDOG=1" in m for m in messages) >= 2, messages
        assert agent.stop() == 0
        listener.settimeout(5)
        tail = []
        try:
            while not any("STOPPING=1" in m for m in tail):
                tail.append(listener.recv(4096).decode())
        except socket.timeout:
            pass
        assert any("STOPPING=1" in m for m in tail), tail
    finally:
        agent.stop()
        listener.close()
