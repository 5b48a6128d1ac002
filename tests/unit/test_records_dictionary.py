"""zstd dictionary batches, the BatchBuilder fast path, and old (plain zstd) batches."""

import copy
import itertools

import msgpack
import pytest
import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from records import corpus
from records import dictionary as dictionaries
from records.batch import (TAG_BYTES, BatchBuilder, BatchFormatError, build_batch,
                           content_tag, decode_batch, encode_batch)
from records.codec import GENESIS_HASH, canonical_encode, seal_event
from records.schema import validate_fields
from records.spool import Spool
from records.verifier import verify_batches
from records.writer import RecordWriter

AGENT = "i-0123456789abcdef0"


@pytest.fixture(scope="module")
def key():
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def sample():
    return list(corpus.events(600, seed=5))


def reference_encoding(event: dict) -> bytes:
    """Canonical encoding written independently: sort every map, msgpack the rest."""
    def canon(value):
        if isinstance(value, dict):
            return {k: canon(value[k]) for k in sorted(value)}
        if isinstance(value, (list, tuple)):
            return [canon(v) for v in value]
        return value
    return msgpack.packb(canon({k: v for k, v in event.items() if k not in ("prev", "hash")}),
                         use_bin_type=True)


def build_chain(key, sample, per_batch, dictionary="current", first_seq=1, prev=GENESIS_HASH):
    frames = []
    for start in range(0, len(sample), per_batch):
        builder = BatchBuilder(AGENT, prev, first_seq + start)
        for ts, sid, event_type, fields in sample[start:start + per_batch]:
            builder.add(ts, sid, event_type, fields)
        frames.append(builder.finish(key, created_ns=1_700_000_000_000_000_000,
                                     dictionary=dictionary))
        prev = builder.last_hash
    return frames


def old_style_frame(batch) -> bytes:
    """A batch as the writer produced it before dictionaries: fields packed in their
    insertion order by msgpack.packb, plain zstd level 3 frame."""
    events = batch.events
    body = {"fmt": 1, "sv": batch.schema_version, "ev": events[0]["v"], "agent": batch.agent_id,
            "first": batch.first_seq, "last": batch.last_seq, "prev": batch.prev_hash,
            "lasth": batch.last_hash, "created": batch.created_ns, "sig": batch.signature,
            "seqd": [e["seq"] - p for e, p in zip(events, [batch.first_seq] +
                                                     [e["seq"] for e in events[:-1]])],
            "tsd": [e["ts"] - p for e, p in zip(events, [0] + [e["ts"] for e in events[:-1]])],
            "sids": list(dict.fromkeys(e["sid"] for e in events)),
            "sidx": [], "types": list(dict.fromkeys(e["type"] for e in events)), "tidx": [],
            "f": [e["f"] for e in events], "tags": batch.tags}
    body["sidx"] = [body["sids"].index(e["sid"]) for e in events]
    body["tidx"] = [body["types"].index(e["type"]) for e in events]
    return zstandard.ZstdCompressor(level=3).compress(msgpack.packb(body, use_bin_type=True))


def test_shipped_dictionary_is_found_by_its_id():
    assert dictionaries.CURRENT_ID in dictionaries.known_ids()
    assert dictionaries.current().dict_id() == dictionaries.CURRENT_ID
    assert 32768 <= dictionaries.CURRENT_ID < 2**31


def test_corpus_fits_the_schema_and_covers_the_event_types():
    seen = set()
    for _, _, event_type, fields in corpus.events(5000, seed=9):
        validate_fields(event_type, fields)
        seen.add(event_type)
    assert {"session.start", "session.end", "pg.statement", "pg.result", "http.request",
            "http.response", "conn.observed", "agent.heartbeat"} <= seen


def test_canonical_encoding_matches_an_independent_reference(sample):
    nested = {"headers": {"b": 1, "a": [{"z": 1, "y": {"d": 2, "c": 3}}]}, "status": 200,
              "request_index": 1}
    events = [(1, None, "http.response", nested)] + sample
    for seq, (ts, sid, event_type, fields) in enumerate(events, 1):
        event = {"v": 1, "agent": AGENT, "seq": seq, "ts": ts, "sid": sid,
                 "type": event_type, "f": fields}
        assert canonical_encode(event) == reference_encoding(event)


def test_builder_matches_seal_and_build_batch(key, sample):
    builder = BatchBuilder(AGENT, GENESIS_HASH, 1)
    prev, sealed = GENESIS_HASH, []
    for seq, (ts, sid, event_type, fields) in enumerate(sample, 1):
        event = seal_event(AGENT, seq, ts, sid, event_type, fields, prev)
        prev = event["hash"]
        sealed.append(event)
        assert builder.add(ts, sid, event_type, fields) == event["hash"]
    assert (builder.last_seq, builder.last_hash) == (len(sample), prev)
    created = 1_700_000_000_000_000_000
    reference = build_batch(AGENT, sealed, key, created_ns=created)
    decoded = decode_batch(builder.finish(key, created_ns=created))
    assert decoded.events == sealed
    assert decoded.signature == reference.signature
    assert decoded.tags == reference.tags == b"".join(
        content_tag(canonical_encode(e)) for e in sealed)
    assert len(decoded.tags) == TAG_BYTES * len(sample)


