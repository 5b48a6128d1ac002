"""BPF lifecycle: compile, attach to the scope's cgroups, fill maps, read captures, detach.

Programs are attached with BPF_F_ALLOW_MULTI (not as bpf_links) on purpose: if the agent
dies, they stay attached and governed connects keep going to the dead listener port, so
they fail closed (ECONNREFUSED) instead of silently going direct. The next start removes
those stale attachments by name (every program of ours is called `warden_*`).
"""
from __future__ import annotations

import ctypes
import ipaddress
import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import bpf as bpf_sources
from agent import stale_maps
from agent.bccfind import import_bcc

log = logging.getLogger("warden.bpf")

BPF_F_ALLOW_MULTI = 2
ATTACH_INET4_CONNECT = 10
ATTACH_INET6_CONNECT = 11
ATTACH_SOCK_OPS = 3
ATTACH_INET4_GETPEERNAME = 29
ATTACH_INET6_GETPEERNAME = 30
ATTACH_INET_SOCK_RELEASE = 34

FLAG_GOVERNED = 1
FLAG_BYPASS = 2
FLAG_REDIRECTED = 4
FLAG_V4MAPPED = 8

EV_ATTEMPT = 1
EV_ESTABLISHED = 2
EV_FAILED = 3

ON_DOWN = {"refuse": 0, "bypass": 1}

# (function, attach type name for bpftool, attach type number, BCC prog type attr)
PROGRAMS = (
    ("warden_connect4", "connect4", ATTACH_INET4_CONNECT, "CGROUP_SOCK_ADDR"),
    ("warden_connect6", "connect6", ATTACH_INET6_CONNECT, "CGROUP_SOCK_ADDR"),
    ("warden_sockops", "sock_ops", ATTACH_SOCK_OPS, "SOCK_OPS"),
    ("warden_peer4", "getpeername4", ATTACH_INET4_GETPEERNAME, "CGROUP_SOCK_ADDR"),
    ("warden_peer6", "getpeername6", ATTACH_INET6_GETPEERNAME, "CGROUP_SOCK_ADDR"),
    ("warden_release", "sock_release", ATTACH_INET_SOCK_RELEASE, "CGROUP_SOCK"),
)

# struct conn_info / conn_event layout in bpf/warden.bpf.c
CONN_INFO = struct.Struct("<QQQ16sIIIIIHBB16s")
CONN_EVENT = struct.Struct("<II" + CONN_INFO.format[1:])
PEER_NAME = struct.Struct("<16sI")      # struct orig_dst: the address and port the workload asked for
assert CONN_INFO.size == 80 and CONN_EVENT.size == 88


class BpfUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class Capture:
    """What the kernel recorded at connect() time."""

    cookie: int
    cgroup_id: int
    ktime_ns: int
    orig_ip: str
    orig_port: int
    target_id: int
    tgid: int
    pid: int
    uid: int
    gid: int
    family: int          # 4 or 6
    flags: int
    comm: str

    @property
    def governed(self) -> bool:
        return bool(self.flags & FLAG_GOVERNED)

    @property
    def bypass(self) -> bool:
        return bool(self.flags & FLAG_BYPASS)

    @property
    def redirected(self) -> bool:
        return bool(self.flags & FLAG_REDIRECTED)


_V4_PREFIX = b"\0" * 10 + b"\xff\xff"


def mapped16(ip: str) -> bytes:
    """16-byte form used in the maps: IPv6 as is, IPv4 as ::ffff:a.b.c.d (hot path: inet_pton only)."""
    if ":" in ip:
        return socket.inet_pton(socket.AF_INET6, ip)
    return _V4_PREFIX + socket.inet_aton(ip)


def unmap16(raw: bytes) -> str:
    if raw[:12] == _V4_PREFIX:
        return socket.inet_ntoa(raw[12:16])
    return socket.inet_ntop(socket.AF_INET6, raw)


def parse_conn_info(raw: bytes) -> Capture:
    (cookie, cg, ts, orig, target_id, tgid, pid, uid, gid, port, family, flags,
     comm) = CONN_INFO.unpack_from(raw)
    return Capture(cookie, cg, ts, unmap16(orig), port, target_id, tgid, pid, uid, gid,
                   family, flags, comm.split(b"\0", 1)[0].decode(errors="replace"))


@dataclass(frozen=True)
class TargetRule:
    target_id: int
    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    port: int
    listen_port: int
    on_down: str = "refuse"


