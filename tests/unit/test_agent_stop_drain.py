"""A stop's drain (Agent._drain_sessions): sessions get agent.stop_drain to end on their own at an
idle point; what still runs then is counted as cut (the caller cancels it)."""
import asyncio
import time
from types import SimpleNamespace

from agent.daemon import Agent


def drain(sessions, seconds):
    return Agent._drain_sessions(SimpleNamespace(active_sessions=set(sessions),
                                                 config=SimpleNamespace(stop_drain=seconds)))


def test_the_drain_waits_for_sessions_up_to_stop_drain_and_counts_what_is_left():
    async def main():
        quick = asyncio.create_task(asyncio.sleep(0.05))
        stuck = asyncio.create_task(asyncio.sleep(30))
        started = time.monotonic()
        counts = await drain([quick, stuck], 0.3)
        waited = time.monotonic() - started
        assert not stuck.done()
        stuck.cancel()
        return counts, waited

    counts, waited = asyncio.run(main())
    assert counts == (1, 1) and 0.25 <= waited < 2


def test_the_drain_ends_as_soon_as_the_last_session_does_and_zero_means_none():
    async def main():
        quick = asyncio.create_task(asyncio.sleep(0.05))
        started = time.monotonic()
        first = await drain([quick], 10)
        waited = time.monotonic() - started
        stuck = asyncio.create_task(asyncio.sleep(30))
        started = time.monotonic()
        second = await drain([stuck], 0)
        immediate = time.monotonic() - started
        stuck.cancel()
        assert await drain([], 10) == (0, 0)
        return first, waited, second, immediate

    first, waited, second, immediate = asyncio.run(main())
    assert first == (1, 0) and waited < 1
    assert second == (0, 1) and immediate < 0.1
