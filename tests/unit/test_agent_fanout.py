"""The agent's sink: the record writer alone is called directly; with an event log, both get
every event in order."""
from agent.events import FanoutSink, fanout


class _Sink:
    def __init__(self):
        self.events = []

    def emit(self, event_type, fields, session_id=None):
        self.events.append((event_type, fields, session_id))


def test_a_single_sink_is_used_as_it_is():
    only = _Sink()
    assert fanout(only, None) is only


def test_several_sinks_each_get_every_event_in_order():
    first, second = _Sink(), _Sink()
    sink = fanout(first, None, second)
    assert isinstance(sink, FanoutSink)
    sink.emit("pg.result", {"rows": 1}, "s1")
    sink.emit("session.end", {"reason": "closed"}, "s1")
    assert first.events == second.events == [("pg.result", {"rows": 1}, "s1"),
                                              ("session.end", {"reason": "closed"}, "s1")]


def test_when_durable_is_the_durable_sinks_and_an_error_without_one():
    """durable_before_forward waits on the record writer even with an event log beside it; a
    fanout with no durable sink answers with an error (the enforcer then forwards nothing)."""
    from records.writer import RecordsNotDurable

    class _Durable(_Sink):
        def __init__(self):
            super().__init__()
            self.waits = []

        def when_durable(self, callback):
            self.waits.append(callback)
            callback(None)
    log, durable = _Sink(), _Durable()
    answers = []
    fanout(log, durable).when_durable(answers.append)
    assert answers == [None] and len(durable.waits) == 1
    fanout(log, _Sink()).when_durable(answers.append)
    assert isinstance(answers[-1], RecordsNotDurable)
