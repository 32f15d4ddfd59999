"""Routing you can watch: a listener per routing decision, and the reasons it is given.

Every statement a :class:`~sqlalchemy_scale.Router` routes (for a routing or a
sharded session) produces one
:class:`RoutingDecision`: the session, the node chosen, the reason (``"read"``,
``"flush"``, ``"use_primary block"``, ``"transaction has written"``,
``"fallback: no replica at 0/16B3748"``, ...) and the statement's kind as
:func:`~sqlalchemy_scale.decide_role` classified it. The same reason is in the
``sqlalchemy_scale.routing`` DEBUG log line (``[primary] default: fallback: ...``).

Listen with :meth:`ReplicaSet.on_decision <sqlalchemy_scale.ReplicaSet.on_decision>`;
a listener is any callable taking the decision (:class:`DecisionListener`)::

    @replica_set.on_decision
    def count(decision: ss.RoutingDecision) -> None:
        metrics[decision.node.name, decision.reason] += 1

Listeners run synchronously inside ``get_bind``, on the thread (or asyncio task) that
runs the statement, so they must be quick and must not use the session. An exception
in a listener is logged and swallowed: observing routing never changes it. With no
listener the cost is one attribute read and a truth test per statement.

When *not* to use it: for totals, :meth:`ReplicaSet.stats()
<sqlalchemy_scale.ReplicaSet.stats>` already counts statements, fallbacks, retries and
circuit-breaker openings per node; a listener is for per-statement detail (tracing,
labelled metrics, audits).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .consistency import format_lsn

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from .topology import Node, ReplicaSet

__all__ = ["DecisionListener", "RoutingDecision", "fallback_reason", "notify"]

log = logging.getLogger("sqlalchemy_scale.routing")


@dataclass(frozen=True, slots=True)
class RoutingDecision:
    """Where one statement was sent, and why.

    .. versionadded:: 0.1
    """

    #: The session that routed the statement (a RoutingSession or a ShardedSession).
    session: Session
    #: The replica set it was routed within (a shard's, for a sharded session).
    replica_set: ReplicaSet
    #: The node chosen: ``decision.node.name``, ``decision.node.role``.
    node: Node
    #: Why this node: the rule of ``RoutingSession.get_bind``'s precedence that decided.
    reason: str
    #: The statement's kind by :func:`~sqlalchemy_scale.decide_role` alone: ``"read"``,
    #: ``"write"``, ``"flush"``, ``"ddl"``, ``"locking read"``, ``"text"``, ...
    kind: str
    #: The statement (None during a flush).
    statement: Any


class DecisionListener(Protocol):
    """Called with each :class:`RoutingDecision`; a plain function satisfies it."""

    def __call__(self, decision: RoutingDecision, /) -> None: ...


def notify(listeners: Sequence[DecisionListener], decision: RoutingDecision) -> None:
    """Call every listener; one that raises is logged and the others still run."""
    for listener in listeners:
        try:
            listener(decision)
        except Exception:
            log.exception("routing decision listener %r failed; routing is unaffected", listener)


def fallback_reason(replica_set: ReplicaSet, position: int | None) -> str:
    """Why a read that wanted a replica is served by the primary."""
    if not replica_set.replicas:
        return "fallback: no replicas configured"
    if position is not None and replica_set.usable_replicas():
        return f"fallback: no replica at {format_lsn(position)}"
    return "fallback: no usable replica"
