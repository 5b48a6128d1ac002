"""Test helpers for BPF: skip-or-fail policy, test cgroups, processes placed in them."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

from agent import cgroups


def bpf_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "BPF tests need root"
    try:
        cgroups.cgroup2_mount()
    except cgroups.CgroupError as exc:
        return str(exc)
    try:
        from agent.bccfind import import_bcc
        import_bcc()
    except Exception as exc:
        return f"BCC unavailable: {exc}"
    if not os.path.exists(f"/lib/modules/{os.uname().release}/build"):
        return "kernel headers missing (run make setup)"
    return None


def require_bpf() -> None:
    reason = bpf_unavailable_reason()
    if reason is None:
        return
    if os.environ.get("WARDEN_REQUIRE_BPF") == "1":
        pytest.fail(f"WARDEN_REQUIRE_BPF=1 but BPF cannot run: {reason}")
    pytest.skip(reason)


class ScratchCgroup:
    """A cgroup under the cgroup2 mount that exists only for one test."""

    def __init__(self) -> None:
        self.mount = cgroups.cgroup2_mount()
        self.name = f"warden-test-{uuid.uuid4().hex[:10]}"
        self.path = cgroups.create(os.path.join(self.mount, self.name))
        self.rel = "/" + self.name

    def popen(self, argv, **kwargs) -> subprocess.Popen:
        """Start a process that is inside this cgroup before it runs anything."""
        procs = os.path.join(self.path, "cgroup.procs")

        def enter():
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        return subprocess.Popen(argv, preexec_fn=enter, **kwargs)

    def run(self, argv, **kwargs) -> subprocess.CompletedProcess:
        timeout = kwargs.pop("timeout", 30)
        proc = self.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def python(self, code: str, **kwargs) -> subprocess.CompletedProcess:
        return self.run([sys.executable, "-c", code], **kwargs)

    def cleanup(self) -> None:
        from agent.bpfmgr import sweep_stale
        try:
            sweep_stale(self.path)
        except Exception:
            pass
        # a cgroup can only be removed once empty; processes we started have been waited for
        cgroups.remove(self.path)
