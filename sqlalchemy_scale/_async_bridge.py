"""Bridges between the sync routing code and asyncio engines.

Under :class:`~sqlalchemy.ext.asyncio.AsyncSession`, SQLAlchemy runs the sync
session's code (our ``get_bind``, commit hooks, fan-out) in a greenlet on the
event loop's thread; the async driver is reached through ``await_()``, which
hands each awaitable to the loop. Two things follow, and this module holds them:

* code on that path must not block: a wait (the on-demand check for a caught-up
  replica) is awaited through the loop (:func:`run_blocking`, :func:`pause`);
* code on another thread (the health monitor's probes) has no greenlet and no
  loop, so it cannot use an async engine at all: it gets a sync engine on the
  same server (:func:`probe_engine`).

Uses ``sqlalchemy.util.concurrency`` (``in_greenlet``, ``await_``), the
functions SQLAlchemy's own asyncio extension is built on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Final, TypeVar

from sqlalchemy import create_engine
from sqlalchemy.engine import URL, Engine
from sqlalchemy.util.concurrency import in_greenlet

from ._sa import await_

__all__ = ["is_async_engine", "pause", "probe_engine", "run_blocking", "sync_url"]

T = TypeVar("T")

# Sync drivers on the same servers, for threads that cannot run an async driver.
# psycopg2 is a dependency of the package, so it is always there for asyncpg URLs.
_SYNC_DRIVERS: Final = {"asyncpg": "psycopg2", "psycopg_async": "psycopg", "psycopg": "psycopg"}

# asyncpg-only URL query keys: SQLAlchemy passes them to asyncpg, libpq rejects them.
_ASYNCPG_ONLY: Final = frozenset(
    {
        "prepared_statement_cache_size",
        "prepared_statement_name_func",
        "statement_cache_size",
        "server_settings",
        "command_timeout",
        "timeout",
    }
)


def is_async_engine(engine: Engine) -> bool:
    """True for the sync engine of an :class:`~sqlalchemy.ext.asyncio.AsyncEngine`."""
    return bool(engine.dialect.is_async)


def run_blocking(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args)``, awaited on a worker thread when called from an asyncio session's
    greenlet (so the event loop keeps running), called directly otherwise."""
    if in_greenlet():
        return await_(asyncio.to_thread(fn, *args, **kwargs))
    return fn(*args, **kwargs)


def pause(seconds: float) -> None:
    """Sleep, as ``await asyncio.sleep()`` under an asyncio session, ``time.sleep()`` otherwise."""
    if in_greenlet():
        await_(asyncio.sleep(seconds))
    else:
        time.sleep(seconds)


def sync_url(url: URL) -> URL:
    """The same server, database and credentials with a sync driver (asyncpg -> psycopg2,
    psycopg async -> psycopg). asyncpg's ``ssl`` query key becomes libpq's ``sslmode``;
    asyncpg-only keys are dropped."""
    driver = url.get_driver_name()
    sync_driver = _SYNC_DRIVERS.get(driver, driver)
    query = dict(url.query)
    if driver == "asyncpg":
        query = {k: v for k, v in query.items() if k not in _ASYNCPG_ONLY}
        if "ssl" in query and "sslmode" not in query:
            query["sslmode"] = query.pop("ssl")
    return url.set(drivername=f"{url.get_backend_name()}+{sync_driver}", query=query)


def probe_engine(engine: Engine) -> Engine:
    """An engine with a pool of its own on the same server as ``engine``, usable from any
    thread: a copy of a sync engine (same URL and pool settings, creator included), or a
    sync-driver engine for an async one.

    Credentials an async engine gets from outside its URL (``async_creator``,
    ``connect_args``) are not visible here; give async nodes' credentials in the URL.
    """
    if not is_async_engine(engine):
        return create_engine(engine.url, pool=engine.pool.recreate())
    # One connection is enough: a node's probes hold a lock, one at a time.
    return create_engine(sync_url(engine.url), pool_size=1, max_overflow=1)
