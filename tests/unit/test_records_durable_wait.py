"""RecordWriter.when_durable: the wait a `durable_before_forward` target puts between a
statement's record and the statement itself. The callback must come only once the events
are in the spool (fsync'd), requests made together must share a batch, and every way the
events can fail to be stored must answer with an error instead of never."""
from __future__ import annotations

import threading
import time

import pytest

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from records.batch import decode_batch
from records.spool import Spool
from records.writer import RecordsNotDurable, RecordWriter


@pytest.fixture()
def records(tmp_path):
    """The real writer (a 30 s batch delay: only a request cuts) and its spool, closed after."""
    spool = Spool(str(tmp_path / "spool"))
    writer = RecordWriter("agent-d", Ed25519PrivateKey.generate(), str(tmp_path / "state"), spool,
                          batch_max_delay=30.0)
    yield writer, spool
    writer.close()
    spool.close()


def stored_seqs(spool) -> int:
    return sum(b.last_seq - b.first_seq + 1 for b in (decode_batch(d) for _, d in spool.pending()))


class Answers:
    """when_durable callbacks: what each answered, and done once `expected` have answered."""

    def __init__(self, expected: int = 1, spool=None):
        self.got: list = []
        self.stored_at_answer: list = []
        self.done = threading.Event()
        self._expected = expected
        self._spool = spool
        self._lock = threading.Lock()

    def __call__(self, error) -> None:
        with self._lock:
            if self._spool is not None:
                self.stored_at_answer.append(stored_seqs(self._spool))
            self.got.append(error)
            if len(self.got) == self._expected:
                self.done.set()


def test_the_answer_comes_once_the_events_are_in_the_spool_not_at_the_batch_delay(records):
    writer, spool = records
    for n in range(3):
        writer.emit("pg.statement", {"text": f"SELECT {n}"}, session_id="s")
    answers = Answers(spool=spool)
    started = time.monotonic()
    writer.when_durable(answers)
    assert answers.done.wait(5) and answers.got == [None]
    assert time.monotonic() - started < 2
    assert answers.stored_at_answer == [3]          # all three were stored before the answer


def test_nothing_pending_is_answered_at_once_on_the_callers_thread(records):
    writer, _ = records
    writer.emit("pg.statement", {"text": "SELECT 1"})
    writer.flush()
    threads = []
    writer.when_durable(lambda error: threads.append((threading.current_thread(), error)))
    assert threads == [(threading.current_thread(), None)]


def test_requests_made_while_the_writer_is_busy_share_one_batch(records):
    writer, spool = records
    answers = Answers(expected=50)
    for n in range(50):
        writer.emit("pg.statement", {"text": f"SELECT {n}"}, session_id=f"s{n}")
        writer.when_durable(answers)
    assert answers.done.wait(10) and answers.got == [None] * 50
    assert stored_seqs(spool) == 50
    assert len(list(spool.pending())) < 50          # group commit: not one fsync per request


def test_a_closing_or_dead_writer_answers_with_an_error(records):
    writer, _ = records
    writer.emit("pg.statement", {"text": "SELECT 1"})
    writer.close()
    answers = Answers()
    writer.when_durable(answers)
    assert len(answers.got) == 1 and isinstance(answers.got[0], RecordsNotDurable)


def test_events_that_were_lost_are_answered_with_an_error(records, monkeypatch):
    writer, spool = records

    def refuse(data, **kwargs):
        raise ValueError("frame over the spool maximum")
    monkeypatch.setattr(spool, "append", refuse)
    writer.emit("pg.statement", {"text": "SELECT 1"})
    answers = Answers()
    writer.when_durable(answers)
    assert answers.done.wait(5)
    assert isinstance(answers.got[0], RecordsNotDurable) and "not stored" in str(answers.got[0])
    monkeypatch.undo()


def test_a_full_spool_holds_the_answer_until_the_events_are_stored(records, monkeypatch):
    """While the spool refuses, nothing is answered (the enforcer's own timeout ends the wait);
    once it takes the batch, the answer comes."""
    from records.spool import SpoolFull
    writer, spool = records
    real_append = spool.append
    refusing = threading.Event()
    refusing.set()

    def append(data, **kwargs):
        if refusing.is_set():
            raise SpoolFull("test: spool full")
        return real_append(data, **kwargs)
    monkeypatch.setattr(spool, "append", append)
    writer.emit("pg.statement", {"text": "SELECT 1"})
    answers = Answers()
    writer.when_durable(answers)
    assert not answers.done.wait(0.6)
    refusing.clear()
    assert answers.done.wait(5) and answers.got == [None]
