"""Best-effort cross-shard commit: COMMIT each written shard in turn, and say exactly what
happened when one fails (``ShardSet(cross_shard_writes="best_effort")``).

This is what SQLAlchemy's horizontal_shard does with a transaction on several
shards (one COMMIT per connection, in turn), minus its silence: when a COMMIT
fails, the shards before it have committed and cannot be undone, so the
application gets :class:`~sqlalchemy_scale.PartialCommitError` listing the
shards that committed, the one that failed (or whose outcome is unknown because
its connection was lost during COMMIT) and those rolled back after it; never a
plain success, never a bare driver error that reads as "nothing committed".

When *not* to use it: writes that must land on every shard or on none (use
``cross_shard_writes="two_phase"``), or that the application cannot reconcile.

Each COMMIT is sent through the driver connection of the session's own
connection to that shard. The drivers then see no transaction in progress, so
the COMMIT (or ROLLBACK) SQLAlchemy later asks of these connections sends
nothing (psycopg2 and psycopg 3 send nothing outside a transaction).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from sqlalchemy.engine import Connection

from ..errors import PartialCommitError, mask_secrets
from .strategies import ShardId

__all__ = ["commit_shards", "connection_lost", "describe"]

log = logging.getLogger("sqlalchemy_scale.sharding")

# SQLSTATE classes that say the connection, not the transaction, failed: 08 connection
# exception, 57 operator intervention (57P01 pg_terminate_backend). At COMMIT they leave
# the outcome unknown: the commit record may already be written.
_LOST_CLASSES = ("08", "57")


def commit_shards(
    connections: Sequence[tuple[ShardId, Connection]],
    *,
    on_commit: Callable[[ShardId, Connection], None] | None = None,
) -> None:
    """COMMIT each shard's transaction in the given order (calling ``on_commit`` after each
    success); at the first failure roll back the rest and raise
    :class:`~sqlalchemy_scale.PartialCommitError`."""
    committed: list[ShardId] = []
    for index, (shard_id, conn) in enumerate(connections):
        dbapi_connection = conn.connection.dbapi_connection
        assert dbapi_connection is not None
        try:
            dbapi_connection.commit()
        except Exception as exc:
            lost = connection_lost(exc)
            if lost:
                conn.invalidate(exc)
            rest = [s for s, _ in connections[index + 1 :]]
            for _, other in connections[index + 1 :]:
                _rollback(other)
            raise _partial(committed, shard_id, rest, exc, lost=lost) from exc
        committed.append(shard_id)
        log.debug("best-effort commit: shard %s committed", shard_id)
        if on_commit is not None:
            on_commit(shard_id, conn)


def _rollback(conn: Connection) -> None:
    dbapi_connection = conn.connection.dbapi_connection
    assert dbapi_connection is not None
    try:
        dbapi_connection.rollback()
    except Exception as exc:  # a lost connection rolls back on the server by itself
        conn.invalidate(exc)


def connection_lost(exc: BaseException) -> bool:
    """Whether a driver error at COMMIT says the connection, not the transaction, failed
    (the outcome is then unknown: the commit record may already be written)."""
    sqlstate = getattr(exc, "pgcode", None) or getattr(exc, "sqlstate", None)
    if sqlstate is None:
        return True  # no answer from the server: it may have committed
    return str(sqlstate)[:2] in _LOST_CLASSES


def describe(exc: BaseException) -> str:
    """A driver error on one line, secrets masked, at most 200 characters."""
    return mask_secrets(" ".join(str(exc).split()))[:200]


def _partial(
    committed: list[ShardId],
    shard_id: ShardId,
    rest: list[ShardId],
    exc: BaseException,
    *,
    lost: bool,
) -> PartialCommitError:
    what = (
        f"the connection to shard {shard_id!r} was lost during its COMMIT, so its writes may "
        "or may not have committed (read them back)"
        if lost
        else f"shard {shard_id!r} refused its COMMIT and rolled its writes back"
    )
    detail = describe(exc)
    message = (
        f"best-effort cross-shard commit stopped: shard(s) {committed} committed; {what}; "
        f"shard(s) {rest} were rolled back ({type(exc).__name__}: {detail})"
    )
    return PartialCommitError(
        message,
        committed=committed,
        failed=[] if lost else [shard_id],
        unknown=[shard_id] if lost else [],
        rolled_back=rest,
        orig=exc,
    )
