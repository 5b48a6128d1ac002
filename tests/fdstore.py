"""The service manager's side of systemd's file descriptor store, for tests on hosts without
systemd: it takes FDSTORE=1 / FDNAME= / FDSTOREREMOVE=1 messages (with SCM_RIGHTS) on a
NOTIFY_SOCKET, as systemd does for a unit with FileDescriptorStoreMax=, and hands the stored
descriptors back at the next start the way sd_listen_fds(3) expects them: from descriptor 3
on, named by LISTEN_FDNAMES, counted by LISTEN_FDS, for the pid in LISTEN_PID."""
from __future__ import annotations

import array
import os
import socket
import sys
import threading

# runs in the started process before the agent: moves the stored descriptors to 3, 4, ... and
# names its own pid (kept across exec) as their receiver
_LAUNCHER = r"""
import fcntl, os, sys
src = [int(x) for x in sys.argv[1].split(",") if x]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 1000) for fd in src]
for fd in src:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i, inheritable=True)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2], sys.argv[2:])
"""


class FdStore:
    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.stored: dict[str, list[int]] = {}
        self.messages: list[dict] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while True:
            try:
                data, ancdata, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(64 * 4))
            except OSError:
                return
            fds = array.array("i")
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._lock:
                self.messages.append(fields)
                name = fields.get("FDNAME", "stored")
                if fields.get("FDSTORE") == "1":
                    self.stored.setdefault(name, []).extend(fds)
                    continue
                if fields.get("FDSTOREREMOVE") == "1":
                    for fd in self.stored.pop(name, []):
                        os.close(fd)
            for fd in fds:                 # not a store message: the manager would not keep them
                os.close(fd)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self.stored)

    def launch(self, argv: list[str]) -> tuple[list[str], dict, tuple]:
        """argv, environment and pass_fds to start a process that receives the stored descriptors."""
        env = {"NOTIFY_SOCKET": self.path}
        with self._lock:
            names, fds = [], []
            for name, held in self.stored.items():
                for fd in held:
                    names.append(name)
                    fds.append(fd)
        if not fds:
            return argv, env, ()
        env.update(LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=":".join(names))
        return ([sys.executable, "-c", _LAUNCHER, ",".join(map(str, fds)), *argv], env, tuple(fds))

    def close(self) -> None:
        self.sock.close()
        with self._lock:
            for held in self.stored.values():
                for fd in held:
                    os.close(fd)
            self.stored.clear()
