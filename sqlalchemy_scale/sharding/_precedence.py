"""The shard precedence: which shards a statement runs on, and the rule that decided.

:func:`choose_shards` is the one place the shard precedence is applied (the numbered list
in its docstring, mirrored in :meth:`ShardedSession.get_bind
<sqlalchemy_scale.ShardedSession.get_bind>`). It is pure: its inputs are what the caller
already knows about the statement (the explicit shard id, the owner of a ``shard_key=``
value, an instance's or inserted rows' shard, the shards the planner narrowed the
statement to), so ``tests/test_shard_precedence.py`` checks every rule and every conflict
between rules without a server.

When two explicit placements disagree (a shard id and a ``shard_key=`` owned by another
shard, a ``shard_key=`` and the rows' own keys, a ``shard_key=`` and a WHERE that names
another shard's keys) the statement is refused before anything runs: picking either would
answer a question the application did not ask. An explicit shard id does win over WHERE
pruning: it says "look only there", which is also how misplaced rows are found and repaired.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from ..errors import ShardKeyError
from .strategies import ShardId

__all__ = ["NOT_GIVEN", "ShardChoice", "ShardRuleName", "choose_shards"]

#: The rule of the precedence that decided (see :func:`choose_shards`).
ShardRuleName = Literal["shard id", "shard_key", "instance", "statement", "fan-out"]


class _NotGiven:
    def __repr__(self) -> str:
        return "NOT_GIVEN"


#: ``key_owner`` when no ``shard_key=`` was given (None means: given, and no shard owns it).
NOT_GIVEN: Final[Any] = _NotGiven()


@dataclass(frozen=True)
class ShardChoice:
    """The shards a statement runs on, in ShardSet order, and the rule that chose them."""

    shards: tuple[ShardId, ...]
    rule: ShardRuleName


def choose_shards(
    all_shards: Sequence[ShardId],
    *,
    explicit: ShardId | None = None,
    key_owner: ShardId | _NotGiven | None = NOT_GIVEN,
    shard_key: Any = None,
    instance: ShardId | None = None,
    planned: Sequence[ShardId] | None = None,
) -> ShardChoice:
    """The shards a statement runs on. The first rule that applies decides:

    1. explicit shard id (``explicit``): ``set_shard_id(...)``, ``Query.set_shard()``,
       ``execution_options(shard_id=...)``, ``bind_arguments={"shard_id": ...}``;
    2. ``shard_key=v`` (``key_owner``: the shard owning ``v`` for the statement's sharded
       table; None when no shard owns it, so a read finds nothing);
    3. instance (``instance``): an object being flushed, or the rows of an INSERT, go to the
       shard of their own shard key;
    4. statement (``planned``, narrower than every shard): WHERE pruning (``==``/``IN`` on
       the shard key), a global table read on the home shard, a pinned table's shard;
    5. fan-out: every shard (``planned`` is every shard, or None: not narrowed).

    Conflicts, refused with :class:`~sqlalchemy_scale.ShardKeyError` (nothing runs): an
    explicit shard id with a ``shard_key=`` or an instance placed elsewhere; a ``shard_key=``
    with an instance placed elsewhere, or with a statement narrowed to other shards. An
    explicit shard id wins over the statement's own narrowing (it means "only there").
    ``shard_key`` is the value given, for the error message.
    """
    key_given = not isinstance(key_owner, _NotGiven)
    owner = None if isinstance(key_owner, _NotGiven) else key_owner
    if explicit is not None:
        if key_given and owner != explicit:
            raise _conflict(
                f"shard_id={explicit!r} and shard_key={shard_key!r}, whose rows are on "
                f"{_where(owner)}"
            )
        if instance is not None and instance != explicit:
            raise _conflict(
                f"shard_id={explicit!r} for rows whose own shard key places them on {instance!r}"
            )
        return ShardChoice((explicit,), "shard id")
    if key_given:
        if instance is not None and instance != owner:
            raise _conflict(
                f"shard_key={shard_key!r} (on {_where(owner)}) for rows whose own shard "
                f"key places them on {instance!r}"
            )
        if (
            owner is not None
            and planned is not None
            and planned
            and len(planned) < len(all_shards)
            and owner not in planned
        ):
            raise _conflict(
                f"shard_key={shard_key!r} places the statement on {owner!r}, but its WHERE "
                f"selects rows of shard(s) {list(planned)} only"
            )
        return ShardChoice((owner,) if owner is not None else (), "shard_key")
    if instance is not None:
        return ShardChoice((instance,), "instance")
    if planned is not None and len(planned) < len(all_shards):
        return ShardChoice(tuple(planned), "statement")
    return ShardChoice(tuple(all_shards if planned is None else planned), "fan-out")


def _where(owner: ShardId | None) -> str:
    return repr(owner) if owner is not None else "no shard"


def _conflict(what: str) -> ShardKeyError:
    return ShardKeyError(
        f"the statement names two placements that disagree: {what}; nothing was run. "
        "Give one of them (or make them agree)"
    )
