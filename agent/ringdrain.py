"""The connection events an earlier agent run's BPF ring buffer still holds.

While no agent runs (after a crash, or during a handover) its programs stay attached and go
on reporting every governed connect into their own ring buffer: attempts refused at the
closed listener, and connects that went direct under `on_enforcer_down: bypass`. The next
run reads them before the old programs' maps are freed, so those are on record too.

The ring is read through its memory map, as the kernel lays it out: a consumer page, a
producer page, then the data area mapped twice (so a record that wraps reads contiguously).
Each record has an 8-byte header: its length with a busy and a discard bit, then a page
offset the kernel uses for itself.
"""
from __future__ import annotations

import ctypes
import json
import logging
import mmap
import os
import shutil
import struct
import subprocess
from typing import Iterable

log = logging.getLogger("warden.bpf")

_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine, 321)
_BPF_MAP_GET_FD_BY_ID = 14
_RINGBUF_BUSY = 1 << 31
_RINGBUF_DISCARD = 1 << 30
_RINGBUF_HEADER = 8
EVENTS_MAP = "events"


class HeldRing:
    """A ring buffer map of an earlier run, kept alive by our descriptor while its programs go."""

    def __init__(self, map_id: int, fd: int, size: int):
        self.map_id, self.fd, self.size = map_id, fd, size

    def drain(self) -> list[bytes]:
        """Every record submitted and not yet consumed, oldest first."""
        page = mmap.PAGESIZE
        with mmap.mmap(self.fd, page, mmap.MAP_SHARED, mmap.PROT_READ, offset=0) as consumer, \
                mmap.mmap(self.fd, page + 2 * self.size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page) as area:
            start = struct.unpack_from("<Q", consumer, 0)[0]
            end = struct.unpack_from("<Q", area, 0)[0]
            return parse_ring(memoryview(area)[page:], self.size, start, end)

    def close(self) -> None:
        os.close(self.fd)


def parse_ring(data, size: int, start: int, end: int) -> list[bytes]:
    """The records between the consumer position `start` and the producer position `end` of a
    ring of `size` bytes (a power of two) whose data area is mapped twice in `data`."""
    mask = size - 1
    records = []
    pos = start
    while pos < end:
        at = pos & mask
        header = struct.unpack_from("<I", data, at)[0]
        if header & _RINGBUF_BUSY:        # reserved, not yet submitted: nothing after it is final
            break
        length = header & ~(_RINGBUF_BUSY | _RINGBUF_DISCARD)
        if not header & _RINGBUF_DISCARD:
            records.append(bytes(data[at + _RINGBUF_HEADER: at + _RINGBUF_HEADER + length]))
        pos += (length + _RINGBUF_HEADER + 7) & ~7
    return records


def _bpftool_json(*args: str):
    bpftool = shutil.which("bpftool") or "/usr/sbin/bpftool"
    out = subprocess.run([bpftool, "-j", *args], capture_output=True, text=True, check=False)
    if out.returncode != 0 or not out.stdout.strip():
        return None
    return json.loads(out.stdout)


def _map_fd(map_id: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    attr = ctypes.create_string_buffer(struct.pack("<III", map_id, 0, 0), 16)
    fd = libc.syscall(_SYS_BPF, _BPF_MAP_GET_FD_BY_ID, attr, 12)
    if fd < 0:
        raise OSError(ctypes.get_errno(), f"cannot open BPF map id {map_id}")
    return fd


def hold_rings(prog_ids: Iterable[int], seen: set[int]) -> list[HeldRing]:
    """Open the `events` ring buffers of these programs (ids in `seen` are skipped and added)."""
    held = []
    for prog_id in prog_ids:
        info = _bpftool_json("prog", "show", "id", str(prog_id)) or {}
        for map_id in info.get("map_ids", []):
            if map_id in seen:
                continue
            seen.add(map_id)
            desc = _bpftool_json("map", "show", "id", str(map_id)) or {}
            if desc.get("type") != "ringbuf" or desc.get("name") != EVENTS_MAP:
                continue
            try:
                held.append(HeldRing(map_id, _map_fd(map_id), int(desc["max_entries"])))
            except (OSError, KeyError, ValueError) as exc:
                log.warning("the connection events of an earlier run (map %s) cannot be read: %s", map_id, exc)
    return held
