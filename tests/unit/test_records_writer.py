import asyncio
import time

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from records.batch import decode_batch
from records.spool import Spool
from records.verifier import verify_batches
from records.writer import RecordWriter


def frames(spool):
    return [data for _, data in spool.pending()]


def test_emit_flush_restart_continues_chain(tmp_path):
    key = Ed25519PrivateKey.generate()
    spool = Spool(str(tmp_path / "spool"))
    writer = RecordWriter("agent-w", key, str(tmp_path / "state"), spool,
                          batch_max_events=10, batch_max_delay=0.05)
    for n in range(25):
        writer.emit("pg.statement", {"text": f"SELECT {n}"}, session_id="s1")
    writer.flush()
    assert writer.last_seq == 25
    writer.close()
    spool.close()

    spool = Spool(str(tmp_path / "spool"))
    writer = RecordWriter("agent-w", key, str(tmp_path / "state"), spool,
                          batch_max_events=10, batch_max_delay=0.05)
    assert writer.last_seq == 25
    writer.emit("agent.start", {"version": "test"})
    writer.close()
    report = verify_batches(frames(spool), key.public_key())
    assert report.ok and report.last_seq == 26, report.problems
    batches = [decode_batch(f) for f in frames(spool)]
    assert [b.last_seq - b.first_seq + 1 for b in batches] == [10, 10, 5, 1]
    assert batches[0].events[3]["f"] == {"text": "SELECT 3"}


def test_emit_from_asyncio_does_not_wait_for_disk(tmp_path):
    key = Ed25519PrivateKey.generate()
    spool = Spool(str(tmp_path / "spool"))
    writer = RecordWriter("agent-a", key, str(tmp_path / "state"), spool)

    async def produce():
        started = time.perf_counter()
        for n in range(5000):
            writer.emit("pg.result", {"rows": n})
        return time.perf_counter() - started

    elapsed = asyncio.run(produce())
    assert elapsed < 1.0        # 5000 emits: enqueue only, no fsync on this thread
    writer.flush()
    assert verify_batches(frames(spool), key.public_key()).last_seq == 5000
    writer.close()


def fill_until_full(writer, text: str, pause_every: int) -> int:
    """Emit big statements until the writer reports its spool full; how many it took."""
    big = text * 2000
    deadline = time.monotonic() + 10
    n = 0
    while not writer.full and time.monotonic() < deadline:
        writer.emit("pg.statement", {"text": f"{n} {big}{n * 7919}"})
        n += 1
        if n % pause_every == 0:
            time.sleep(0.02)       # let the writer thread store batches
    assert writer.full
    return n


def test_full_spool_holds_events_and_records_alerts(tmp_path):
    key = Ed25519PrivateKey.generate()
    spool = Spool(str(tmp_path / "spool"), max_bytes=150_000, segment_bytes=64 << 10)
    writer = RecordWriter("agent-f", key, str(tmp_path / "state"), spool,
                          batch_max_events=50, batch_max_delay=0.01)
    n = fill_until_full(writer, "x", 50)
    for extra in range(10):
        writer.emit("pg.statement", {"text": f"while full {extra}"})
    # Ship (acknowledge) everything durable so far: space returns.
    for ref, _ in list(spool.pending()):
        spool.ack(ref)
    writer.flush(timeout=10)
    assert not writer.full
    report = verify_batches(frames(spool), key.public_key(),
                            start_seq=decode_batch(frames(spool)[0]).first_seq,
                            start_hash=decode_batch(frames(spool)[0]).prev_hash)
    assert report.ok, report.problems
    assert report.last_seq == n + 10 + 2          # every event plus two alerts
    kinds = [e["f"].get("kind") for f in frames(spool) for e in decode_batch(f).events
             if e["type"] == "agent.alert"]
    assert kinds == ["spool_full", "spool_space_restored"]
    writer.close()