def test_builder_add_that_fails_leaves_the_batch_unchanged():
    builder = BatchBuilder(AGENT, GENESIS_HASH, 1)
    builder.add(1, None, "agent.alert", {"kind": "x"})
    with pytest.raises(ValueError):
        builder.add(2, None, "agent.alert", {"kind": object()})
    assert (builder.count, builder.last_seq) == (1, 1)
    builder.add(3, None, "agent.alert", {"kind": "y"})
    assert builder.count == 2


@pytest.mark.parametrize("per_batch", [1, 64, 512])
def test_dictionary_round_trip_and_frame_names_its_dictionary(key, sample, per_batch):
    with_dict = build_chain(key, sample, per_batch)
    plain = build_chain(key, sample, per_batch, dictionary=None)
    for frame in with_dict:
        assert zstandard.get_frame_parameters(frame).dict_id == dictionaries.CURRENT_ID
    for frame in plain:
        assert zstandard.get_frame_parameters(frame).dict_id == 0
    for frames in (with_dict, plain):
        report = verify_batches(frames, key.public_key())
        assert report.ok, report.problems
        assert report.events_checked == len(sample)
    assert [decode_batch(f).events for f in with_dict] == [decode_batch(f).events for f in plain]
    if per_batch <= 64:
        assert sum(map(len, with_dict)) < sum(map(len, plain))


def test_frame_with_unknown_dictionary_is_a_format_error(key, sample):
    other = zstandard.train_dictionary(
        4096, [msgpack.packb(f) for _, _, _, f in corpus.events(2000, seed=3)], dict_id=40000)
    builder = BatchBuilder(AGENT, GENESIS_HASH, 1)
    builder.add(*sample[0])
    frame = builder.finish(key, dictionary=other)
    with pytest.raises(BatchFormatError, match="dictionary 40000"):
        decode_batch(frame)
    report = verify_batches([frame], key.public_key())
    assert [p.kind for p in report.problems] == ["bad_format"]


def test_old_plain_batches_still_decode_and_verify_next_to_new_ones(key, sample):
    # The first half of the chain as an old spool holds it, the rest as written now.
    new_frames = build_chain(key, sample, 100)
    old_frames = [old_style_frame(decode_batch(f)) for f in new_frames[:3]]
    for old, new in zip(old_frames, new_frames):
        assert zstandard.get_frame_parameters(old).dict_id == 0
        assert decode_batch(old).events == decode_batch(new).events
    report = verify_batches(old_frames + new_frames[3:], key.public_key())
    assert report.ok, report.problems
    assert report.events_checked == len(sample)
    # And the old build_batch/encode_batch path without a dictionary.
    prev, events = GENESIS_HASH, []
    for seq, (ts, sid, event_type, fields) in enumerate(sample[:50], 1):
        events.append(seal_event(AGENT, seq, ts, sid, event_type, fields, prev))
        prev = events[-1]["hash"]
    frame = encode_batch(build_batch(AGENT, events, key), dictionary=None)
    assert verify_batches([frame], key.public_key()).ok


def kinds(report):
    return [(p.kind, p.seq, p.batch_index) for p in report.problems]


def test_tampering_is_detected_in_dictionary_batches(key, sample):
    frames = build_chain(key, sample[:200], 50)

    def edit(index, change):
        batch = decode_batch(frames[index])
        change(batch)
        edited = encode_batch(batch)        # re-compressed with the dictionary
        assert zstandard.get_frame_parameters(edited).dict_id == dictionaries.CURRENT_ID
        return frames[:index] + [edited] + frames[index + 1:]

    target = decode_batch(frames[1]).events[7]
    field = next(iter(target["f"]))

    def modify(batch):
        event = batch.events[7]
        event["f"] = copy.deepcopy(event["f"])
        event["f"][field] = "tampered"
    assert kinds(verify_batches(edit(1, modify), key.public_key())) == \
        [("modified", target["seq"], 1)]

    def delete(batch):
        del batch.events[3]
    assert kinds(verify_batches(edit(2, delete), key.public_key())) == [("missing", 104, 2)]

    def reorder(batch):
        batch.events[4], batch.events[5] = batch.events[5], batch.events[4]
    found = kinds(verify_batches(edit(1, reorder), key.public_key()))
    assert len(found) == 1 and found[0][0] == "reordered" and found[0][1] in (55, 56)

    assert kinds(verify_batches(frames[:2] + frames[3:], key.public_key()))[0][:2] == \
        ("missing", 101)
    other = Ed25519PrivateKey.generate()
    resigned = build_chain(other, sample[:200], 50)
    assert kinds(verify_batches(frames[:3] + resigned[3:], key.public_key())) == \
        [("bad_signature", 151, 3)]


def test_writer_writes_dictionary_frames(tmp_path, key):
    spool = Spool(str(tmp_path / "spool"), max_bytes=1 << 24)
    writer = RecordWriter(AGENT, key, str(tmp_path / "state"), spool, batch_max_events=10)
    for _, sid, event_type, fields in itertools.islice(corpus.events(50, seed=2), 25):
        writer.emit(event_type, fields, session_id=sid)
    writer.close()
    frames = [data for _, data in spool.pending()]
    assert frames and all(zstandard.get_frame_parameters(f).dict_id ==
                          dictionaries.CURRENT_ID for f in frames)
    report = verify_batches(frames, key.public_key())
    assert report.ok and report.events_checked == 25
    spool.close()