class BpfManager:
    """Owns the compiled programs, their cgroup attachments and the maps."""

    def __init__(self, scope_paths: Iterable[str]):
        self.scope_paths = [os.path.abspath(p) for p in scope_paths]
        self.bcc = None
        self.b = None
        self.funcs: dict[str, object] = {}
        self.attached: list[tuple[str, object, int]] = []   # (cgroup path, fn, attach type)
        self._ring_thread: Optional[threading.Thread] = None
        self._ring_stop = threading.Event()
        self._on_event: Optional[Callable[[int, Capture], None]] = None
        self._lock = threading.Lock()
        self._redirected_op: Optional[_MapLookupDelete] = None
        self.taken_over = 0          # programs a handed-over or crashed run left, removed at attach
        self.recovered: list[tuple[int, Capture]] = []   # what they reported while no agent read it
        self.recovered_drops = 0     # events their rings had no room for that no run has recorded
        self._old_redirected: list[_MapLookupDelete] = []   # theirs, for connects they redirected
        self._held = stale_maps.HeldMaps()
        self._handed: list[dict] = []
        self._handover_path: Optional[str] = None
        self._earlier_paths: Optional[list[str]] = None   # set by hold_earlier_runs

    # ---- lifecycle -------------------------------------------------------------------
    def load(self) -> None:
        try:
            self.bcc = import_bcc()
        except Exception as exc:
            raise BpfUnavailable(str(exc)) from exc
        BPF = self.bcc.BPF
        try:
            self.b = BPF(text=bpf_sources.source().encode(), cflags=["-Wno-macro-redefined"])
        except Exception as exc:
            raise BpfUnavailable(
                f"compiling the BPF programs failed ({exc}); check that kernel headers are installed "
                f"at /lib/modules/{os.uname().release}/build (make setup links the nearest ones)") from exc
        for name, _bpftool, attach_type, prog_type in PROGRAMS:
            self.funcs[name] = self.b.load_func(name.encode(), getattr(BPF, prog_type), attach_type=attach_type)

    def hold_earlier_runs(self, handover_path: Optional[str] = None) -> None:
        """Before this run listens: open the maps of the programs earlier runs left on the scope
        (and on the cgroups a handover list at `handover_path` names), so that their attribution
        of connects still waiting to be accepted, and the events they reported while no agent
        read them, outlive those programs. `attach` then takes the programs off."""
        self._handed = read_handover(handover_path) if handover_path else []
        self._handover_path = handover_path
        paths = [*self.scope_paths, *sorted({e["path"] for e in self._handed} - set(self.scope_paths))]
        self._earlier_paths = [p for p in paths if os.path.isdir(p)]
        seen: set[int] = set()
        for path in self._earlier_paths:
            stale_maps.hold_maps([p["id"] for p in ours(attached_programs(path))], seen, self._held)
        self._old_redirected = [_MapLookupDelete(fd, 20, CONN_INFO.size) for fd in self._held.redirected]

    def attach(self, handover_path: Optional[str] = None) -> None:
        """Attach to every scope cgroup, then remove what an earlier run left there. In that order:
        between the removal of the old programs and the attachment of the new ones, governed
        connects would go straight to their destination, unrecorded. While both are attached,
        a connect is redirected by one of them and served (`take_redirected` looks in the old
        run's map too) or, if that map is not held, refused as unattributed.

        Programs a handed-over run listed are taken over quietly, on whichever cgroups they are,
        even ones no longer in scope (they would refuse that cgroup's governed connects for
        good). What the earlier programs reported is read back into `recovered`."""
        if self._earlier_paths is None:
            self.hold_earlier_runs(handover_path)
        BPF = self.bcc.BPF
        own = {_prog_id(fn.fd) for fn in self.funcs.values()}
        handed_ids = {entry["prog_id"] for entry in self._handed}
        try:
            for path in self.scope_paths:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    for name, _bpftool, attach_type, _pt in PROGRAMS:
                        BPF.attach_func(self.funcs[name], fd, attach_type, BPF_F_ALLOW_MULTI)
                        self.attached.append((path, self.funcs[name], attach_type))
                finally:
                    os.close(fd)
            for path in self._earlier_paths:
                self.taken_over += sweep_stale(path, keep=own, handed_over=handed_ids)
            # read once the old programs are gone: nothing they report is missed
            self.recovered = self._read_rings(self._held.rings)
            self.recovered_drops = stale_maps.unrecorded_drops(self._held.drops)
            self._adopt_peer_names()
        finally:
            for ring in self._held.rings:
                ring.close()
            self._held.rings = []
            self._held.close_tables()
        if self._handover_path and os.path.exists(self._handover_path):
            os.unlink(self._handover_path)   # read once: a later start sweeps leftovers as a crash's
        log.info("BPF programs attached to %s", ", ".join(self.scope_paths))

    def _adopt_peer_names(self) -> None:
        """Connects the earlier programs redirected keep answering getpeername() with what the
        workload asked for: their entries move into this run's map."""
        ours_fd = self.b[b"peer_names"].map_fd
        for fd in self._held.peer_names:
            try:
                copied = stale_maps.copy_entries(fd, ours_fd, 8, PEER_NAME.size)
            except OSError as exc:
                log.warning("the earlier run's peer names could not be taken over: %s", exc)
                continue
            if copied:
                log.info("took over the original destinations of %d connects an earlier run redirected", copied)

    @staticmethod
    def _read_rings(rings: list) -> list[tuple[int, Capture]]:
        """Connection events the earlier runs' programs reported while no agent read them."""
        events = []
        for ring in sorted(rings, key=lambda r: r.map_id):    # older runs first; each ring in order
            # (an outcome carries only its attempt's cookie and no time: order is what pairs them)
            try:
                raw_events = ring.drain()
            except (OSError, ValueError, struct.error) as exc:
                log.warning("the connection events of an earlier run (map %s) cannot be read: %s",
                            ring.map_id, exc)
                continue
            for raw in raw_events:
                if len(raw) >= 8 + CONN_INFO.size:
                    events.append((struct.unpack_from("<I", raw)[0], parse_conn_info(raw[8:])))
        if events:
            log.info("%d connection events reported while no agent ran were read back", len(events))
        return events

    def hand_over(self, handover_path: str) -> int:
        """Stop without detaching, for the next run to take over (a planned restart): governed
        connects wait in the listener the service manager keeps, or without one are refused,
        until the next run is up; never sent direct. What is left is listed at `handover_path`
        (written before anything is let go)."""
        self.stop_events()
        self.forget_earlier_runs()
        left = [{"path": path, "prog_id": _prog_id(fn.fd), "attach_type": attach_type}
                for path, fn, attach_type in self.attached]
        tmp = handover_path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "at": time.time(), "programs": left}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, handover_path)
        self.attached.clear()
        if self.b is not None:
            self.b.cleanup()          # closes our descriptors; cgroup attachments stay (legacy attach)
            self.b = None
        log.info("%d BPF program attachments left on %s for the next agent run", len(left),
                 ", ".join(self.scope_paths))
        return len(left)

    def detach(self) -> None:
        self.stop_events()
        self.forget_earlier_runs()
        if self.bcc is None:
            return
        BPF = self.bcc.BPF
        for path, fn, attach_type in reversed(self.attached):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            except FileNotFoundError:
                continue
            try:
                BPF.detach_func(fn, fd, attach_type)
            except Exception as exc:   # already gone (cgroup removed): nothing left to detach
                log.debug("detach from %s: %s", path, exc)
            finally:
                os.close(fd)
        self.attached.clear()
        if self.b is not None:
            self.b.cleanup()
            self.b = None

    # ---- maps -------------------------------------------------------------------------
    def set_targets(self, rules: Iterable[TargetRule]) -> None:
        table = self.b[b"targets"]
        wanted = {}
        for rule in rules:
            key = table.Key()
            addr = mapped16(str(rule.network.network_address))
            plen = rule.network.prefixlen + (96 if rule.network.version == 4 else 0)
            key.prefixlen = 32 + plen
            key.port = socket.htons(rule.port)
            key.pad = 0
            ctypes.memmove(ctypes.addressof(key.addr), addr, 16)
            val = table.Leaf()
            val.target_id = rule.target_id
            val.listen_port = rule.listen_port
            val.on_down = ON_DOWN[rule.on_down]
            val.pad = 0
            wanted[bytes(key)] = (key, val)
        with self._lock:
            for key in list(table.keys()):
                if bytes(key) not in wanted:
                    del table[key]
            for key, val in wanted.values():
                table[key] = val

    def exempt_process(self, tgid: int) -> None:
        table = self.b[b"exempt_tgids"]
        table[table.Key(tgid)] = table.Leaf(1)

    def exempt_cgroup(self, cgroup_id: int) -> None:
        table = self.b[b"exempt_cgroups"]
        table[table.Key(cgroup_id)] = table.Leaf(1)

    def take_redirected(self, client_ip: str, client_port: int) -> Optional[Capture]:
        """Attribution of an accepted connection by the client's address and port (consumed).

        On the accept path, so it bypasses BCC's table objects: one bpf(2) call with
        preallocated buffers (lookup-and-delete), about a microsecond plus Python overhead.
        """
        if self._redirected_op is None:
            self._redirected_op = _MapLookupDelete(self.b[b"redirected"].map_fd, 20, CONN_INFO.size)
        key = mapped16(client_ip) + struct.pack("<HH", client_port, 0)
        raw = self._redirected_op(key)
        if raw is None:
            # redirected by an earlier run's programs and waiting in the listener's backlog
            # (handed back by the service manager) while this run started
            for old_op in self._old_redirected:
                raw = old_op(key)
                if raw is not None:
                    break
        return parse_conn_info(raw) if raw is not None else None

    def forget_earlier_runs(self) -> None:
        """Let go of the earlier runs' attribution maps, once their redirected connects are served."""
        for fd in self._held.redirected:
            os.close(fd)
        self._held.redirected = []
        self._old_redirected = []

    def ring_drops(self) -> tuple[int, int]:
        """(events this run's programs found no room for in their ring, how many of those are
        recorded); (0, 0) before the programs are loaded."""
        if self.b is None:
            return 0, 0
        table = self.b[b"ring_drops"]
        return table[table.Key(0)].value, table[table.Key(1)].value

    def mark_drops_recorded(self, dropped: int) -> None:
        """The drops up to `dropped` are on record: a later run that takes this one's map over
        records only those after."""
        table = self.b[b"ring_drops"]
        table[table.Key(1)] = table.Leaf(dropped)

    def map_counts(self) -> dict[str, int]:
        return {name: len(list(self.b[name.encode()].keys())) for name in ("targets", "pending", "redirected")}

    # ---- ring buffer ----------------------------------------------------------------
    def start_events(self, on_event: Callable[[int, Capture], None]) -> None:
        self._on_event = on_event

        def callback(_ctx, data, size):
            raw = ctypes.string_at(data, size)
            kind = struct.unpack_from("<I", raw)[0]
            try:
                self._on_event(kind, parse_conn_info(raw[8:]))
            except Exception:   # a consumer bug must not stop the ring reader
                log.exception("connection event handler failed")

        self._ring_callback = callback      # keep the ctypes callback alive
        self.b[b"events"].open_ring_buffer(callback)
        self._ring_stop.clear()

        def loop():
            while not self._ring_stop.is_set():
                self.b.ring_buffer_poll(100)

        self._ring_thread = threading.Thread(target=loop, name="warden-bpf-events", daemon=True)
        self._ring_thread.start()

    def stop_events(self) -> None:
        self._ring_stop.set()
        if self._ring_thread is not None:
            self._ring_thread.join(timeout=2)
            self._ring_thread = None


