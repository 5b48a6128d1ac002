"""Each kind of tampering is detected and located."""

import copy

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from records.batch import BatchFormatError, build_batch, decode_batch, encode_batch
from records.codec import GENESIS_HASH, seal_event
from records.signing import public_key_bytes
from records.verifier import verify_batches, verify_continuation

AGENT = "agent-test"


def make_chain(key, batches=4, per_batch=5):
    """Encoded batches of pg.statement events, seq 1..batches*per_batch."""
    prev, seq, encoded = GENESIS_HASH, 1, []
    for _ in range(batches):
        events = []
        for _ in range(per_batch):
            event = seal_event(AGENT, seq, 1_700_000_000_000_000_000 + seq * 1000,
                               "0190a0b0-0000-7000-8000-000000000001", "pg.statement",
                               {"text": f"SELECT * FROM customers WHERE id = {seq}",
                                "kind": "select", "tables": ["customers"]}, prev)
            prev, seq = event["hash"], seq + 1
            events.append(event)
        encoded.append(encode_batch(build_batch(AGENT, events, key)))
    return encoded


@pytest.fixture(scope="module")
def key():
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def chain(key):
    return make_chain(key)


def kinds(report):
    return [(p.kind, p.seq, p.batch_index) for p in report.problems]


def edit(blob, change):
    batch = decode_batch(blob)
    change(batch)
    return encode_batch(batch)


def test_intact_chain_verifies(key, chain):
    report = verify_batches(chain, key.public_key())
    assert report.ok, report.problems
    assert (report.events_checked, report.batches_checked, report.last_seq) == (20, 4, 20)
    assert report.last_hash == decode_batch(chain[-1]).last_hash
    # Raw public key bytes and a per-agent mapping work too.
    assert verify_batches(chain, public_key_bytes(key)).ok
    assert verify_batches(chain, {AGENT: public_key_bytes(key)}).ok


def test_modified_field_is_located(key, chain):
    def change(batch):
        batch.events[2]["f"]["text"] = "SELECT 1"
    tampered = list(chain)
    tampered[1] = edit(chain[1], change)
    report = verify_batches(tampered, key.public_key())
    assert kinds(report) == [("modified", 8, 1)]


def test_deleted_event_is_located(key, chain):
    tampered = list(chain)
    tampered[2] = edit(chain[2], lambda b: b.events.pop(3))
    assert kinds(verify_batches(tampered, key.public_key())) == [("missing", 14, 2)]


def test_deleted_batch_is_located(key, chain):
    tampered = chain[:1] + chain[2:]
    report = verify_batches(tampered, key.public_key())
    assert kinds(report) == [("missing", 6, 1)]
    assert "6..10" in report.problems[0].detail


def test_reordered_events_are_located(key, chain):
    def swap(batch):
        batch.events[1], batch.events[3] = batch.events[3], batch.events[1]
    tampered = list(chain)
    tampered[0] = edit(chain[0], swap)
    assert kinds(verify_batches(tampered, key.public_key())) == [("reordered", 4, 0)]


def test_reordered_batches_are_located(key, chain):
    tampered = [chain[0], chain[2], chain[1], chain[3]]
    assert kinds(verify_batches(tampered, key.public_key())) == [("reordered", 6, 2)]


def test_inserted_forged_event_is_located(key, chain):
    # The forger chains the event properly after seq 12 and gives it the next number.
    def insert(batch):
        after = batch.events[1]
        forged = seal_event(AGENT, after["seq"] + 1, after["ts"] + 1, after["sid"],
                            "pg.statement", {"text": "SELECT 'forged'"}, after["hash"])
        batch.events.insert(2, forged)
    tampered = list(chain)
    tampered[2] = edit(chain[2], insert)
    assert kinds(verify_batches(tampered, key.public_key())) == [("inserted", 13, 2)]


def test_inserted_copy_of_an_event_is_located(key, chain):
    def duplicate(batch):
        batch.events.append(copy.deepcopy(batch.events[0]))
    tampered = list(chain)
    tampered[3] = edit(chain[3], duplicate)
    assert kinds(verify_batches(tampered, key.public_key())) == [("inserted", 16, 3)]


def test_replayed_batch_is_reported_as_inserted(key, chain):
    tampered = chain[:2] + [chain[1]] + chain[2:]
    assert kinds(verify_batches(tampered, key.public_key())) == [("inserted", 6, 2)]


def test_resigned_with_another_key_is_detected(key, chain):
    other = Ed25519PrivateKey.generate()
    def resign(batch):
        batch.events[0]["f"]["text"] = "SELECT 'rewritten'"
        rebuilt_prev = batch.prev_hash
        events = []
        for event in batch.events:
            fresh = seal_event(AGENT, event["seq"], event["ts"], event["sid"],
                               event["type"], event["f"], rebuilt_prev)
            rebuilt_prev = fresh["hash"]
            events.append(fresh)
        resigned = build_batch(AGENT, events, other)
        batch.__dict__.update(resigned.__dict__)
    tampered = list(chain)
    tampered[1] = edit(chain[1], resign)
    report = verify_batches(tampered, key.public_key())
    assert ("bad_signature", 6, 1) in kinds(report)
    # The re-signed batch no longer links to the next one either.
    assert ("gap", 11, 2) in kinds(report)


def test_unknown_key_and_bad_format(key, chain):
    report = verify_batches(chain[:1], {"someone-else": public_key_bytes(key)})
    assert kinds(report) == [("unknown_key", 1, 0)]
    report = verify_batches([chain[0], b"\x28\xb5\x2f\xfdgarbage", chain[1]],
                            key.public_key())
    assert [p.kind for p in report.problems] == ["bad_format"]
    assert report.problems[0].batch_index == 1


@pytest.mark.parametrize("blob", [b"", b"not zstd", b"\x28\xb5\x2f\xfd" + bytes(20)])
def test_decode_rejects_garbage(blob):
    with pytest.raises(BatchFormatError):
        decode_batch(blob)


def test_decode_rejects_truncation_and_bit_flips(chain):
    blob = chain[0]
    for cut in (1, len(blob) // 2, len(blob) - 1):
        with pytest.raises(BatchFormatError):
            decode_batch(blob[:cut])
    for position in range(0, len(blob), 7):
        flipped = bytearray(blob)
        flipped[position] ^= 0x40
        try:
            decode_batch(bytes(flipped))
        except BatchFormatError:
            pass


def test_continuation_from_collector_state(key, chain):
    first, second = decode_batch(chain[0]), decode_batch(chain[1])
    assert verify_continuation(5, first.last_hash, second, key.public_key()) == []
    problems = verify_continuation(3, first.last_hash, second, key.public_key())
    assert [p.kind for p in problems] == ["missing"]
    problems = verify_continuation(5, GENESIS_HASH, second, key.public_key())
    assert [p.kind for p in problems] == ["gap"]
