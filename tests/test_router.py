"""Router: the routing precedence, one row per rule, checked without a server.

Each row builds the situation on a :class:`~sqlalchemy_scale.Router` over a ReplicaSet
that never connects (nothing is executed: ``decide()`` sends nothing, and ``record()``
of a primary decision or of a read with no replica at the token only counts), and
asserts the decision and its reason. Where statements really run is proven against
the servers in test_routing.py and test_sharding.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, func, insert, select, text, update
from sqlalchemy.schema import CreateTable

import sqlalchemy_scale as ss
from sqlalchemy_scale.consistency import format_lsn
from sqlalchemy_scale.router import Decision, pinned

t = Table("t", MetaData(), Column("id", Integer, primary_key=True), Column("v", Integer))

# Nothing listens on port 9: a connection attempt would fail the test.
PRIMARY = "postgresql+psycopg2://u:secret@127.0.0.1:9/db"
REPLICA = "postgresql+psycopg2://u:secret@127.0.0.1:9/replica"


@pytest.fixture
def replica_set() -> Iterator[ss.ReplicaSet]:
    """A ReplicaSet of one primary and one replica that is never connected to."""
    with ss.ReplicaSet(primary=PRIMARY, replicas=[REPLICA], monitor=False) as replica_set:
        yield replica_set


class Owner:
    """Stands for the session a router routes for (only its identity matters)."""


Setup = Callable[[ss.Router], None]


def _nothing(router: ss.Router) -> None:
    pass


def _written(router: ss.Router) -> None:
    router.record(router.decide(insert(t).values(id=1)))


def _connected(router: ss.Router) -> None:
    router.record_connection(router.replica_set.primary.engine)


# The precedence of Router.decide, rule by rule: (setup, statement, call options,
# default_role, expected (role, reason, kind, writes)).
PRECEDENCE: list[tuple[str, Setup, object, dict[str, bool] | None, ss.Role, Decision]] = [
    # 1. statement options
    (
        "1 use_primary option",
        _nothing,
        select(t).execution_options(use_primary=True),
        None,
        "replica",
        ("primary", "use_primary option", "read", False),
    ),
    (
        "1 use_primary call option",
        _nothing,
        select(t),
        {"use_primary": True},
        "replica",
        ("primary", "use_primary option", "read", False),
    ),
    (
        "1 use_replica beats has written",
        _written,
        select(t),
        {"use_replica": True},
        "replica",
        ("replica", "use_replica option", "read", False),
    ),
    (
        "1 use_replica beats default_role",
        _nothing,
        select(t).execution_options(use_replica=True),
        None,
        "primary",
        ("replica", "use_replica option", "read", False),
    ),
    (
        "1 call option beats statement option",
        _nothing,
        select(t).execution_options(use_replica=True),
        {"use_primary": True},
        "replica",
        ("primary", "use_primary option", "read", False),
    ),
    (
        "1 text marked use_replica only reads",
        _nothing,
        text("SELECT 1").execution_options(use_replica=True),
        None,
        "replica",
        ("replica", "use_replica option", "text", False),
    ),
    # 3. transaction has written (2, the block, is tested below: it needs a `with`)
    (
        "3 has written",
        _written,
        select(t),
        None,
        "replica",
        ("primary", "transaction has written", "read", False),
    ),
    (
        "3 connection() to the primary",
        _connected,
        select(t),
        None,
        "replica",
        ("primary", "transaction has written", "read", False),
    ),
    # 4. session default_role
    (
        "4 default_role primary",
        _nothing,
        select(t),
        None,
        "primary",
        ("primary", "session default_role", "read", False),
    ),
    # 6. statement kind
    ("6 read", _nothing, select(t), None, "replica", ("replica", "read", "read", False)),
    (
        "6 insert",
        _nothing,
        insert(t).values(id=1),
        None,
        "replica",
        ("primary", "write", "write", True),
    ),
    (
        "6 update",
        _nothing,
        update(t).values(v=1),
        None,
        "replica",
        ("primary", "write", "write", True),
    ),
    ("6 ddl", _nothing, CreateTable(t), None, "replica", ("primary", "ddl", "ddl", True)),
    (
        "6 for update",
        _nothing,
        select(t).with_for_update(),
        None,
        "replica",
        ("primary", "locking read", "locking read", True),
    ),
    ("6 text", _nothing, text("SELECT 1"), None, "replica", ("primary", "text", "text", True)),
    (
        "6 nextval",
        _nothing,
        select(func.nextval("s")),
        None,
        "replica",
        ("primary", "write", "write", True),
    ),
]


@pytest.mark.parametrize(
    ("setup", "statement", "call_options", "default_role", "expected"),
    [row[1:] for row in PRECEDENCE],
    ids=[row[0] for row in PRECEDENCE],
)
def test_each_rule_of_the_precedence_decides(
    replica_set: ss.ReplicaSet,
    setup: Setup,
    statement: object,
    call_options: dict[str, bool] | None,
    default_role: ss.Role,
    expected: Decision,
) -> None:
    """Each row of Router.decide's precedence list gives its role and reason."""
    router = ss.Router(replica_set, default_role=default_role, owner=Owner())
    setup(router)
    assert router.decide(statement, call_options=call_options) == expected  # type: ignore[arg-type]


