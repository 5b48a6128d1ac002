"""What an earlier agent run's BPF maps still hold: the connection events in its ring buffer,
the attribution of the connects it redirected, and what getpeername() must report for them.

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

SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine, 321)   # the bpf(2) syscall number
_BPF_MAP_GET_FD_BY_ID = 14
_RINGBUF_BUSY = 1 << 31
_RINGBUF_DISCARD = 1 << 30
_RINGBUF_HEADER = 8
EVENTS_MAP = "events"
REDIRECTED_MAP = "redirected"
PEER_NAMES_MAP = "peer_names"
DROPS_MAP = "ring_drops"        # [0] events the ring had no room for, [1] how many are on record
_BPF_MAP_LOOKUP_ELEM = 1
_BPF_MAP_UPDATE_ELEM = 2
_BPF_MAP_GET_NEXT_KEY = 4
_BPF_NOEXIST = 1


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


_libc = ctypes.CDLL(None, use_errno=True)


def _map_fd(map_id: int) -> int:
    attr = ctypes.create_string_buffer(struct.pack("<III", map_id, 0, 0), 16)
    fd = _libc.syscall(SYS_BPF, _BPF_MAP_GET_FD_BY_ID, attr, 12)
    if fd < 0:
        raise OSError(ctypes.get_errno(), f"cannot open BPF map id {map_id}")
    return fd


class HeldMaps:
    """The maps of earlier runs that are worth keeping past their programs."""

    def __init__(self):
        self.rings: list[HeldRing] = []
        self.redirected: list[int] = []      # descriptors: attribution of connects they redirected
        self.peer_names: list[int] = []      # descriptors: what getpeername() must report for those
        self.drops: list[int] = []           # descriptors: their counts of events the ring had no room for

    def close_tables(self) -> None:
        for fd in self.peer_names + self.drops:
            os.close(fd)
        self.peer_names = []
        self.drops = []


def hold_maps(prog_ids: Iterable[int], seen: set[int], into: HeldMaps) -> None:
    """Open the maps worth keeping of these programs (map ids in `seen` are skipped and added)."""
    for prog_id in prog_ids:
        info = _bpftool_json("prog", "show", "id", str(prog_id)) or {}
        for map_id in info.get("map_ids", []):
            if map_id in seen:
                continue
            seen.add(map_id)
            desc = _bpftool_json("map", "show", "id", str(map_id)) or {}
            name = desc.get("name")
            try:
                if desc.get("type") == "ringbuf" and name == EVENTS_MAP:
                    into.rings.append(HeldRing(map_id, _map_fd(map_id), int(desc["max_entries"])))
                elif name == REDIRECTED_MAP:
                    into.redirected.append(_map_fd(map_id))
                elif name == PEER_NAMES_MAP:
                    into.peer_names.append(_map_fd(map_id))
                elif name == DROPS_MAP:
                    into.drops.append(_map_fd(map_id))
            except (OSError, KeyError, ValueError) as exc:
                log.warning("map %s of an earlier run cannot be opened: %s", map_id, exc)


class MapElemAttr(ctypes.Structure):
    # union bpf_attr for the map element commands: the fourth word is `value` or `next_key`
    _fields_ = [("map_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("key", ctypes.c_uint64),
                ("value", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


def _map_elem(cmd: int, fd: int, key, value, flags: int = 0) -> int:
    """One bpf(2) map element command on ctypes buffers (key None: no key); 0 on success."""
    attr = MapElemAttr(fd, 0, ctypes.addressof(key) if key is not None else 0, ctypes.addressof(value), flags)
    return _libc.syscall(SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))


def copy_entries(src_fd: int, dst_fd: int, key_size: int, value_size: int) -> int:
    """Copy every entry of one hash map into another where its key is not already; returns how
    many were copied."""
    key, next_key = ctypes.create_string_buffer(key_size), ctypes.create_string_buffer(key_size)
    value = ctypes.create_string_buffer(value_size)
    copied = 0
    current = None                      # no key: the first one
    while _map_elem(_BPF_MAP_GET_NEXT_KEY, src_fd, current, next_key) == 0:
        ctypes.memmove(key, next_key, key_size)
        current = key
        if _map_elem(_BPF_MAP_LOOKUP_ELEM, src_fd, key, value) == 0 and \
                _map_elem(_BPF_MAP_UPDATE_ELEM, dst_fd, key, value, _BPF_NOEXIST) == 0:
            copied += 1
    return copied


def read_counters(fd: int, count: int) -> list[int]:
    """Slots 0..count-1 of a BPF array map of u64 counters."""
    key, value = ctypes.c_uint32(), ctypes.c_uint64()
    out = []
    for slot in range(count):
        key.value = slot
        if _map_elem(_BPF_MAP_LOOKUP_ELEM, fd, key, value) != 0:
            raise OSError(ctypes.get_errno(), f"cannot read slot {slot} of BPF map fd {fd}")
        out.append(value.value)
    return out


def unrecorded_drops(fds: Iterable[int]) -> int:
    """Events earlier runs' rings had no room for and no agent recorded (DROPS_MAP)."""
    total = 0
    for fd in fds:
        try:
            dropped, recorded = read_counters(fd, 2)
        except OSError as exc:
            log.warning("an earlier run's count of events its ring had no room for cannot be read: %s", exc)
            continue
        total += max(0, dropped - recorded)
    return total