def test_unencodable_value_is_recorded_as_text_and_the_writer_keeps_going(tmp_path):
    """Bug fix: a value msgpack cannot encode used to kill the writer thread, losing every later event."""
    from records.batch import decode_batch
    from records.signing import load_or_create_key
    from records.spool import Spool
    from records.verifier import verify_batches
    from records.writer import RecordWriter
    key = load_or_create_key(str(tmp_path / "k"))
    spool = Spool(str(tmp_path / "spool"))
    writer = RecordWriter("a1", key, str(tmp_path / "state"), spool, batch_max_delay=0.05)

    class Opaque:
        def __str__(self):
            return "opaque-thing"

    writer.emit("agent.alert", {"kind": "probe", "detail": {"obj": Opaque(), "tags": {"b", "a"}, "big": 1 << 70}})
    writer.emit("agent.alert", {"kind": "after"})
    writer.flush()
    writer.close()
    frames = [data for _ref, data in spool.pending()]
    events = [e for f in frames for e in decode_batch(f).events]
    kinds = [(e["type"], e["f"].get("kind")) for e in events]
    assert kinds == [("agent.alert", "probe"), ("agent.alert", "unencodable_event"), ("agent.alert", "after")]
    repaired = events[0]["f"]
    assert repaired["detail"] == {"obj": "opaque-thing", "tags": ["a", "b"], "big": str(1 << 70)}
    assert repaired["x_encoding_repaired"] is True
    assert verify_batches(frames, key.public_key()).ok
    spool.close()


def test_concurrent_producers_share_one_gapless_chain(tmp_path):
    import threading
    key = Ed25519PrivateKey.generate()
    spool = Spool(str(tmp_path / "spool"))
    writer = RecordWriter("agent-t", key, str(tmp_path / "state"), spool, batch_max_events=64)

    def produce(n):
        for i in range(2000):
            writer.emit("pg.result", {"rows": i, "x_producer": n})

    threads = [threading.Thread(target=produce, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writer.flush()
    report = verify_batches(frames(spool), key.public_key())
    assert report.ok and report.last_seq == 8000, report.problems
    # each producer's events stay in the order it emitted them
    seen = {}
    for frame in frames(spool):
        for event in decode_batch(frame).events:
            n, rows = event["f"]["x_producer"], event["f"]["rows"]
            assert rows == seen.get(n, -1) + 1
            seen[n] = rows
    writer.close()


def test_an_idle_open_batch_is_cut_after_the_delay(tmp_path):
    key = Ed25519PrivateKey.generate()
    spool = Spool(str(tmp_path / "spool"))
    writer = RecordWriter("agent-d", key, str(tmp_path / "state"), spool, batch_max_delay=0.1)
    writer.emit("pg.result", {"rows": 1})
    deadline = time.monotonic() + 5
    while not frames(spool) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [decode_batch(f).last_seq for f in frames(spool)] == [1]     # no flush was needed
    writer.close()


def test_too_deeply_nested_value_is_recorded_cut_short_and_the_writer_keeps_going(tmp_path):
    """Bug fix: a value nested thousands deep raised RecursionError out of emit()."""
    from records.batch import decode_batch
    from records.codec import MAX_DEPTH
    from records.signing import load_or_create_key
    from records.spool import Spool
    from records.verifier import verify_batches
    from records.writer import RecordWriter
    key = load_or_create_key(str(tmp_path / "k"))
    spool = Spool(str(tmp_path / "spool"))
    writer = RecordWriter("a1", key, str(tmp_path / "state"), spool, batch_max_delay=0.05)
    deep = leaf = {}
    for _ in range(3000):
        leaf["n"] = {}
        leaf = leaf["n"]
    writer.emit("agent.alert", {"kind": "deep", "detail": deep})
    writer.emit("agent.alert", {"kind": "after"})
    writer.close()
    frames = [data for _ref, data in spool.pending()]
    events = [e for f in frames for e in decode_batch(f).events]
    assert [e["f"]["kind"] for e in events] == ["deep", "unencodable_event", "after"]
    cursor, levels = events[0]["f"]["detail"], 1
    while isinstance(cursor, dict):
        cursor, levels = cursor["n"], levels + 1
    assert levels <= MAX_DEPTH + 1 and "nested deeper than" in cursor
    assert verify_batches(frames, key.public_key()).ok
    spool.close()


def test_producers_racing_deadline_cuts_flushes_and_chain_head_lose_nothing(tmp_path):
    """The native path seals without the writer's lock: a batch the writer thread cuts (by its
    deadline, by flush) while producers on other threads emit must not gain or lose an event.
    Thread switches are forced every few microseconds to interleave the two as often as can be."""
    import sys
    import threading
    key = Ed25519PrivateKey.generate()
    spool = Spool(str(tmp_path / "spool"))
    writer = RecordWriter("agent-r", key, str(tmp_path / "state"), spool, batch_max_events=37,
                          batch_max_delay=0.001)
    heads = []
    stop = threading.Event()

    def produce(n):
        for i in range(3000):
            writer.emit("pg.result", {"rows": i, "x_producer": n}, session_id=f"s{n}")
            if i % 500 == 0:
                writer.flush()

    def watch():
        while not stop.is_set():
            heads.append(writer.chain_head())

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=produce, args=(n,)) for n in range(4)]
        watcher = threading.Thread(target=watch)
        watcher.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stop.set()
        watcher.join()
    finally:
        sys.setswitchinterval(interval)
    writer.flush()
    assert writer.chain_head()[0] == 12000
    report = verify_batches(frames(spool), key.public_key())
    assert report.ok and report.last_seq == 12000, report.problems
    seen, hashes, last_ts = {}, {}, 0
    for frame in frames(spool):
        for event in decode_batch(frame).events:
            n, rows = event["f"]["x_producer"], event["f"]["rows"]
            assert rows == seen.get(n, -1) + 1 and event["sid"] == f"s{n}"
            seen[n] = rows
            hashes[event["seq"]] = event["hash"]
            assert event["ts"] >= last_ts      # stamped inside the sealing call: in sequence order
            last_ts = event["ts"]
    assert all(len(decode_batch(f).events) <= 37 for f in frames(spool))
    # every head read while producers ran was a real (seq, hash) pair of the chain
    assert heads and all(seq == 0 or hashes[seq] == digest for seq, digest in heads)
    writer.close()


