"""systemd's descriptor passing as the agent speaks it: the notify datagram with SCM_RIGHTS for
FDSTORE=1, and sd_listen_fds's rules for what is handed back (LISTEN_PID, LISTEN_FDS from 3,
LISTEN_FDNAMES, the variables removed so no child takes them)."""
import array
import os
import socket

from agent import sdnotify


def test_store_fd_sends_the_name_and_a_duplicate_of_the_descriptor(tmp_path, monkeypatch):
    path = str(tmp_path / "notify.sock")
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    r, w = os.pipe()
    try:
        assert sdnotify.store_fd("listen-v4-15432", r)
        data, ancdata, _flags, _addr = manager.recvmsg(1024, socket.CMSG_SPACE(4))
        assert data == b"FDSTORE=1\nFDNAME=listen-v4-15432"
        (level, kind, payload), = ancdata
        assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
        (received,) = array.array("i", payload)
        os.write(w, b"x")
        assert os.read(received, 1) == b"x"        # the same pipe, through the manager's copy
        os.close(received)
        assert sdnotify.forget_fd("listen-v4-15432")
        assert manager.recv(1024) == b"FDSTOREREMOVE=1\nFDNAME=listen-v4-15432"
    finally:
        os.close(r)
        os.close(w)
        manager.close()


def test_without_a_manager_nothing_is_sent():
    saved = os.environ.pop("NOTIFY_SOCKET", None)
    try:
        assert sdnotify.store_fd("x", 0) is False
    finally:
        if saved is not None:
            os.environ["NOTIFY_SOCKET"] = saved


_CHILD = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
from agent import sdnotify
pipes = [os.pipe() for _ in range(3)]
for i, (r, w) in enumerate(pipes):
    os.dup2(r, 3 + i)
env = {"LISTEN_PID": sys.argv[2] or str(os.getpid()), "LISTEN_FDS": "3",
       "LISTEN_FDNAMES": "listen-v4-1:listen-v6-1:listen-v4-1", "OTHER": "kept"}
got = sdnotify.listen_fds(env)
print(json.dumps({"got": got, "env": sorted(env),
                  "cloexec": [not os.get_inheritable(fd) for fds in got.values() for fd in fds]}))
"""


def _child(listen_pid: str = "") -> dict:
    import json
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", _CHILD, root, listen_pid], capture_output=True, text=True,
                         check=True, timeout=60)
    return json.loads(out.stdout)


def test_passed_descriptors_are_named_from_three_on_and_the_variables_removed():
    result = _child()
    assert result["got"] == {"listen-v4-1": [3, 5], "listen-v6-1": [4]}
    assert result["env"] == ["OTHER"]                     # no child of the agent takes them
    assert result["cloexec"] == [True, True, True]


def test_descriptors_meant_for_another_process_are_not_taken():
    result = _child(listen_pid="1")
    assert result["got"] == {}
    assert "LISTEN_FDS" in result["env"]


def test_a_passed_listener_is_used_only_if_it_listens_where_the_target_does():
    from agent.daemon import _passed_listener
    right = socket.socket()
    right.bind(("127.0.0.1", 0))
    right.listen()
    port = right.getsockname()[1]
    unbound = socket.socket()
    r, w = os.pipe()
    wrong_place = socket.socket()
    wrong_place.bind(("127.0.0.1", 0))
    wrong_place.listen()
    try:
        fds = [os.dup(unbound.fileno()), r, os.dup(wrong_place.fileno()), os.dup(right.fileno())]
        sock = _passed_listener(fds, "127.0.0.1", port)
        assert sock is not None and sock.fileno() == fds[3] and sock.getsockname() == ("127.0.0.1", port)
        for fd in fds[:3]:                  # the others are closed, a pipe included
            try:
                os.fstat(fd)
                raise AssertionError(f"descriptor {fd} was left open")
            except OSError:
                pass
        sock.close()
        assert _passed_listener([], "127.0.0.1", port) is None
    finally:
        os.close(w)
        for s in (right, unbound, wrong_place):
            s.close()