# ---- raw map access --------------------------------------------------------------------
_BPF_MAP_LOOKUP_ELEM = 1
_BPF_MAP_DELETE_ELEM = 3
_BPF_MAP_LOOKUP_AND_DELETE_ELEM = 21
_SYS_BPF = stale_maps.SYS_BPF
_MapElemAttr = stale_maps.MapElemAttr


class _MapLookupDelete:
    """Reusable buffers for lookup-and-delete on one hash map (falls back to lookup + delete)."""

    def __init__(self, map_fd: int, key_size: int, value_size: int):
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._key = ctypes.create_string_buffer(key_size)
        self._value = ctypes.create_string_buffer(value_size)
        self._attr = _MapElemAttr(map_fd, 0, ctypes.addressof(self._key), ctypes.addressof(self._value), 0)
        self._attr_ptr = ctypes.byref(self._attr)
        self._combined = True
        self._value_size = value_size

    def _bpf(self, cmd: int) -> int:
        return self._libc.syscall(_SYS_BPF, cmd, self._attr_ptr, ctypes.sizeof(self._attr))

    def __call__(self, key: bytes) -> Optional[bytes]:
        self._key.raw = key
        if self._combined:
            if self._bpf(_BPF_MAP_LOOKUP_AND_DELETE_ELEM) == 0:
                return self._value.raw[: self._value_size]
            err = ctypes.get_errno()
            if err == 2:          # ENOENT
                return None
            self._combined = False   # older kernel: no lookup-and-delete on this map type
        if self._bpf(_BPF_MAP_LOOKUP_ELEM) != 0:
            return None
        value = self._value.raw[: self._value_size]
        self._bpf(_BPF_MAP_DELETE_ELEM)
        return value