def test_the_backlog_stops_at_its_cap_while_the_spool_is_full(tmp_path):
    from records.writer import RecordBacklogFull
    key = Ed25519PrivateKey.generate()
    spool = Spool(str(tmp_path / "spool"), max_bytes=150_000, segment_bytes=64 << 10)
    writer = RecordWriter("agent-b", key, str(tmp_path / "state"), spool, batch_max_events=50,
                          batch_max_delay=0.01, backlog_cap=120)
    fill_until_full(writer, "y", 25)
    time.sleep(0.1)            # the writer thread has cut and tried to store what was open
    accepted = 0
    try:
        for extra in range(500):
            writer.emit("pg.statement", {"text": f"while full {extra}"})
            accepted += 1
            if extra % 10 == 0:
                time.sleep(0.02)     # let the deadline cut the open batch now and then
    except RecordBacklogFull as exc:
        assert "no evidence, no access" in str(exc)
    else:
        raise AssertionError("the backlog grew past its cap")
    assert writer._unstored + (writer._open.count if writer._open is not None else 0) <= 120
    # space returns: everything accepted is stored, nothing refused appears
    for ref, _ in list(spool.pending()):
        spool.ack(ref)
    writer.flush(timeout=10)
    texts = [e["f"].get("text", "") for f in frames(spool) for e in decode_batch(f).events]
    assert sum(t.startswith("while full") for t in texts) == accepted
    writer.close()


def test_an_event_outside_the_schema_is_refused_on_either_path_and_leaves_no_gap(tmp_path):
    """The caller (the agent) repairs such an event; the writer must refuse it whole, whether it
    arrives with no open batch (locked path) or into an open one (the native one-call path)."""
    import pytest

    from records.schema import SchemaError
    key = Ed25519PrivateKey.generate()
    spool = Spool(str(tmp_path / "spool"))
    writer = RecordWriter("agent-s", key, str(tmp_path / "state"), spool, batch_max_delay=5)
    with pytest.raises(SchemaError, match="unknown field 'bogus'"):
        writer.emit("pg.result", {"bogus": 1})           # no batch open yet
    writer.emit("pg.result", {"rows": 1})
    for _ in range(2):                                     # into the open batch, twice (shape memo)
        with pytest.raises(SchemaError, match="unknown field 'bogus'"):
            writer.emit("pg.result", {"rows": 2, "bogus": 1})
    with pytest.raises(SchemaError, match="unknown event type"):
        writer.emit("pg.nothing", {"rows": 1})
    writer.emit("pg.result", {"rows": 3, "x_bogus": 1})
    writer.flush()
    events = [e for f in frames(spool) for e in decode_batch(f).events]
    assert [e["f"] for e in events] == [{"rows": 1}, {"rows": 3, "x_bogus": 1}]
    assert verify_batches(frames(spool), key.public_key()).ok
    writer.close()


def _record_through(tmp_path, name, events, how, batch_max_events):
    key = Ed25519PrivateKey.generate()
    spool = Spool(str(tmp_path / name / "spool"))
    writer = RecordWriter("agent-e", key, str(tmp_path / name / "state"), spool,
                          batch_max_events=batch_max_events, batch_max_delay=5)
    emitters = {}
    for sid, event_type, fields in events:
        if how == "emit":
            writer.emit(event_type, fields, session_id=sid)
        else:
            if sid not in emitters:
                emitters[sid] = writer.emitter(sid)
            emitters[sid](event_type, fields)
    writer.flush()
    writer.close()
    got = [(e["seq"], e["sid"], e["type"], e["f"]) for f in frames(spool) for e in decode_batch(f).events]
    assert verify_batches(frames(spool), key.public_key()).ok
    spool.close()
    return got


