"""Enrich a kernel capture (tgid, uid, cgroup id, comm) with what /proc and psutil know.

The kernel's capture is authoritative; /proc only adds detail, and a process that has
exited since connect() keeps the captured facts with the rest left empty.
"""
from __future__ import annotations

import pwd
import re
from functools import lru_cache
from typing import Optional

import psutil

from agent import cgroups
from enforcer.context import ProcessInfo

# docker: /system.slice/docker-<64 hex>.scope or /docker/<id>; containerd/k8s: cri-containerd-<id>.scope,
# /kubepods/.../<id>; ECS: /ecs/<task id>/<64 hex>
_CONTAINER_PATTERNS = (
    re.compile(r"docker-([0-9a-f]{64})\.scope"),
    re.compile(r"/docker/([0-9a-f]{64})"),
    re.compile(r"cri-containerd-([0-9a-f]{64})\.scope"),
    re.compile(r"crio-([0-9a-f]{64})\.scope"),
    re.compile(r"/kubepods[^ ]*/([0-9a-f]{64})$"),
    re.compile(r"/ecs/[0-9a-f-]+/([0-9a-f]{64})"),
    re.compile(r"libpod-([0-9a-f]{64})\.scope"),
)
_UNIT_RE = re.compile(r"([^/]+\.(?:service|scope))$")


def container_id(cgroup_path: str) -> str:
    for pattern in _CONTAINER_PATTERNS:
        m = pattern.search(cgroup_path)
        if m:
            return m.group(1)
    return ""


def systemd_unit(cgroup_path: str) -> str:
    """The innermost systemd unit in a cgroup path ('' outside systemd's tree)."""
    for part in reversed(cgroup_path.split("/")):
        m = _UNIT_RE.match(part)
        if m:
            return m.group(1)
    return ""


@lru_cache(maxsize=4096)
def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return ""


class CgroupNames:
    """cgroup id → path, refreshed by a walk of cgroupfs when an id is unknown."""

    def __init__(self) -> None:
        self._names: dict[int, str] = {}

    def path(self, cgroup_id: int) -> str:
        if cgroup_id not in self._names:
            try:
                self._names = cgroups.id_to_path_map()
            except Exception:
                return ""
        return self._names.get(cgroup_id, "")


_cgroup_names = CgroupNames()


def describe(tgid: int, pid: int, uid: int, gid: int, comm: str, cgroup_id: int,
             ktime_ns: Optional[int] = None) -> ProcessInfo:
    cg_path = ""
    exe = ""
    cmdline: list[str] = []
    start = 0.0
    try:
        proc = psutil.Process(tgid)
        with proc.oneshot():
            start = proc.create_time()
            exe = proc.exe()
            cmdline = proc.cmdline()
        cg_path = cgroups.cgroup_of_pid(tgid)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
        pass
    if not cg_path:
        cg_path = _cgroup_names.path(cgroup_id)
    return ProcessInfo(
        pid=pid, tgid=tgid, uid=uid, gid=gid, comm=comm, cgroup_id=cgroup_id, cgroup_path=cg_path,
        exe=exe, cmdline=cmdline, user=user_name(uid), systemd_unit=systemd_unit(cg_path),
        container_id=container_id(cg_path), start_time=start)


_SECRET_ASSIGN = re.compile(r"(?i)\b(password|passwd|pwd|pass|secret|token|api[_-]?key|access[_-]?key|auth)=([^\s&;]+)")
_URL_PASSWORD = re.compile(r"(://[^:/@\s]+:)([^@/\s]+)@")
_SECRET_FLAGS = {"--password", "--passwd", "--token", "--secret", "--api-key", "--apikey", "-password"}
REDACTED = "[redacted]"


def redact_cmdline(argv: list[str]) -> list[str]:
    """Command lines are evidence but must never carry secrets into records or logs."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        flag, eq, _value = arg.partition("=")
        if flag.lower() in _SECRET_FLAGS:
            if eq:
                out.append(f"{flag}={REDACTED}")
            else:
                out.append(arg)
                hide_next = True
            continue
        arg = _URL_PASSWORD.sub(lambda m: m.group(1) + REDACTED + "@", arg)
        arg = _SECRET_ASSIGN.sub(lambda m: m.group(1) + "=" + REDACTED, arg)
        out.append(arg)
    return out


def as_record(info: ProcessInfo) -> dict:
    return {
        "pid": info.pid, "tgid": info.tgid, "uid": info.uid, "gid": info.gid, "user": info.user,
        "comm": info.comm, "exe": info.exe, "cmdline": redact_cmdline(info.cmdline), "cgroup": info.cgroup_path,
        "cgroup_id": info.cgroup_id, "unit": info.systemd_unit, "container": info.container_id,
        "start_time": info.start_time,
    }