def test_a_flush_is_a_write_whatever_the_options(replica_set: ss.ReplicaSet) -> None:
    """A flush goes to the primary and counts as a write; use_replica on it is refused."""
    router = ss.Router(replica_set)
    assert router.decide(None, flushing=True) == ("primary", "flush", "flush", True)
    with pytest.raises(ss.ReplicaWriteError, match="flush"):
        router.decide(None, flushing=True, call_options={"use_replica": True})


def test_use_replica_on_a_write_is_refused_naming_it(replica_set: ss.ReplicaSet) -> None:
    """use_replica=True on an INSERT raises ReplicaWriteError before anything is recorded."""
    router = ss.Router(replica_set)
    with pytest.raises(ss.ReplicaWriteError, match=r"\(write\)"):
        router.decide(insert(t).values(id=1).execution_options(use_replica=True))
    assert not router.has_written


@pytest.mark.parametrize("whose", ["this session", "every session"])
def test_2_a_use_primary_block_beats_has_not_written_and_default_role(
    replica_set: ss.ReplicaSet, whose: str
) -> None:
    """Inside the owner's (or the global) use_primary() block a read goes to the primary,
    and an option on the statement still wins."""
    owner = Owner()
    router = ss.Router(replica_set, owner=owner)
    with ss.use_primary(owner if whose == "this session" else None):
        assert router.decide(select(t)) == ("primary", "use_primary block", "read", False)
        assert router.decide(select(t), call_options={"use_replica": True})[:2] == (
            "replica",
            "use_replica option",
        )
    assert pinned() == ()
    assert router.decide(select(t)) == ("replica", "read", "read", False)


def test_another_sessions_block_does_not_pin_this_router(replica_set: ss.ReplicaSet) -> None:
    """A use_primary() block of one session leaves a router owned by another unpinned."""
    owner, other = Owner(), Owner()  # both alive: their ids differ
    router = ss.Router(replica_set, owner=owner)
    with ss.use_primary(other):
        assert router.decide(select(t)) == ("replica", "read", "read", False)


def test_5_a_causal_position_no_replica_has_reached_falls_back_to_the_primary(
    replica_set: ss.ReplicaSet,
) -> None:
    """A read under a causal token no replica is known to have replayed is recorded on the
    primary, with the token in the fallback reason, and the transaction's later reads too."""
    position = 0x16B3748
    replica_set.note_primary_position(position)  # the token is not ahead of the primary
    router = ss.Router(replica_set, causal_token=format_lsn(position))
    decision = router.decide(select(t))
    assert decision == ("replica", "read", "read", False)
    node = router.record(decision)
    assert node is replica_set.primary
    assert router.fallback_reason == f"fallback: no replica at {format_lsn(position)}"
    assert router.replica is replica_set.primary and not router.has_written


def test_end_transaction_forgets_the_write_and_the_replica(replica_set: ss.ReplicaSet) -> None:
    """After end_transaction() a read is decided as in a new transaction."""
    router = ss.Router(replica_set)
    _written(router)
    assert router.has_written and router.statements == 1
    router.end_transaction()
    assert not router.has_written and router.statements == 0 and router.last_node is None
    assert router.decide(select(t)) == ("replica", "read", "read", False)