class _Opaque:
    def __str__(self):
        return "opaque"


def test_a_session_emitter_records_exactly_what_emit_records(tmp_path):
    """writer.emitter(sid) is the enforcers' per-event path (C when native): across batch cuts,
    with several sessions and with values that need repair, the chain holds what emit() gives."""
    events = []
    for n in range(40):
        sid = f"s{n % 3}"
        events.append((sid, "pg.statement", {"text": f"SELECT {n}", "params": [str(n)], "statement_index": n}))
        events.append((sid, "pg.result", {"rows": n, "command_tag": "SELECT 1", "error": None}))
        if n % 13 == 0:
            events.append((sid, "agent.alert", {"kind": "probe", "detail": {"obj": _Opaque()}}))
    for batch_max_events in (7, 10_000):
        via_emit = _record_through(tmp_path, f"emit{batch_max_events}", events, "emit", batch_max_events)
        via_emitter = _record_through(tmp_path, f"emitter{batch_max_events}", events, "emitter",
                                      batch_max_events)
        assert via_emitter == via_emit
        assert len(via_emit) == len(events) + 4      # each repaired event adds its alert
        assert {sid for _, sid, _, _ in via_emit} == {"s0", "s1", "s2"}


def test_a_session_emitter_refuses_what_emit_refuses(tmp_path):
    import pytest

    from records.schema import SchemaError
    from records.writer import RecordBacklogFull
    key = Ed25519PrivateKey.generate()
    spool = Spool(str(tmp_path / "spool"), max_bytes=150_000, segment_bytes=64 << 10)
    writer = RecordWriter("agent-r", key, str(tmp_path / "state"), spool, batch_max_events=50,
                          batch_max_delay=0.01, backlog_cap=120)
    emit = writer.emitter("s1")
    emit("pg.result", {"rows": 1})                   # opens a batch: the next ones take the C path
    with pytest.raises(SchemaError, match="unknown field 'bogus'"):
        emit("pg.result", {"rows": 2, "bogus": 1})
    with pytest.raises(TypeError):
        emit("pg.result")
    fill_until_full(writer, "y", 25)
    time.sleep(0.1)
    with pytest.raises(RecordBacklogFull):
        for extra in range(500):
            emit("pg.statement", {"text": f"while full {extra}"})
            if extra % 10 == 0:
                time.sleep(0.02)
    for ref, _ in list(spool.pending()):
        spool.ack(ref)
    writer.close()
    spool.close()


def test_the_emitter_is_native_when_the_writer_is():
    from tests.native_switch import printed_with_pure_python
    code = ("from records.writer import RecordWriter; import records.codec as c; "
            "print(type(RecordWriter.emitter(object.__new__(RecordWriter), 's')).__name__, c.NATIVE)")
    for env_value, want in (("1", "partial False"), ("0", "Emitter True")):
        assert printed_with_pure_python(code, env_value) == want


def test_big_batches_are_stored_as_frames_under_batch_max_bytes(tmp_path):
    """Bug fix: a batch of large statements could exceed the collector's 64 MiB, which refuses
    it (413) for ever; batches are now cut by encoded size, each part a signed batch."""
    import os
    key = Ed25519PrivateKey.generate()
    spool = Spool(str(tmp_path / "spool"))
    writer = RecordWriter("agent-m", key, str(tmp_path / "state"), spool, batch_max_delay=5)
    writer.batch_max_bytes = 20_000          # the constructor's batch_max_bytes (16 MiB by default)
    texts = [os.urandom(n).hex() for n in (3000, 3000, 3000, 3000, 30_000, 10, 10, 5000)]
    for n, text in enumerate(texts):
        writer.emit("pg.statement", {"text": text}, session_id=f"s{n % 3}")
    writer.emit("pg.result", {"rows": 1}, session_id="s9")
    writer.flush()
    stored = frames(spool)
    assert len(stored) > 2
    for data in stored:
        batch = decode_batch(data)
        size = sum(len(e["f"].get("text", "")) for e in batch.events)
        assert size <= 20_000 + 100 or len(batch.events) == 1
    report = verify_batches(stored, key.public_key())
    assert report.ok and report.last_seq == len(texts) + 1, report.problems
    got = [(e["sid"], e["f"].get("text")) for data in stored for e in decode_batch(data).events]
    assert got[:-1] == [(f"s{n % 3}", t) for n, t in enumerate(texts)] and got[-1] == ("s9", None)
    writer.close()
