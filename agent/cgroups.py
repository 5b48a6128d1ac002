"""cgroup v2 helpers: find the mount, map paths to ids, create test cgroups, move processes."""
from __future__ import annotations

import os
from typing import Optional


class CgroupError(RuntimeError):
    pass


def cgroup2_mount(mounts_file: str = "/proc/mounts") -> str:
    """The cgroup2 mount point: /sys/fs/cgroup (unified) or /sys/fs/cgroup/unified (hybrid)."""
    with open(mounts_file) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[2] == "cgroup2":
                return parts[1]
    raise CgroupError("no cgroup2 filesystem is mounted; Warden needs cgroup v2 "
                      "(mount -t cgroup2 none /sys/fs/cgroup/unified, or boot with systemd.unified_cgroup_hierarchy=1)")


def abs_path(cgroup: str, mount: Optional[str] = None) -> str:
    """Absolute directory of a cgroup given as '/system.slice/x.service' (relative to the mount)."""
    mount = mount or cgroup2_mount()
    if cgroup.startswith(mount + "/") or cgroup == mount:
        return cgroup
    return os.path.join(mount, cgroup.lstrip("/"))


def cgroup_id(path: str) -> int:
    """The kernel's cgroup id is the inode number of the cgroup's directory in cgroupfs."""
    return os.stat(path).st_ino


def cgroup_of_pid(pid: int) -> str:
    """The cgroup v2 path of a process, relative to the cgroup2 mount ('' if unknown)."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                hierarchy, _, rest = line.rstrip("\n").partition(":")
                controllers, _, path = rest.partition(":")
                if hierarchy == "0" and controllers == "":
                    return path
    except OSError:
        pass
    return ""


def create(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path


def move_pid(path: str, pid: int) -> None:
    with open(os.path.join(path, "cgroup.procs"), "w") as f:
        f.write(str(pid))


def remove(path: str) -> None:
    """Remove an empty cgroup (processes must have left or exited)."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass


def id_to_path_map(mount: Optional[str] = None) -> dict[int, str]:
    """Walk cgroupfs once: id → path relative to the mount (used to name a captured cgroup id)."""
    mount = mount or cgroup2_mount()
    result: dict[int, str] = {}
    for dirpath, _dirnames, _files in os.walk(mount):
        try:
            result[os.stat(dirpath).st_ino] = "/" + os.path.relpath(dirpath, mount).lstrip(".")
        except OSError:
            continue
    return result
