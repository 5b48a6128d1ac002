"""durable_before_forward: an enforcer waits until the records emitted so far are in the spool
before it forwards a statement or request, so that nothing runs unrecorded even if the agent
is killed a moment later. The wait is the record writer's (RecordWriter.when_durable, a group
commit), reached through ConnectionContext.when_durable."""
from __future__ import annotations

import asyncio
from typing import Callable, Optional

from records.writer import RecordsNotDurable

DEFAULT_DURABLE_TIMEOUT = 10.0      # the longest a statement or request waits for its record


def wait_for_records(ctx, answered: Callable[[Optional[BaseException]], None]) -> None:
    """answered(None) on the running event loop once every record emitted so far is stored;
    answered(error) if they cannot be, or if ctx has no durable sink (fail closed)."""
    loop = asyncio.get_running_loop()
    when_durable = getattr(ctx, "when_durable", None)
    if when_durable is None:
        answered(RecordsNotDurable("durable_before_forward is set but this enforcer's events go to "
                                   "no record writer"))
        return

    def from_writer(error) -> None:     # on the writer's thread, or at once on this one
        try:
            loop.call_soon_threadsafe(answered, error)
        except RuntimeError:            # the loop is closed: nobody is waiting any more
            pass
    when_durable(from_writer)


async def records_durable(ctx, timeout: float) -> Optional[BaseException]:
    """None once every record emitted so far is stored; the reason if not within `timeout`."""
    answer = asyncio.get_running_loop().create_future()
    wait_for_records(ctx, lambda error: answer.done() or answer.set_result(error))
    try:
        return await asyncio.wait_for(answer, timeout)
    except asyncio.TimeoutError:
        return timed_out(timeout)


def timed_out(timeout: float) -> RecordsNotDurable:
    return RecordsNotDurable(f"not stored within {timeout:g} s (target option durable_timeout)")


def not_forwarded(what: str, error) -> str:
    """What a client is told when its statement or request was not forwarded for want of its record."""
    return (f"Warden did not forward this {what}: its record could not be stored ({error}). The target "
            f"requires records on disk first (durable_before_forward): check free space and disk errors "
            f"under the agent's spool.path (its alerts say spool_full or spool_io_error), or raise "
            f"durable_timeout if the disk is only slow")
