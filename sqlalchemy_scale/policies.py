"""Replica policies: which usable replica serves the next read.

A policy is anything callable as ``policy(replicas) -> node``: a one-method
:class:`ReplicaPolicy` protocol, so a plain function is a valid policy. It is
only ever called with a non-empty sequence of replicas that are currently
usable; choosing what is usable is :mod:`sqlalchemy_scale.health`'s job.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from .topology import Node

__all__ = ["LeastBusy", "PolicyName", "Random", "ReplicaPolicy", "RoundRobin", "make_policy"]

PolicyName = Literal["round_robin", "random", "least_busy"]


class ReplicaPolicy(Protocol):
    """Choose one node among usable replicas (never called with an empty sequence)."""

    def __call__(self, replicas: Sequence[Node], /) -> Node: ...


class RoundRobin:
    """Each read goes to the next replica in turn (the default).

    ``next()`` on an :func:`itertools.count` is atomic under CPython, so the
    counter is safe to share between threads without a lock.
    """

    def __init__(self) -> None:
        self._counter = itertools.count()

    def __call__(self, replicas: Sequence[Node], /) -> Node:
        return replicas[next(self._counter) % len(replicas)]

    def __repr__(self) -> str:
        return "RoundRobin()"


class Random:
    """Each read goes to a replica chosen uniformly at random."""

    def __init__(self, seed: int | None = None) -> None:
        self._random = random.Random(seed)

    def __call__(self, replicas: Sequence[Node], /) -> Node:
        return self._random.choice(replicas)

    def __repr__(self) -> str:
        return "Random()"


class LeastBusy:
    """Each read goes to the replica whose pool has the fewest checked-out connections.

    Ties go round-robin, so an idle set of replicas still shares the load.
    """

    def __init__(self) -> None:
        self._tiebreak = RoundRobin()

    def __call__(self, replicas: Sequence[Node], /) -> Node:
        busy = [node.checked_out() for node in replicas]
        least = min(busy)
        candidates = [node for node, n in zip(replicas, busy, strict=True) if n == least]
        return candidates[0] if len(candidates) == 1 else self._tiebreak(candidates)

    def __repr__(self) -> str:
        return "LeastBusy()"


_BY_NAME: dict[str, type[RoundRobin] | type[Random] | type[LeastBusy]] = {
    "round_robin": RoundRobin,
    "random": Random,
    "least_busy": LeastBusy,
}


def make_policy(policy: ReplicaPolicy | PolicyName | str) -> ReplicaPolicy:
    """Return a policy object for a policy or one of the names ``round_robin``, ``random``,
    ``least_busy``."""
    from .errors import ConfigurationError

    if isinstance(policy, str):
        try:
            return _BY_NAME[policy.replace("-", "_")]()
        except KeyError:
            raise ConfigurationError(
                f"unknown replica policy {policy!r}; expected one of {sorted(_BY_NAME)} "
                "or a callable taking the usable replicas and returning one"
            ) from None
    if not callable(policy):
        raise ConfigurationError(f"replica policy must be callable, got {policy!r}")
    return policy
