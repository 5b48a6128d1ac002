"""Run the real `warden-collector serve` (SQLite in a temp dir) for tests, with its CLI helpers."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import httpx

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str, env: Optional[dict] = None, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run one of our console scripts (warden, warden-collector, warden-agent) from this venv."""
    res = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "COLUMNS": "250", **(env or {})})
    if check and res.returncode != 0:
        raise AssertionError(f"{args} -> {res.returncode}\n{res.stdout}\n{res.stderr}")
    return res


class CollectorProcess:
    def __init__(self, env: Optional[dict] = None):
        self.work = tempfile.mkdtemp(prefix="warden-test-collector-")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = str(Path(self.work, "collector.yaml"))
        Path(self.config).write_text(f"listen: 127.0.0.1:{self.port}\nstate_dir: {self.work}/state\n")
        self.env = {**os.environ, **(env or {})}
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 30) -> "CollectorProcess":
        self.proc = subprocess.Popen([str(BIN / "warden-collector"), "serve", "--config", self.config,
                                      "--log-level", "warning"], env=self.env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"collector exited: {self.proc.stdout.read().decode()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise AssertionError("collector did not become healthy")
            time.sleep(0.1)

    def enrollment(self) -> str:
        return cli("warden-collector", "enroll", "create", "--config", self.config).stdout.split()[-1]

    def token(self, role: str, subject: str) -> str:
        return cli("warden-collector", "token", "create", "--config", self.config, "--role", role,
                   "--subject", subject).stdout.split()[-1]

    def cli_env(self, token: str) -> dict:
        return {"WARDEN_COLLECTOR": self.url, "WARDEN_TOKEN": token}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.work, ignore_errors=True)
