"""Connection inventory: every outbound TCP connect in scope, aggregated per interval.

The kernel reports an attempt (with the process and destination) and later an outcome
(established or failed) keyed by socket cookie. We fold them per (process, destination)
so a busy host produces one `conn.observed` event per pair per interval, not one per connect.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from agent.bpfmgr import EV_ATTEMPT, EV_ESTABLISHED, EV_FAILED, Capture


@dataclass
class PairStats:
    tgid: int
    comm: str
    uid: int
    cgroup_id: int
    dst_ip: str
    dst_port: int
    target_id: int
    first_ns: int
    last_ns: int
    attempts: int = 0
    established: int = 0
    failed: int = 0
    governed: int = 0
    redirected: int = 0
    bypassed: int = 0
    pids: set = field(default_factory=set)


class Inventory:
    """Thread-safe: fed from the BPF ring reader thread, flushed from the agent loop."""

    MAX_OPEN = 65536   # attempts waiting for an outcome; older ones are reported as unknown

    def __init__(self, describe: Callable[[Capture], dict], target_names: Callable[[int], Optional[str]]):
        self._describe = describe
        self._target_names = target_names
        self._lock = threading.Lock()
        self._pairs: dict[tuple, PairStats] = {}
        self._open: dict[int, tuple] = {}      # cookie → pair key, until the outcome arrives
        self._process_cache: dict[int, dict] = {}

    def on_event(self, kind: int, cap: Capture, at_ns: Optional[int] = None) -> None:
        """`at_ns`: when it happened, for an event read back later (from an earlier run's ring)."""
        now = at_ns or time.time_ns()
        with self._lock:
            if kind == EV_ATTEMPT:
                key = (cap.tgid, cap.orig_ip, cap.orig_port)
                stats = self._pairs.get(key)
                if stats is None:
                    stats = self._pairs[key] = PairStats(
                        cap.tgid, cap.comm, cap.uid, cap.cgroup_id, cap.orig_ip, cap.orig_port,
                        cap.target_id, now, now)
                    if cap.tgid not in self._process_cache:
                        # describe while the process most likely still exists
                        self._process_cache[cap.tgid] = self._describe(cap)
                stats.attempts += 1
                stats.last_ns = now
                stats.pids.add(cap.pid)
                stats.governed += cap.governed
                stats.redirected += cap.redirected
                stats.bypassed += cap.bypass
                if len(self._open) < self.MAX_OPEN:
                    self._open[cap.cookie] = key
            else:
                key = self._open.pop(cap.cookie, None)
                stats = self._pairs.get(key) if key else None
                if stats is not None:
                    if kind == EV_ESTABLISHED:
                        stats.established += 1
                    elif kind == EV_FAILED:
                        stats.failed += 1

    def flush(self) -> list[dict]:
        """conn.observed field sets for everything seen since the last flush."""
        with self._lock:
            pairs, self._pairs = self._pairs, {}
            processes, self._process_cache = self._process_cache, {}
        out = []
        for stats in pairs.values():
            proc = processes.get(stats.tgid) or {"tgid": stats.tgid, "comm": stats.comm, "uid": stats.uid}
            out.append({
                "process": proc,
                "dst_ip": stats.dst_ip, "dst_port": stats.dst_port,
                "target": self._target_names(stats.target_id) if stats.governed else None,
                "attempts": stats.attempts, "established": stats.established, "failed": stats.failed,
                "pending": stats.attempts - stats.established - stats.failed,
                "governed": stats.governed, "redirected": stats.redirected, "bypassed": stats.bypassed,
                "pids": sorted(stats.pids)[:32],
                "first_ns": stats.first_ns, "last_ns": stats.last_ns,
            })
        return out
