"""Global tables (``__shard__ = "all"``): a copy on every shard, kept equal by the session.

Rows flushed to the home shard (or the shard the object was loaded from) are copied to
every other shard in the same session transaction (an upsert, or a delete) and commit with
it. The copies are not counted as writes of their shards by the cross-shard write rules
(a global table would otherwise be writable only with two-phase commit). Reads go to the
home shard.

When *not* to use it: data that changes often (every write is a write to every shard).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, cast

from sqlalchemy import event, inspect
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session
from sqlalchemy.orm.state import InstanceState

if TYPE_CHECKING:
    from .session import ShardedSession

__all__ = ["GLOBAL_COPY", "install"]

#: bind_arguments key: the connection copies a global table's rows (not a write the
#: cross-shard rules count twice; see :func:`copy_to_other_shards`).
GLOBAL_COPY: Final = "_sqlalchemy_scale_global_copy"


def install(session_class: type[ShardedSession]) -> None:
    """Copy the global rows each flush of a ``session_class`` session writes."""
    event.listen(session_class, "after_flush", _replicate_global_rows)


def _replicate_global_rows(any_session: Session, flush_context: Any) -> None:
    session = cast("ShardedSession", any_session)  # listened for on that class only
    if session.has_user_choosers:
        return
    written = [(obj, False) for obj in session.new] + [
        (obj, False) for obj in session.dirty if session.is_modified(obj)
    ]
    written += [(obj, True) for obj in session.deleted]
    for obj, deleted in written:
        state = inspect(obj)
        if session.rule_for_mapper(state.mapper)[0] != "all":
            continue
        copy_to_other_shards(session, state, deleted=deleted)


def copy_to_other_shards(
    session: ShardedSession, state: InstanceState[Any], *, deleted: bool
) -> None:
    """Upsert (or delete) a global row's copy on every shard but the one it was flushed to."""
    mapper = state.mapper
    table: Any = mapper.local_table
    home = state.identity_token or session.shard_set.home_shard
    values: dict[str, Any] = {}
    for prop in mapper.column_attrs:
        for column in prop.columns:
            if getattr(column, "table", None) is table and prop.key in state.dict:
                values[column.name] = state.dict[prop.key]
    pk = [c.name for c in table.primary_key.columns]
    for shard_id in session.shard_set.shard_ids:
        if shard_id == home:
            continue
        conn = session.connection(
            bind_arguments={"shard_id": shard_id, "mapper": mapper, GLOBAL_COPY: True}
        )
        if deleted:
            criteria = [table.c[name] == values[name] for name in pk]
            conn.execute(table.delete().where(*criteria))
            continue
        stmt = pg_insert(table).values(values)
        updates = {name: stmt.excluded[name] for name in values if name not in pk}
        stmt = (
            stmt.on_conflict_do_update(index_elements=pk, set_=updates)
            if updates
            else stmt.on_conflict_do_nothing(index_elements=pk)
        )
        conn.execute(stmt)
