"""Run the real `warden-agent run` as a subprocess for tests, and read its JSON event log."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Optional

import yaml


class AgentProcess:
    def __init__(self, config: dict, cgroup=None, workdir: Optional[str] = None, env: Optional[dict] = None,
                 fd_store=None):
        """`fd_store`: a tests.fdstore.FdStore standing for systemd's descriptor store."""
        self.env = {**os.environ, **(env or {})}
        self.fd_store = fd_store
        self.workdir = workdir or tempfile.mkdtemp(prefix="warden-agent-test-")
        self.config = dict(config)
        agent = dict(self.config.get("agent") or {})
        agent.setdefault("state_dir", os.path.join(self.workdir, "state"))
        agent.setdefault("event_log", os.path.join(self.workdir, "events.jsonl"))
        self.config["agent"] = agent
        self.config.setdefault("inventory", {"interval": "1s"})
        self.event_log = agent["event_log"]
        self.config_path = os.path.join(self.workdir, "agent.yaml")
        with open(self.config_path, "w") as f:
            yaml.safe_dump(self.config, f)
        self.cgroup = cgroup
        self.proc: Optional[subprocess.Popen] = None
        self.stderr_path = os.path.join(self.workdir, "agent.stderr")

    def start(self, timeout: float = 60) -> "AgentProcess":
        starts_before = len(self.events("agent.start"))
        argv = [sys.executable, "-m", "agent.cli", "run", "--config", self.config_path]
        env, pass_fds = self.env, ()
        if self.fd_store is not None:
            argv, extra, pass_fds = self.fd_store.launch(argv)
            env = {**self.env, **extra}
        stderr = open(self.stderr_path, "a")
        if self.cgroup is not None:
            self.proc = self.cgroup.popen(argv, stdout=subprocess.DEVNULL, stderr=stderr, env=env, pass_fds=pass_fds)
        else:
            self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr, env=env, pass_fds=pass_fds)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if len(self.events("agent.start")) > starts_before:
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}: {self.stderr()}")
            time.sleep(0.1)
        raise RuntimeError(f"agent did not become ready in {timeout}s: {self.stderr()}")

    def stderr(self) -> str:
        try:
            with open(self.stderr_path) as f:
                return f.read()[-4000:]
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 20) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def hand_over(self, timeout: float = 30) -> int:
        """HANDOVER_SIGNAL (SIGUSR2), as `warden-agent restart` and `systemctl restart` send:
        stop with the programs left attached."""
        from agent.daemon import HANDOVER_SIGNAL
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError("the agent is not running")
        self.proc.send_signal(HANDOVER_SIGNAL)
        return self.proc.wait(timeout=timeout)

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def events(self, event_type: Optional[str] = None) -> list[dict]:
        try:
            with open(self.event_log) as f:
                lines = f.readlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            line = line.strip()
            if not line:
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                continue      # a line being written right now
            if event_type is None or ev["type"] == event_type:
                out.append(ev)
        return out

    def wait_for(self, predicate, timeout: float = 10, what: str = "event"):
        deadline = time.time() + timeout
        while time.time() < deadline:
            for ev in self.events():
                if predicate(ev):
                    return ev
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; events: {self.events()[-20:]}\nstderr: {self.stderr()}")
