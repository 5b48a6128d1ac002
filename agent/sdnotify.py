"""systemd's notify protocol (Type=notify): one datagram to $NOTIFY_SOCKET; and its file
descriptor passing: what the service manager hands back at start (sd_listen_fds), and the
store where a service keeps descriptors across its restarts (FDSTORE=1)."""
from __future__ import annotations

import array
import os
import socket
from typing import Iterable, MutableMapping

LISTEN_FDS_START = 3        # the first descriptor the manager passes (SD_LISTEN_FDS_START)


def notify(state: str, fds: Iterable[int] = ()) -> bool:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]       # abstract namespace
    fds = list(fds)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(path)
            if fds:
                sock.sendmsg([state.encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
            else:
                sock.sendall(state.encode())
        except OSError:
            return False
    return True


def store_fd(name: str, fd: int) -> bool:
    """Keep a duplicate of `fd` in the manager (the unit needs FileDescriptorStoreMax); it comes
    back under `name` at the next start of the service, also after a crash."""
    return notify(f"FDSTORE=1\nFDNAME={name}", [fd])


def forget_fd(name: str) -> bool:
    return notify(f"FDSTOREREMOVE=1\nFDNAME={name}")


def listen_fds(environ: MutableMapping[str, str] = os.environ) -> dict[str, list[int]]:
    """The descriptors passed to this process at start, by name; none when they were meant for
    another process (LISTEN_PID). The variables are removed so that no child takes them."""
    try:
        if int(environ.get("LISTEN_PID", "0")) != os.getpid():
            return {}
        count = int(environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return {}
    names = environ.get("LISTEN_FDNAMES", "").split(":")
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        environ.pop(key, None)
    passed: dict[str, list[int]] = {}
    for i in range(count):
        fd = LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        passed.setdefault(names[i] if i < len(names) and names[i] else "unknown", []).append(fd)
    return passed
