"""Fan-out under asyncio: each shard's statement runs as its own task on the event loop.

Under :class:`~sqlalchemy_scale.AsyncShardedSession` the sync session runs in a
greenlet on the event loop's thread, and its connections use the async driver
through ``await_()``. The thread pool of :func:`~sqlalchemy_scale.sharding.fanout.run_concurrently`
cannot run them (a worker thread has no greenlet and no loop: ``MissingGreenlet``).
Here each job runs in its own greenlet (``greenlet_spawn``) inside its own task, so
the shards' round trips overlap on the loop, and the calling greenlet awaits them all.

Same contract as the threaded version: results by shard id; the first failure
(in shard order) is raised with the shard named, after the other jobs were
cancelled (task cancellation: the driver cancels its running query) and have ended.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sqlalchemy.engine import Connection
from sqlalchemy.util.concurrency import greenlet_spawn

from .._sa import await_
from .strategies import ShardId

__all__ = ["is_async_connection", "run_concurrently_on_loop"]

T = TypeVar("T")


def is_async_connection(connection: Connection) -> bool:
    """True for a connection of an asyncio engine (its statements must run on the loop)."""
    return bool(connection.dialect.is_async)


def run_concurrently_on_loop(
    jobs: Sequence[tuple[ShardId, Connection, Callable[[Connection], T]]],
    with_shard: Callable[[BaseException, ShardId], BaseException],
) -> dict[ShardId, T]:
    """Run each ``fn(connection)`` as a task on the running loop; return results by shard id.

    Called from an asyncio session's greenlet; blocks that greenlet (not the loop)
    until every job has ended.
    """
    return await_(_run(jobs, with_shard))


async def _run(
    jobs: Sequence[tuple[ShardId, Connection, Callable[[Connection], T]]],
    with_shard: Callable[[BaseException, ShardId], BaseException],
) -> dict[ShardId, T]:
    tasks = {shard_id: asyncio.create_task(greenlet_spawn(fn, conn)) for shard_id, conn, fn in jobs}
    try:
        await asyncio.wait(tasks.values(), return_when=asyncio.FIRST_EXCEPTION)
    except BaseException:
        # This task was cancelled: the jobs must end before their connections are used again.
        await _cancel_and_wait(tasks.values())
        raise
    failed = [s for s, t in tasks.items() if t.done() and not t.cancelled() and t.exception()]
    if failed:
        await _cancel_and_wait(t for t in tasks.values() if not t.done())
        shard_id = failed[0]  # dict order is shard order
        error = tasks[shard_id].exception()
        assert error is not None
        raise with_shard(error, shard_id) from None
    return {shard_id: task.result() for shard_id, task in tasks.items()}


async def _cancel_and_wait(tasks: Any) -> None:
    pending = [t for t in tasks if not t.done()]
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
