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
