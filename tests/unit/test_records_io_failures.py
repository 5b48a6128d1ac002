"""The record path under I/O failure: real files in temp dirs, faults injected at the syscall
boundary (os.write / os.fsync / os.open, for files under one directory only), and the claims
that matter for evidence: no event is lost silently, a failure is seen (full, alerts, the
watchdog), and whatever could not be stored shows as a named gap, never as reused numbers."""
from __future__ import annotations

import asyncio
import errno
import json
import os
import threading
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import records.spool as spool_mod
from records.batch import decode_batch
from records.spool import Spool
from records.verifier import verify_batches
from records.writer import RecordBacklogFull, RecordWriter
from tests.waiting import wait_for

LOST_FILE = "lost-records"        # records.writer.LOST_FILE

ALERT = {"kind": "probe", "severity": "info", "message": "m"}


class Faults:
    """Wraps os.write / os.fsync (and optionally os.open) so that calls on files under `root`
    fail or write short, as a failing or filling disk makes them; every other file is untouched."""

    def __init__(self, monkeypatch, root: str):
        self.root = os.path.realpath(str(root))
        self.fsync_errors = 0          # next N fsyncs raise
        self.fsync_errno = errno.EIO
        self.write_errors = 0          # next N writes raise
        self.write_errno = errno.ENOSPC
        self.short_writes = 0          # next N writes store only half
        self.fail_after_short = False  # the write after a short one raises (the disk is full)
        self.persistent = None         # errno: every write and fsync fails until reset
        self.calls = {"write": 0, "fsync": 0}
        self._write, self._fsync = os.write, os.fsync
        monkeypatch.setattr(os, "write", self.write)
        monkeypatch.setattr(os, "fsync", self.fsync)

    def _ours(self, fd: int) -> bool:
        try:
            return os.readlink(f"/proc/self/fd/{fd}").startswith(self.root)
        except OSError:
            return False

    def write(self, fd, data):
        if not self._ours(fd):
            return self._write(fd, data)
        self.calls["write"] += 1
        if self.persistent:
            raise OSError(self.persistent, os.strerror(self.persistent))
        if self.write_errors:
            self.write_errors -= 1
            raise OSError(self.write_errno, os.strerror(self.write_errno))
        if self.short_writes and len(data) > 1:
            self.short_writes -= 1
            if self.fail_after_short:
                self.write_errors += 1
            return self._write(fd, bytes(data[:len(data) // 2]))
        return self._write(fd, data)

    def fsync(self, fd):
        if not self._ours(fd):
            return self._fsync(fd)
        self.calls["fsync"] += 1
        if self.persistent:
            raise OSError(self.persistent, os.strerror(self.persistent))
        if self.fsync_errors:
            self.fsync_errors -= 1
            raise OSError(self.fsync_errno, os.strerror(self.fsync_errno))
        return self._fsync(fd)


def frames(spool):
    return [data for _, data in spool.pending()]


def events(spool):
    return [e for f in frames(spool) for e in decode_batch(f).events]


def alerts(spool):
    return [e["f"] for e in events(spool) if e["type"] == "agent.alert" and e["f"]["kind"] != "probe"]


def seg_sizes(path):
    return {name: os.path.getsize(os.path.join(path, name)) for name in os.listdir(path)
            if name.endswith(".wal")}


# --------------------------------------------------------------------------------- spool
def test_a_short_write_is_completed_not_counted_as_whole(tmp_path, monkeypatch):
    """Bug fix: write(2) storing only part of a frame was taken for the whole frame; the next
    frame landed inside it and both were cut at the next start."""
    spool = Spool(str(tmp_path))
    spool.append(b"A" * 1000)
    faults = Faults(monkeypatch, tmp_path)
    faults.short_writes = 1
    spool.append(b"B" * 1000)
    spool.append(b"C" * 1000)
    assert [d[:1] for d in frames(spool)] == [b"A", b"B", b"C"]
    spool.close()
    again = Spool(str(tmp_path))
    assert [d for d in frames(again)] == [b"A" * 1000, b"B" * 1000, b"C" * 1000]
    assert again.recovery_notes == []


def test_a_write_failing_part_way_is_cut_back_and_raises(tmp_path, monkeypatch):
    spool = Spool(str(tmp_path))
    spool.append(b"A" * 1000)
    before = seg_sizes(tmp_path)
    faults = Faults(monkeypatch, tmp_path)
    faults.short_writes, faults.fail_after_short = 1, True     # half a frame, then ENOSPC
    with pytest.raises(OSError) as raised:
        spool.append(b"B" * 1000)
    assert raised.value.errno == errno.ENOSPC
    assert seg_sizes(tmp_path) == before                       # no half frame left behind
    assert [d[:1] for d in frames(spool)] == [b"A"]
    spool.append(b"C" * 1000)                                  # space came back
    spool.close()
    again = Spool(str(tmp_path))
    assert [d[:1] for d in frames(again)] == [b"A", b"C"] and again.recovery_notes == []


def test_a_failed_fsync_cuts_the_unsynced_frame_and_raises(tmp_path, monkeypatch):
    """After fsync reports EIO the kernel may have dropped the pages: the frame must not be
    reported durable, nor stay in the file to be shipped as a second copy after the retry."""
    spool = Spool(str(tmp_path))
    spool.append(b"A" * 100)
    before = seg_sizes(tmp_path)
    faults = Faults(monkeypatch, tmp_path)
    faults.fsync_errors = 1
    with pytest.raises(OSError) as raised:
        spool.append(b"B" * 100)
    assert raised.value.errno == errno.EIO
    assert seg_sizes(tmp_path) == before
    assert [d[:1] for d in frames(spool)] == [b"A"]
    spool.append(b"B" * 100)                                   # the caller's retry
    spool.close()
    again = Spool(str(tmp_path))
    assert [d[:1] for d in frames(again)] == [b"A", b"B"] and again.recovery_notes == []
    numbers = [ref.frame_no for ref, _ in again.pending()]
    assert numbers == sorted(set(numbers))


def test_group_commit_threads_all_fail_when_their_shared_fsync_fails(tmp_path, monkeypatch):
    spool = Spool(str(tmp_path), segment_bytes=64 << 10)
    faults = Faults(monkeypatch, tmp_path)
    results: dict[int, object] = {}
    gate = threading.Barrier(4)

    def worker(n):
        gate.wait()
        try:
            results[n] = spool.append(bytes([n]) * 5000)
        except OSError as exc:
            results[n] = exc

    faults.fsync_errors = 1
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stored = {n for n, r in results.items() if not isinstance(r, OSError)}
    assert len(stored) < 4                      # someone's frame was in the failed fsync
    spool.close()
    again = Spool(str(tmp_path), segment_bytes=64 << 10)
    # exactly the appends that returned are in the spool: none that raised, none twice
    assert sorted(d[0] for d in frames(again)) == sorted(stored)


def test_a_failed_segment_rotation_leaves_the_spool_usable(tmp_path, monkeypatch):
    spool = Spool(str(tmp_path), segment_bytes=64 << 10)
    spool.append(b"a" * 60_000)
    real = spool_mod.fsync_dir
    fail = {"n": 1}

    def flaky_fsync_dir(path):
        if fail["n"]:
            fail["n"] -= 1
            raise OSError(errno.EIO, "Input/output error")
        real(path)

    monkeypatch.setattr(spool_mod, "fsync_dir", flaky_fsync_dir)
    with pytest.raises(OSError):
        spool.append(b"b" * 60_000)              # needs a new segment: its directory sync fails
    spool.append(b"b" * 60_000)                  # and again: the leftover file is reused
    spool.append(b"c" * 60_000)
    spool.close()
    again = Spool(str(tmp_path), segment_bytes=64 << 10)
    assert [d[:1] for d in frames(again)] == [b"a", b"b", b"c"] and again.recovery_notes == []


# -------------------------------------------------------------------------------- writer
def make_writer(tmp_path, spool=None, **kwargs):
    key = kwargs.pop("key", None) or Ed25519PrivateKey.generate()
    spool = spool or Spool(str(tmp_path / "spool"), segment_bytes=64 << 10)
    kwargs.setdefault("batch_max_delay", 0.02)
    return key, spool, RecordWriter("agent-io", key, str(tmp_path / "state"), spool, **kwargs)


def test_an_fsync_error_holds_records_and_the_writer_survives(tmp_path, monkeypatch):
    """Bug fix: one EIO from fsync killed the writer thread; every later event stayed in memory
    forever while `full` said False, so sessions went on being admitted unrecorded."""
    key, spool, writer = make_writer(tmp_path)
    writer.emit("agent.alert", dict(ALERT))
    writer.flush()
    faults = Faults(monkeypatch, tmp_path / "spool")
    faults.persistent = errno.EIO
    writer.emit("agent.alert", dict(ALERT))
    assert wait_for(lambda: writer.full)         # the daemon refuses new sessions now
    assert "EIO" in writer.problem and writer.failure is None
    for _ in range(20):
        writer.emit("agent.alert", dict(ALERT))
    with pytest.raises(TimeoutError, match="EIO"):
        writer.flush(timeout=0.3)
    assert writer._thread.is_alive()
    faults.persistent = None                      # the disk recovers
    writer.flush(timeout=10)
    assert not writer.full and writer.problem is None
    report = verify_batches(frames(spool), key.public_key())
    assert report.ok and report.last_seq == 22 + 2, report.problems
    kinds = [a["kind"] for a in alerts(spool)]
    assert kinds == ["spool_io_error", "spool_io_recovered"]
    error = alerts(spool)[0]
    assert error["severity"] == "critical" and error["detail"]["errno"] == errno.EIO
    assert error["detail"]["failures"] >= 1 and "EIO" in error["message"]
    writer.close()


def test_while_the_spool_fails_the_backlog_stops_at_its_cap(tmp_path, monkeypatch):
    key, spool, writer = make_writer(tmp_path, backlog_cap=50, batch_max_events=10)
    faults = Faults(monkeypatch, tmp_path / "spool")
    faults.persistent = errno.ENOSPC
    accepted = 0
    with pytest.raises(RecordBacklogFull, match="no evidence, no access"):
        for _ in range(1000):
            writer.emit("agent.alert", dict(ALERT))
            accepted += 1
            time.sleep(0.001)
    assert accepted <= 50
    faults.persistent = None
    writer.flush(timeout=10)
    probes = [e for e in events(spool) if e["f"].get("kind") == "probe"]
    assert len(probes) == accepted               # everything accepted was stored
    writer.close()


def test_a_dead_writer_thread_is_full_refuses_and_fails_the_watchdog_check(tmp_path, monkeypatch):
    key, spool, writer = make_writer(tmp_path)
    writer.emit("agent.alert", dict(ALERT))
    writer.flush()

    def broken(*args, **kwargs):
        raise MemoryError("simulated: something no retry can help with")

    monkeypatch.setattr(spool, "append", broken)
    writer.emit("agent.alert", dict(ALERT))
    assert wait_for(lambda: not writer._thread.is_alive())
    assert writer.full and "MemoryError" in writer.failure
    with pytest.raises(RecordBacklogFull):
        writer.emit("agent.alert", dict(ALERT))
    with pytest.raises(TimeoutError):
        writer.close(timeout=1)
    monkeypatch.undo()
    lost = json.loads((tmp_path / "state" / LOST_FILE).read_bytes())
    assert [(e["first_seq"], e["last_seq"]) for e in lost] == [(2, 2)]
    # the next start continues after the lost event and says so in the chain
    spool.close()
    spool2 = Spool(str(tmp_path / "spool"), segment_bytes=64 << 10)
    writer2 = RecordWriter("agent-io", key, str(tmp_path / "state"), spool2)
    writer2.flush()
    got = alerts(spool2)
    assert [a["kind"] for a in got] == ["records_lost"]
    assert got[0]["detail"]["first_seq"] == 2 and "seq 2..2" in got[0]["message"]
    assert events(spool2)[-1]["seq"] == 3       # seq 2 is never numbered again
    assert not (tmp_path / "state" / LOST_FILE).exists()
    writer2.close()


def test_stop_during_an_io_error_saves_the_chain_head_and_names_the_lost_range(tmp_path, monkeypatch):
    """Bug fix: a stop while batches were held dropped them and skipped the chain head, so the
    next run numbered new events with the lost ones' sequence numbers: the loss was invisible."""
    key, spool, writer = make_writer(tmp_path)
    for _ in range(3):
        writer.emit("agent.alert", dict(ALERT))
    writer.flush()
    faults = Faults(monkeypatch, tmp_path / "spool")
    faults.persistent = errno.EIO
    for _ in range(5):
        writer.emit("agent.alert", dict(ALERT))
    assert wait_for(lambda: writer.full)
    writer.close(timeout=5)                      # the thread gives up on the batch and finishes
    faults.persistent = None
    head = (tmp_path / "state" / "chain-head").read_bytes()
    assert int.from_bytes(head[:8], "little") == 8
    lost = json.loads((tmp_path / "state" / LOST_FILE).read_bytes())
    assert [(e["first_seq"], e["last_seq"], e["events"]) for e in lost] == [(4, 8, 5)]
    assert "EIO" in lost[0]["reason"]
    spool.close()

    spool2 = Spool(str(tmp_path / "spool"), segment_bytes=64 << 10)
    writer2 = RecordWriter("agent-io", key, str(tmp_path / "state"), spool2)
    writer2.emit("agent.alert", {"kind": "after", "severity": "info", "message": "restart"})
    writer2.flush()
    stored = events(spool2)
    assert [e["seq"] for e in stored] == [1, 2, 3, 9, 10]        # 4..8 are a visible gap
    assert stored[3]["f"]["kind"] == "records_lost" and "seq 4..8 (5)" in stored[3]["f"]["message"]
    report = verify_batches(frames(spool2), key.public_key())
    assert [(p.kind, p.seq) for p in report.problems] == [("missing", 4)], report.problems
    writer2.close()


def test_stop_while_the_spool_is_full_stores_what_is_held_past_max_bytes(tmp_path):
    """A graceful stop with a full spool used to drop the held batches (and reuse their seqs)."""
    key = Ed25519PrivateKey.generate()
    spool = Spool(str(tmp_path / "spool"), max_bytes=4096, on_full="refuse")
    key, spool, writer = make_writer(tmp_path, spool=spool, key=key)
    for n in range(60):
        writer.emit("agent.alert", {"kind": "probe", "severity": "info", "message": os.urandom(150).hex()})
        time.sleep(0.003)
    assert wait_for(lambda: writer.full)
    head = writer.chain_head()[0]
    writer.close(timeout=5)
    spool.close()
    assert not (tmp_path / "state" / LOST_FILE).exists()
    again = Spool(str(tmp_path / "spool"), max_bytes=1 << 20)
    report = verify_batches(frames(again), key.public_key())
    assert report.ok and report.last_seq == head + 1, report.problems     # + the spool_full alert
    full = [a for a in alerts(again) if a["kind"] == "spool_full"]
    assert len(full) == 1 and full[0]["detail"]["stored_past_max_bytes_at_stop"] is True


def _fill_until_refused(writer, most: int = 2000) -> int:
    """Emit probe alerts until the writer turns events away (RecordBacklogFull), letting it store
    each one first while it can: a writer lagging behind a slow disk would otherwise still be
    storing, not yet full, when the loop ends, or hold more than the cap from before it was full."""
    refused = 0
    for _ in range(most):
        try:
            writer.emit("agent.alert", {"kind": "probe", "severity": "info", "message": os.urandom(300).hex()})
        except RecordBacklogFull:
            refused += 1
            if refused >= 5:
                break
            continue
        if not writer.full:
            try:
                writer.flush(timeout=0.5)
            except TimeoutError:        # the spool refused it: the writer holds it now
                pass
    return refused


def _ack_everything_at_once(spool) -> None:
    """The collector acknowledges everything pending. Newest first, so that the oldest ack frees
    all the space in one step: acked oldest first, the writer may store its held frame while
    only part is free and find the spool full again, a second (true) episode."""
    for ref, _ in reversed(list(spool.pending())):
        spool.ack(ref)


def test_on_full_block_is_bounded_capped_alerted_and_stops_cleanly(tmp_path):
    """Bug fix: with on_full block (as the daemon built it, no timeout) the writer waited in the
    spool forever: no backlog cap, no spool_full alert, and a stop raised SpoolClosed in the
    writer thread after saving a chain head past what was stored."""
    spool = Spool(str(tmp_path / "spool"), max_bytes=40_000, on_full="block", segment_bytes=8_000)
    key, spool, writer = make_writer(tmp_path, spool=spool, backlog_cap=50)
    refused = _fill_until_refused(writer)
    assert writer.full and refused > 0
    assert writer._unstored + (writer._open.count if writer._open is not None else 0) <= 50
    _ack_everything_at_once(spool)                # space returns
    writer.flush(timeout=10)
    kinds = [a["kind"] for a in alerts(spool)]
    assert kinds == ["spool_full", "spool_space_restored"]
    # full again, then a stop: nothing held is lost, the thread ends by itself
    assert _fill_until_refused(writer) > 0
    assert writer.full
    writer.close(timeout=5)
    assert not writer._thread.is_alive()
    spool.close()
    again = Spool(str(tmp_path / "spool"), max_bytes=1 << 20)
    head = (tmp_path / "state" / "chain-head").read_bytes()
    assert decode_batch(again.last_frame()).last_seq == int.from_bytes(head[:8], "little")
    assert not (tmp_path / "state" / LOST_FILE).exists()


def test_a_frame_over_the_spool_maximum_is_recorded_as_lost_and_the_writer_goes_on(tmp_path, monkeypatch):
    key, spool, writer = make_writer(tmp_path)
    monkeypatch.setattr(spool_mod, "MAX_FRAME_BYTES", 2000)
    writer.emit("agent.alert", {"kind": "probe", "severity": "info", "message": os.urandom(4000).hex()})
    writer.flush()
    writer.emit("agent.alert", {"kind": "probe", "severity": "info", "message": "small"})
    writer.flush()
    assert writer._thread.is_alive() and not writer.full
    got = alerts(spool)
    assert [a["kind"] for a in got] == ["records_lost"]
    assert got[0]["detail"]["first_seq"] == 1 and "cannot be stored" in got[0]["message"]
    assert [e["seq"] for e in events(spool)] == [2, 3]
    writer.close()


# -------------------------------------------------------------------------------- daemon
def _pipeline(tmp_path, extra=""):
    from agent.config import parse
    from agent.daemon import RecordsPipeline
    config = parse(f"agent:\n  state_dir: {tmp_path}/state\nspool:\n  path: {tmp_path}/spool\n{extra}"
                   "targets: []\n")
    return RecordsPipeline(config, "agent-d")


def test_the_daemon_records_spool_recovery_at_start(tmp_path):
    """Bug fix: what recovery cut or skipped (recovery_notes) was never read."""
    records = _pipeline(tmp_path)
    records.writer.emit("agent.alert", dict(ALERT))
    records.close()
    seg = sorted((tmp_path / "spool").glob("seg-*.wal"))[-1]
    with open(seg, "ab") as handle:
        handle.write(b"\x00\x01torn")
    records = _pipeline(tmp_path)
    got = records.startup_alerts()
    assert [a["kind"] for a in got] == ["spool_recovered"]
    assert got[0]["severity"] == "warning" and "torn frame header" in got[0]["detail"]["notes"][0]
    records.close()
    assert _pipeline(tmp_path).startup_alerts() == []


def test_heartbeat_and_inventory_survive_a_full_backlog(tmp_path):
    """Bug fix: RecordBacklogFull from emit ended the heartbeat and inventory loops for good."""
    from agent.bpfmgr import EV_ATTEMPT, EV_ESTABLISHED, Capture
    from agent.config import parse
    from agent.daemon import Agent
    from agent.inventory import Inventory

    class Sink:
        def __init__(self):
            self.full, self.got = True, []

        def emit(self, event_type, fields, session_id=None):
            if self.full:
                raise RecordBacklogFull("simulated full backlog")
            self.got.append((event_type, fields))

    agent = object.__new__(Agent)
    agent.config = parse("agent:\n  heartbeat_interval: 50ms\ninventory:\n  interval: 50ms\ntargets: []\n")
    agent.sink, agent.records, agent._schema_warned = Sink(), None, set()
    agent.inventory = Inventory(lambda cap: {"tgid": cap.tgid, "comm": cap.comm}, lambda t: None)
    agent._inventory_carry = {}
    agent.active_sessions, agent.stats, agent.started = set(), {}, time.monotonic()

    class Bpf:
        attached = []
        counters = [5, 0]        # the ring had no room for 5 events, none recorded yet

        def map_counts(self):
            return {}

        def ring_drops(self):
            return tuple(self.counters)

        def mark_drops_recorded(self, dropped):
            self.counters[1] = dropped

    agent.bpf = Bpf()

    def connect(cookie, pid):
        cap = Capture(cookie=cookie, cgroup_id=1, ktime_ns=0, orig_ip="127.0.0.10", orig_port=5432, target_id=0,
                      tgid=7, pid=pid, uid=0, gid=0, family=4, flags=0, comm="app")
        agent.inventory.on_event(EV_ATTEMPT, cap)
        agent.inventory.on_event(EV_ESTABLISHED, cap)

    async def scenario():
        stop = asyncio.Event()
        loops = [asyncio.create_task(agent._heartbeat_loop(stop)), asyncio.create_task(agent._inventory_loop(stop))]
        connect(1, 70)
        await asyncio.sleep(0.2)
        connect(2, 71)                              # folded with the first: same process and destination
        await asyncio.sleep(0.2)
        assert not any(t.done() for t in loops)     # both still running while records are refused
        agent.sink.full = False
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*loops)

    asyncio.run(scenario())
    kinds = [t for t, _ in agent.sink.got]
    assert "agent.heartbeat" in kinds
    observed = [f for t, f in agent.sink.got if t == "conn.observed"]
    assert len(observed) == 1 and observed[0]["attempts"] == 2 and observed[0]["established"] == 2
    # the ring's drops too: kept while refused, then recorded once
    drops = [f for t, f in agent.sink.got if t == "agent.alert" and f["kind"] == "bpf_events_dropped"]
    assert [d["detail"] for d in drops] == [{"dropped": 5, "during": "agent_behind"}]
    assert agent.bpf.counters == [5, 5]
    assert observed[0]["pids"] == [70, 71]


def test_the_watchdog_stops_when_the_writer_thread_is_dead(tmp_path, monkeypatch):
    import socket as socket_mod

    from agent.daemon import Agent
    records = _pipeline(tmp_path)
    path = str(tmp_path / "notify")
    listener = socket_mod.socket(socket_mod.AF_UNIX, socket_mod.SOCK_DGRAM)
    listener.bind(path)
    listener.settimeout(0.05)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")           # a ping every 100 ms (the queue holds 10)
    agent = object.__new__(Agent)
    agent.records = records

    def received():
        got, deadline = [], time.monotonic() + 0.1
        while time.monotonic() < deadline:
            try:
                got.append(listener.recv(4096).decode())
            except OSError:
                break
        return got

    async def scenario():
        stop = asyncio.Event()
        loop = asyncio.create_task(agent._watchdog_loop(stop))
        await asyncio.sleep(0.45)
        before = received()
        monkeypatch.setattr(records.spool, "append", lambda *a, **k: (_ for _ in ()).throw(MemoryError("x")))
        records.writer.emit("agent.alert", dict(ALERT))
        await asyncio.sleep(0.25)
        received()
        await asyncio.sleep(0.45)
        after = received()
        stop.set()
        await loop
        return before, after

    try:
        before, after = asyncio.run(scenario())
    finally:
        listener.close()
    assert sum("WATCHDOG=1" in m for m in before) >= 3
    assert not any("WATCHDOG=1" in m for m in after)          # systemd will restart the agent
    assert records.full and "MemoryError" in records.failure
    monkeypatch.undo()
    records.close()


def test_on_full_block_makes_a_new_session_wait_then_refuses(tmp_path):
    records = _pipeline(tmp_path, "  on_full: block\n  max_bytes: 200KiB\n")
    records.block_wait = 0.3
    deadline = time.monotonic() + 20
    while not records.full and time.monotonic() < deadline:
        records.writer.emit("agent.alert", {"kind": "probe", "severity": "info", "message": os.urandom(2000).hex()})
        time.sleep(0.01)
    assert wait_for(lambda: records.full)

    async def admit():
        started = time.monotonic()
        ok = await records.wait_recordable()
        return ok, time.monotonic() - started

    ok, waited = asyncio.run(admit())
    assert not ok and waited >= 0.3
    shipped = threading.Event()

    def ship():                     # the collector is back: a shipper acknowledges what it sends
        while not shipped.wait(0.05):
            for ref, _ in list(records.spool.pending()):
                records.spool.ack(ref)

    shipper = threading.Thread(target=ship)
    shipper.start()
    records.block_wait = 5
    try:
        ok, waited = asyncio.run(admit())
    finally:
        shipped.set()
        shipper.join()
    assert ok and waited < 5
    records.close()