# ---- stale attachments ------------------------------------------------------------------
def attached_programs(cgroup_path: str) -> list[dict]:
    """Programs attached directly to a cgroup, as bpftool reports them."""
    bpftool = shutil.which("bpftool") or "/usr/sbin/bpftool"
    if not os.path.exists(bpftool):
        raise BpfUnavailable("bpftool is needed to find stale attachments (apt-get install bpftool)")
    out = subprocess.run([bpftool, "-j", "cgroup", "show", cgroup_path],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0 or not out.stdout.strip():
        return []
    return json.loads(out.stdout)


def ours(programs: list[dict]) -> list[dict]:
    return [p for p in programs if str(p.get("name", "")).startswith(bpf_sources.PROGRAM_PREFIX)]


def _prog_id(fd: int) -> int:
    """The kernel's id of the BPF program behind a file descriptor of this process."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("prog_id:"):
                return int(line.split()[1])
    raise BpfUnavailable(f"fd {fd} is not a BPF program (no prog_id in its fdinfo)")


def sweep_stale(cgroup_path: str, keep: Iterable[int] = (), handed_over: Iterable[int] = ()) -> int:
    """Detach every `warden_*` program left on this cgroup by an earlier run, but those with an
    id in `keep` (this run's own). Ids in `handed_over` were left on purpose (a planned restart);
    any other is what a crash left, and is logged as such."""
    bpftool = shutil.which("bpftool") or "/usr/sbin/bpftool"
    removed = 0
    keep = set(keep)
    handed_over = set(handed_over)
    bpftool_type = {name: kind for name, kind, _num, _pt in PROGRAMS}
    for prog in ours(attached_programs(cgroup_path)):
        if prog["id"] in keep:
            continue
        kind = bpftool_type.get(prog["name"]) or prog["attach_type"]
        res = subprocess.run([bpftool, "cgroup", "detach", cgroup_path, kind,
                              "id", str(prog["id"])], capture_output=True, text=True, check=False)
        if res.returncode == 0:
            removed += 1
            if prog["id"] in handed_over:
                log.info("took over from the previous run: %s program id %s on %s", prog["name"],
                         prog["id"], cgroup_path)
            else:
                log.warning("removed stale %s program id %s from %s", prog["name"], prog["id"], cgroup_path)
        else:
            log.error("could not detach stale program %s from %s: %s", prog["id"], cgroup_path,
                      res.stderr.strip())
    return removed


def held_prog_ids() -> set[int]:
    """Ids of the BPF programs a live process holds a descriptor of: a running agent's own."""
    held = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:bpf-prog":
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    held.update(int(line.split()[1]) for line in f if line.startswith("prog_id:"))
            except (OSError, ValueError):
                continue          # closed or exited meanwhile
    return held


def release_left(scope_paths: Iterable[str], handover_path: str) -> tuple[int, int]:
    """Detach the `warden_*` programs stopped runs left attached (`on_stop: hold`, a handover
    whose next run never came, a crash) from the scope's cgroups and those a handover list
    names. Programs a live process holds (a running agent's) stay. Returns (removed, kept)."""
    handed = read_handover(handover_path)
    paths = list(dict.fromkeys([*(os.path.abspath(p) for p in scope_paths), *(e["path"] for e in handed)]))
    held = held_prog_ids()
    removed = kept = 0
    for path in paths:
        if not os.path.isdir(path):
            continue
        kept += sum(1 for prog in ours(attached_programs(path)) if prog["id"] in held)
        removed += sweep_stale(path, keep=held)
    if os.path.exists(handover_path):
        os.unlink(handover_path)
    return removed, kept


def read_handover(path: str) -> list[dict]:
    """The attachments a handed-over run listed; nothing when there is no (readable) list, in
    which case whatever was left is swept as a crash's."""
    try:
        with open(path) as f:
            data = json.load(f)
        return [{"path": str(p["path"]), "prog_id": int(p["prog_id"])} for p in data["programs"]]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("the previous run's handover list %s is unreadable (%s); what it left is "
                    "removed as a crash's", path, exc)
        return []