def test_a_connection_to_a_replica_is_not_a_write(replica_set: ss.ReplicaSet) -> None:
    """record_connection() counts only a connection to the primary as a write."""
    router = ss.Router(replica_set)
    assert not router.record_connection(replica_set.replicas[0].engine)
    assert not router.has_written
    assert router.record_connection(replica_set.primary.engine)
    assert router.has_written


def test_sessions_and_shards_share_one_use_primary(replica_set: ss.ReplicaSet) -> None:
    """session.use_primary() of a routing and of a sharded session is the same class (which
    refuses generators), and a sharded session's block pins every shard's router."""
    shard_set = ss.ShardSet({"s0": PRIMARY, "s1": REPLICA}, strategy=ss.HashSharding())
    sharded = ss.ShardedSession(shard_set=shard_set)
    routing = ss.RoutingSession(replica_set=replica_set)
    try:
        assert type(sharded.use_primary()) is type(routing.use_primary()) is ss.use_primary
        with sharded.use_primary():
            for shard_id in shard_set.shard_ids:
                assert sharded.router(shard_id).decide(select(t))[1] == "use_primary block"
            assert routing.router.decide(select(t))[1] == "read"

        def gen() -> Iterator[int]:
            yield 1

        with pytest.raises(TypeError, match="generator"):
            sharded.use_primary()(gen)
    finally:
        sharded.close()
        routing.close()
        shard_set.dispose()


# Situations for route() beyond the precedence rows: (name, statement, call options,
# default_role, inside the owner's use_primary() block, causal position given).
ROUTE_CASES: list[tuple[str, object, dict[str, bool] | None, ss.Role, bool, bool]] = [
    ("plain read", select(t), None, "replica", False, False),
    ("plain read in a block", select(t), None, "replica", True, False),
    ("plain read with a token", select(t), None, "replica", False, True),
    (
        "use_primary=False option",
        select(t).execution_options(use_primary=False),
        None,
        "replica",
        False,
        False,
    ),
    (
        "unrelated option",
        select(t).execution_options(stream_results=True),
        None,
        "replica",
        False,
        False,
    ),
    ("empty call options", select(t), {}, "replica", False, False),
    ("union", select(t).union_all(select(t)), None, "replica", False, False),
    (
        "labelled advisory lock",
        select(func.pg_advisory_lock(1).label("l")),
        None,
        "replica",
        False,
        False,
    ),
]


@pytest.mark.parametrize(
    ("setup", "statement", "call_options", "default_role", "block", "token"),
    [(*row[1:5], False, False) for row in PRECEDENCE]
    + [(_nothing, *row[1:]) for row in ROUTE_CASES],
    ids=[row[0] for row in PRECEDENCE] + [row[0] for row in ROUTE_CASES],
)
def test_route_agrees_with_decide_then_record(
    replica_set: ss.ReplicaSet,
    setup: Setup,
    statement: object,
    call_options: dict[str, bool] | None,
    default_role: ss.Role,
    block: bool,
    token: bool,
) -> None:
    """route() (with its fast path for plain reads) picks the node, reason and state that
    record(decide()) does, in every situation of the precedence, twice in a transaction."""
    seen: list[tuple[str, str, str]] = []
    replica_set.on_decision(lambda d: seen.append((d.node.name, d.reason, d.kind)))
    position = 0x16B3748
    replica_set.note_primary_position(position)  # a token the primary has reached
    outcomes = []
    for way in ("route", "decide+record"):
        owner = Owner()
        router = ss.Router(
            replica_set,
            default_role=default_role,
            owner=owner,
            causal_token=format_lsn(position) if token else None,
        )
        setup(router)
        with contextlib.ExitStack() as stack:
            if block:
                stack.enter_context(ss.use_primary(owner))
            nodes = []
            for _ in range(2):  # the transaction's first statement, and a later one
                if way == "route":
                    nodes.append(router.route(statement, call_options=call_options))  # type: ignore[arg-type]
                else:
                    decision = router.decide(statement, call_options=call_options)  # type: ignore[arg-type]
                    nodes.append(router.record(decision))
        outcomes.append(
            (
                [node.name for node in nodes],
                router.has_written,
                router.statements,
                router.replica.name if router.replica is not None else None,
                router.fallback_reason,
                seen[:],
            )
        )
        seen.clear()
    assert outcomes[0] == outcomes[1]
