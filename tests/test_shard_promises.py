"""Inside every shard, a ShardedSession keeps the routing session's promises, on real servers.

The ShardSet here has three shards: ``a`` is a shard server with its streaming replica,
``b`` is the suite's primary with its two replicas, ``c`` a shard server alone. Where each
statement ran is asked of the server (``inet_server_port()``, ``pg_is_in_recovery()``);
lag is made deterministic by pausing WAL replay (the ``paused`` fixture).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import Boolean, func, insert, select, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import sqlalchemy_scale as ss
from sqlalchemy_scale.consistency import format_lsn, parse_token
from sqlalchemy_scale.local import LocalCluster, PgNode
from sqlalchemy_scale.sharding import _two_phase
from sqlalchemy_scale.testing import wait_until

_ids = itertools.count(1)

# Shard key ranges: a [0, 100), b [100, 200), c [200, 300).
KEY_A, KEY_B, KEY_C = 1, 150, 250


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "promise_notes"
    __shard_key__ = "k"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    k: Mapped[int]
    # Deferred constraint triggers act on these at COMMIT (see SCHEMA).
    slow: Mapped[bool] = mapped_column(Boolean, default=False)
    fail: Mapped[bool] = mapped_column(Boolean, default=False)


SCHEMA = """
DROP TABLE IF EXISTS promise_notes;
CREATE TABLE promise_notes (id int PRIMARY KEY, k int NOT NULL, slow bool NOT NULL,
  fail bool NOT NULL);
CREATE OR REPLACE FUNCTION promise_notes_check() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.slow THEN PERFORM pg_sleep(10); END IF;
  IF NEW.fail THEN RAISE EXCEPTION 'refused at commit' USING ERRCODE = '23514'; END IF;
  RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER promise_notes_check AFTER INSERT ON promise_notes
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION promise_notes_check();
"""
DROP = "DROP TABLE IF EXISTS promise_notes; DROP FUNCTION IF EXISTS promise_notes_check()"


@dataclass
class Nodes:
    """The servers behind shards a, b and c."""

    a: PgNode
    a_replica: PgNode
    b: PgNode
    b_replicas: list[PgNode]
    c: PgNode

    @property
    def replicas(self) -> list[PgNode]:
        return [self.a_replica, *self.b_replicas]

    def rows(self, node: PgNode, row_id: int) -> int:
        return int(node.execute(f"SELECT count(*) FROM promise_notes WHERE id = {row_id}")[0][0])


@pytest.fixture(scope="module")
def nodes(scale_cluster: LocalCluster) -> Iterator[Nodes]:
    """The three shards' servers, each primary holding the notes table (replicated)."""
    a_replicas = scale_cluster.shard_replicas.get(0, [])
    if not a_replicas or len(scale_cluster.replicas) < 2 or len(scale_cluster.shards) < 2:
        pytest.fail("these tests need shard 0 with a replica, 2 replicas and 2 shard servers")
    found = Nodes(
        a=scale_cluster.shards[0],
        a_replica=a_replicas[0],
        b=scale_cluster.primary,
        b_replicas=list(scale_cluster.replicas[:2]),
        c=scale_cluster.shards[1],
    )
    for primary in (found.a, found.b, found.c):
        primary.execute(SCHEMA)
    for replica in found.replicas:
        replica.wait_for_replay()
    yield found
    for primary in (found.a, found.b, found.c):
        primary.execute(DROP)


@pytest.fixture
def make_shards(nodes: Nodes, driver: str) -> Iterator[Callable[..., ss.ShardSet]]:
    """make(cross_shard_writes=..., **replica_set_kwargs): a ShardSet over shards a, b, c
    (a and b ReplicaSets with the given options), disposed after the test."""
    made: list[ss.ShardSet] = []

    def make(cross_shard_writes: ss.CrossShardWrites = "refuse", **kw: Any) -> ss.ShardSet:
        options: dict[str, Any] = {"monitor_interval": 0.05, "max_wait": 0.2, **kw}
        shard_set = ss.ShardSet(
            {
                "a": ss.ReplicaSet(
                    primary=nodes.a.url(driver),
                    replicas=[nodes.a_replica.url(driver)],
                    name="a",
                    **options,
                ),
                "b": ss.ReplicaSet(
                    primary=nodes.b.url(driver),
                    replicas=[r.url(driver) for r in nodes.b_replicas],
                    name="b",
                    **options,
                ),
                "c": nodes.c.url(driver),
            },
            strategy=ss.RangeSharding([0, 100, 200, 300]),
            cross_shard_writes=cross_shard_writes,
        )
        made.append(shard_set)
        return shard_set

    yield make
    for shard_set in made:
        shard_set.dispose()


def _read(session: Session, key: int, row_id: int) -> tuple[int, bool, int]:
    """Where a read of shard ``key``'s row ran, and whether it found the row (0 or 1)."""
    port, in_recovery, found = session.execute(
        select(func.inet_server_port(), func.pg_is_in_recovery(), func.count(Note.id)).where(
            Note.k == key, Note.id == row_id
        )
    ).one()
    return int(port), bool(in_recovery), int(found)


def _add(session: Session, key: int, **kw: Any) -> int:
    row_id = next(_ids)
    session.add(Note(id=row_id, k=key, slow=False, fail=False, **kw))
    return row_id


# -- causal tokens across shards ---------------------------------------------------------------


def test_a_token_sends_reads_of_the_written_shard_to_its_primary(
    nodes: Nodes, make_shards: Callable[..., ss.ShardSet], paused: Callable[[PgNode], None]
) -> None:
    """After a write on shard a (its replica paused), a session given the token reads a's
    row from a's primary; without the token the replica answers without the row; a shard
    not written still reads from a replica; once replay resumes a's replica serves it."""
    shard_set = make_shards(max_lag_seconds=None)
    Session = ss.sharded_sessionmaker(shard_set)
    paused(nodes.a_replica)
    with Session() as session:
        row_id = _add(session, KEY_A)
        session.commit()
        token = session.causal_token
    assert token is not None and set(parse_token(token)) == {"a"}
    with Session() as session:
        assert _read(session, KEY_A, row_id) == (nodes.a_replica.port, True, 0)
    with Session(causal_token=token) as session:
        assert _read(session, KEY_A, row_id) == (nodes.a.port, False, 1)
        port, in_recovery, _ = _read(session, KEY_B, row_id)
        assert port in {r.port for r in nodes.b_replicas} and in_recovery
        assert session.causal_token == token  # reads add nothing to it
    nodes.a_replica.resume_replay()
    # The token is the insert position after the commit: WAL other backends inserted before
    # it reaches replicas with the next flush, which a commit with an xid makes.
    nodes.a.execute("SELECT pg_current_xact_id()")
    position = parse_token(token)["a"]
    nodes.a_replica.wait_for_replay(format_lsn(position))
    node = shard_set.replica_set("a").replicas[0]
    # Routing acts on what the monitor has seen: wait for its probe of the resumed replica.
    assert wait_until(
        lambda: not node.replay_stalled and (node.replay_lsn or 0) >= position, timeout=10
    )
    with ss.sharded_sessionmaker(shard_set, causal_token=token)() as session:
        assert _read(session, KEY_A, row_id) == (nodes.a_replica.port, True, 1)


def test_a_two_phase_commit_token_covers_both_shards(
    nodes: Nodes, make_shards: Callable[..., ss.ShardSet], paused: Callable[[PgNode], None]
) -> None:
    """A two-phase commit on shards a and b (every replica paused) gives one token with both
    shards' positions after COMMIT PREPARED: reads of both rows with it go to each shard's
    primary and find them."""
    shard_set = make_shards("two_phase", max_lag_seconds=None)
    Session = ss.sharded_sessionmaker(shard_set)
    for replica in nodes.replicas:
        paused(replica)
    with Session() as session:
        on_a, on_b = _add(session, KEY_A), _add(session, KEY_B)
        session.commit()
        assert session.written_shards == []
        token = session.causal_token
    assert token is not None and set(parse_token(token)) == {"a", "b"}
    with Session() as session:  # without the token: replicas that have not replayed it
        assert _read(session, KEY_A, on_a)[1:] == (True, 0)
        assert _read(session, KEY_B, on_b)[1:] == (True, 0)
    with Session(causal_token=token) as session:
        assert _read(session, KEY_A, on_a) == (nodes.a.port, False, 1)
        assert _read(session, KEY_B, on_b) == (nodes.b.port, False, 1)


def test_sharded_and_routing_sessions_share_one_causal_context(
    nodes: Nodes,
    make_shards: Callable[..., ss.ShardSet],
    driver: str,
    paused: Callable[[PgNode], None],
) -> None:
    """Inside ss.causal_context(), a sharded session's commit on shard a and a routing
    session's commit land in one token, and later sessions of either kind in the block read
    what was written from the primaries, while their replicas are paused."""
    shard_set = make_shards(max_lag_seconds=None)
    Session = ss.sharded_sessionmaker(shard_set)
    for replica in nodes.replicas:
        paused(replica)
    with ss.ReplicaSet(
        primary=nodes.b.url(driver),
        replicas=[r.url(driver) for r in nodes.b_replicas],
        max_wait=0.2,
        max_lag_seconds=None,
    ) as replica_set:
        Routing = ss.routing_sessionmaker(replica_set)
        with ss.causal_context() as ctx:
            with Session() as session:
                on_a = _add(session, KEY_A)
                session.commit()
            with Routing() as routing:
                on_main = next(_ids)
                routing.execute(
                    text("INSERT INTO promise_notes VALUES (:id, :k, false, false)"),
                    {"id": on_main, "k": KEY_B},
                )
                routing.commit()
            assert ctx.token is not None and set(parse_token(ctx.token)) == {None, "a"}
            with Session() as session:
                assert _read(session, KEY_A, on_a) == (nodes.a.port, False, 1)
            with Routing() as routing:
                where = select(func.inet_server_port(), func.pg_is_in_recovery())
                assert routing.execute(where).one() == (nodes.b.port, False)
        with Session() as session:  # outside the block: nothing steers a's reads
            assert _read(session, KEY_A, on_a) == (nodes.a_replica.port, True, 0)


@pytest.mark.parametrize("async_driver", ["asyncpg", "psycopg_async"])
def test_an_async_sharded_session_hands_out_and_honours_the_token(
    nodes: Nodes, async_driver: str, paused: Callable[[PgNode], None]
) -> None:
    """AsyncShardedSession.causal_token covers the shard written, and an async session
    given it reads that shard's row from its primary (the replica is paused)."""
    paused(nodes.a_replica)

    async def main() -> tuple[str | None, tuple[Any, ...], tuple[Any, ...]]:
        shard_set = ss.ShardSet(
            {
                "a": ss.ReplicaSet(
                    primary=nodes.a.url(async_driver),
                    replicas=[nodes.a_replica.url(async_driver)],
                    name="a",
                    max_wait=0.2,
                    max_lag_seconds=None,
                ),
                "c": nodes.c.url(async_driver),
            },
            strategy=ss.RangeSharding([0, 200, 300]),
        )
        try:
            Session = ss.async_sharded_sessionmaker(shard_set)
            row_id = next(_ids)
            async with Session() as session:
                session.add(Note(id=row_id, k=KEY_A, slow=False, fail=False))
                await session.commit()
                token = session.causal_token
            where = select(
                func.inet_server_port(), func.pg_is_in_recovery(), func.count(Note.id)
            ).where(Note.k == KEY_A, Note.id == row_id)
            async with Session() as session:
                without = tuple((await session.execute(where)).one())
            async with ss.async_sharded_sessionmaker(shard_set, causal_token=token)() as session:
                given = tuple((await session.execute(where)).one())
            return token, without, given
        finally:
            await shard_set.adispose()

    token, without, given = asyncio.run(main())
    assert token is not None and set(parse_token(token)) == {"a"}
    assert without == (nodes.a_replica.port, True, 0)
    assert given == (nodes.a.port, False, 1)


# -- lag and health rotation inside a shard ------------------------------------------------


def test_a_lagging_shard_replica_leaves_the_rotation_and_comes_back(
    nodes: Nodes, make_shards: Callable[..., ss.ShardSet], paused: Callable[[PgNode], None]
) -> None:
    """Shard a's replica, paused until it is more than max_lag_bytes behind, leaves the
    rotation (a's reads go to a's primary); resumed, it returns and serves a's reads."""
    shard_set = make_shards(max_lag_bytes=64 * 1024, max_lag_seconds=None)
    Session = ss.sharded_sessionmaker(shard_set)
    node = shard_set.replica_set("a").replicas[0]
    with Session() as session:
        assert _read(session, KEY_A, 0)[:2] == (nodes.a_replica.port, True)
    paused(nodes.a_replica)
    nodes.a.execute(
        "INSERT INTO promise_notes SELECT 1000000 + i, 1, false, false "
        "FROM generate_series(1, 2000) AS i; DELETE FROM promise_notes WHERE id > 1000000"
    )
    left = wait_until(lambda: not node.is_usable, timeout=10)
    with Session() as session:
        while_behind = _read(session, KEY_A, 0)[:2]
    nodes.a_replica.resume_replay()
    nodes.a_replica.wait_for_replay()
    back = wait_until(lambda: node.is_usable, timeout=10)
    with Session() as session:
        after = _read(session, KEY_A, 0)[:2]
    print(f"\nleft rotation: {left}, read while behind: {while_behind}, back: {back}")
    assert left and back
    assert while_behind == (nodes.a.port, False)
    assert after == (nodes.a_replica.port, True)


def test_a_killed_shard_replica_leaves_the_rotation_and_rejoins(
    nodes: Nodes,
    make_shards: Callable[..., ss.ShardSet],
    scale_restart: Callable[[PgNode], None],
) -> None:
    """Shard a's replica killed: every read of a is answered (by a's primary, none fails)
    and the replica is out of the rotation; started again, the monitor lets it back in and
    it serves a's reads."""
    shard_set = make_shards()
    Session = ss.sharded_sessionmaker(shard_set)
    node = shard_set.replica_set("a").replicas[0]
    scale_restart(nodes.a_replica)
    with Session() as session:
        assert _read(session, KEY_A, 0)[:2] == (nodes.a_replica.port, True)
    nodes.a_replica.kill()
    while_down = []
    for _ in range(10):
        with Session() as session:
            while_down.append(_read(session, KEY_A, 0)[:2])
    out = not node.is_usable
    nodes.a_replica.start()
    back = wait_until(lambda: node.is_usable, timeout=30)
    with Session() as session:
        after = _read(session, KEY_A, 0)[:2]
    print(f"\nreads while down: {sorted(set(while_down))}, out: {out}, back: {back}")
    assert set(while_down) == {(nodes.a.port, False)}
    assert out and back
    assert after == (nodes.a_replica.port, True)


# -- a shard's replica failing a read ------------------------------------------------------------


def _backend_of_first_read(session: Session, key: int) -> tuple[int, int]:
    """(port, backend pid) of the transaction's first read on shard ``key``."""
    port, pid = session.execute(
        select(func.inet_server_port(), func.pg_backend_pid(), func.count(Note.id)).where(
            Note.k == key
        )
    ).one()[:2]
    return int(port), int(pid)


def _terminate(node: PgNode, pid: int) -> None:
    node.execute(f"SELECT pg_terminate_backend({pid})")
    assert wait_until(
        lambda: node.execute(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}") == [(0,)],
        timeout=10,
    )


def _seeded(nodes: Nodes, shard_set: ss.ShardSet, keys: list[int]) -> list[int]:
    """One committed row per key, replayed on every replica; their ids."""
    row_ids = []
    for key in keys:  # one transaction per shard
        with ss.sharded_sessionmaker(shard_set)() as session:
            row_ids.append(_add(session, key))
            session.commit()
    for replica in nodes.replicas:
        replica.wait_for_replay()
    return row_ids


def test_a_failed_first_read_in_a_shard_is_retried_on_another_node(
    nodes: Nodes, make_shards: Callable[..., ss.ShardSet]
) -> None:
    """When the connection to shard a's replica is lost, the next transaction's first read
    on a is retried once on a's primary and finds the row; the replica leaves the rotation."""
    shard_set = make_shards(monitor=False)
    (row_id,) = _seeded(nodes, shard_set, [KEY_A])
    Session = ss.sharded_sessionmaker(shard_set)
    with Session() as session:
        port, pid = _backend_of_first_read(session, KEY_A)
    assert port == nodes.a_replica.port
    _terminate(nodes.a_replica, pid)  # the pooled connection the next read gets is dead
    with Session() as session:
        assert _read(session, KEY_A, row_id) == (nodes.a.port, False, 1)
    node = shard_set.replica_set("a").replicas[0]
    assert not node.is_usable


def test_a_shard_replica_lost_mid_transaction_raises_naming_shard_and_node(
    nodes: Nodes, make_shards: Callable[..., ss.ShardSet]
) -> None:
    """A shard replica lost after the transaction's first read makes the next read raise
    NodeUnavailableError naming the shard and the node, rather than switching snapshots."""
    shard_set = make_shards(monitor=False)
    (row_id,) = _seeded(nodes, shard_set, [KEY_A])
    Session = ss.sharded_sessionmaker(shard_set)
    with Session() as session:
        port, pid = _backend_of_first_read(session, KEY_A)
        assert port == nodes.a_replica.port
        _terminate(nodes.a_replica, pid)
        with pytest.raises(ss.NodeUnavailableError) as caught:
            _read(session, KEY_A, row_id)
        session.rollback()
        assert _read(session, KEY_A, row_id) == (nodes.a.port, False, 1)  # next one is fine
    node = shard_set.replica_set("a").replicas[0]
    print(f"\nNodeUnavailableError: {caught.value}")
    assert (caught.value.shard, caught.value.node) == ("a", node.name)
    assert "shard 'a'" in str(caught.value) and repr(node.name) in str(caught.value)


def test_a_shard_replica_failing_a_concurrent_fan_out_is_retried(
    nodes: Nodes, make_shards: Callable[..., ss.ShardSet]
) -> None:
    """A fan-out over shards a, b and c that begins a transaction, whose connection to a's
    replica is lost, is retried once: the merged rows are right, a's from a's primary."""
    shard_set = make_shards(monitor=False)
    row_ids = _seeded(nodes, shard_set, [KEY_A, KEY_B, KEY_C])
    Session = ss.sharded_sessionmaker(shard_set)
    with Session() as session:
        port, pid = _backend_of_first_read(session, KEY_A)
    assert port == nodes.a_replica.port
    _terminate(nodes.a_replica, pid)
    with Session() as session:
        rows = session.execute(
            select(Note.id, Note.k, func.inet_server_port(), func.pg_is_in_recovery())
            .where(Note.id.in_(row_ids))
            .order_by(Note.id)
        ).all()
    assert [(r[0], r[1]) for r in rows] == list(zip(row_ids, [KEY_A, KEY_B, KEY_C], strict=True))
    served = {r[1]: (int(r[2]), bool(r[3])) for r in rows}
    assert served[KEY_A] == (nodes.a.port, False)
    assert served[KEY_B][0] in {r.port for r in nodes.b_replicas} and served[KEY_B][1]
    assert served[KEY_C] == (nodes.c.port, False)


def test_a_lost_shard_replica_connection_does_not_decide_the_commit(
    nodes: Nodes, make_shards: Callable[..., ss.ShardSet], caplog: pytest.LogCaptureFixture
) -> None:
    """A transaction that read from shard a's replica, lost that connection, then wrote to a
    and committed: commit() succeeds and the row is there; a session that only read and lost
    its replica connection commits quietly. Both failures are logged."""
    Session = ss.sharded_sessionmaker(make_shards(monitor=False))
    with Session() as session:
        port, pid = _backend_of_first_read(session, KEY_A)
        assert port == nodes.a_replica.port
        _terminate(nodes.a_replica, pid)
        row_id = _add(session, KEY_A)
        session.commit()
        assert session.causal_token is not None
    with Session() as session:
        port, pid = _backend_of_first_read(session, KEY_B)
        node = next(r for r in nodes.b_replicas if r.port == port)
        _terminate(node, pid)
        session.commit()
    logged = [r.getMessage() for r in caplog.records if "read-only transaction" in r.getMessage()]
    print(f"\nlogged: {logged}")
    assert nodes.rows(nodes.a, row_id) == 1
    assert len(logged) == 2


def test_a_fan_out_with_a_shard_replica_server_down_is_answered(
    nodes: Nodes,
    make_shards: Callable[..., ss.ShardSet],
    scale_restart: Callable[[PgNode], None],
) -> None:
    """With shard a's replica server stopped, a new ShardSet's first statement, a fan-out
    over a, b and c, returns the right rows (a's from a's primary) and raises nothing."""
    shard_set = make_shards(monitor=False)
    row_ids = _seeded(nodes, shard_set, [KEY_A, KEY_B, KEY_C])
    scale_restart(nodes.a_replica)
    nodes.a_replica.kill()
    fresh = make_shards(monitor=False)
    with ss.sharded_sessionmaker(fresh)() as session:
        rows = session.execute(
            select(Note.id, Note.k, func.inet_server_port())
            .where(Note.id.in_(row_ids))
            .order_by(Note.id)
        ).all()
    assert [(r[0], r[1]) for r in rows] == list(zip(row_ids, [KEY_A, KEY_B, KEY_C], strict=True))
    assert rows[0][2] == nodes.a.port
    assert not fresh.replica_set("a").replicas[0].is_usable


# -- commit outcome inside shards --------------------------------------------------------------


def _terminate_when(node: PgNode, wait_event: str) -> threading.Thread:
    """A thread that terminates the backend found waiting on ``wait_event`` (within 10 s)."""

    def waiting() -> list[int]:
        return [
            int(pid)
            for (pid,) in node.execute(
                f"SELECT pid FROM pg_stat_activity WHERE wait_event = '{wait_event}'"
            )
        ]

    def terminate() -> None:
        if wait_until(lambda: bool(waiting()), timeout=10):
            for pid in waiting():
                node.execute(f"SELECT pg_terminate_backend({pid})")

    killer = threading.Thread(target=terminate, daemon=True)
    killer.start()
    return killer


def test_a_connection_lost_during_a_shards_commit_is_outcome_unknown(
    nodes: Nodes, make_shards: Callable[..., ss.ShardSet], scale_cluster: LocalCluster
) -> None:
    """A one-shard commit whose connection is lost inside COMMIT raises CommitOutcomeUnknown
    naming the shard and its node (the row is not there: it was lost before the commit
    record); a COMMIT the server refuses raises its own error, not CommitOutcomeUnknown."""
    Session = ss.sharded_sessionmaker(make_shards())
    killer = _terminate_when(nodes.c, "PgSleep")
    with Session() as session:
        row_id = next(_ids)
        session.add(Note(id=row_id, k=KEY_C, slow=True, fail=False))
        with pytest.raises(ss.CommitOutcomeUnknown) as caught:
            session.commit()
    killer.join(15)
    print(f"\nCommitOutcomeUnknown: {caught.value}")
    assert (caught.value.shard, caught.value.node) == ("c", "primary")
    assert "shard 'c'" in str(caught.value)
    assert scale_cluster.password not in str(caught.value)
    assert nodes.rows(nodes.c, row_id) == 0
    with Session() as session:
        refused = next(_ids)
        session.add(Note(id=refused, k=KEY_C, slow=False, fail=True))
        with pytest.raises(IntegrityError) as failed:
            session.commit()
        session.rollback()
        accepted = _add(session, KEY_C)
        session.commit()
    assert not isinstance(failed.value, ss.CommitOutcomeUnknown)
    assert "refused at commit" in str(failed.value)
    assert (nodes.rows(nodes.c, refused), nodes.rows(nodes.c, accepted)) == (0, 1)


def test_a_connection_lost_before_the_commit_is_a_plain_failure(
    nodes: Nodes, make_shards: Callable[..., ss.ShardSet]
) -> None:
    """A shard primary's connection lost before COMMIT (the flush inside commit() fails)
    raises the driver's error, not CommitOutcomeUnknown, and nothing is committed."""
    Session = ss.sharded_sessionmaker(make_shards())
    with Session() as session:
        pid = session.execute(
            select(func.pg_backend_pid(), func.count(Note.id)).where(Note.k == KEY_C)
        ).one()[0]
        _terminate(nodes.c, int(pid))
        row_id = _add(session, KEY_C)
        with pytest.raises(OperationalError) as caught:
            session.commit()
    print(f"\nlost before COMMIT: {type(caught.value).__name__}")
    assert not isinstance(caught.value, ss.CommitOutcomeUnknown)
    assert nodes.rows(nodes.c, row_id) == 0


def test_best_effort_names_the_shard_whose_commit_was_lost(
    nodes: Nodes, make_shards: Callable[..., ss.ShardSet]
) -> None:
    """A best-effort commit of shards a and c whose connection to c is lost during c's
    COMMIT raises PartialCommitError: a committed, c unknown (listed as such), and a's row
    is there."""
    Session = ss.sharded_sessionmaker(make_shards("best_effort"))
    killer = _terminate_when(nodes.c, "PgSleep")
    with Session() as session:
        on_a = _add(session, KEY_A)
        on_c = next(_ids)
        session.add(Note(id=on_c, k=KEY_C, slow=True, fail=False))
        with pytest.raises(ss.PartialCommitError) as caught:
            session.commit()
        session.rollback()
    killer.join(15)
    print(f"\nPartialCommitError: {caught.value}")
    assert (caught.value.committed, caught.value.unknown, caught.value.failed) == (["a"], ["c"], [])
    assert "shard 'c'" in str(caught.value)
    assert (nodes.rows(nodes.a, on_a), nodes.rows(nodes.c, on_c)) == (1, 0)


@pytest.fixture
def synchronous_nobody(nodes: Nodes) -> Iterator[Callable[[], None]]:
    """hold() makes every COMMIT on shard c's server wait for a synchronous standby that does
    not exist (after its commit record); the setting is reset after the test."""

    def hold() -> None:
        nodes.c.execute("ALTER SYSTEM SET synchronous_standby_names = 'nobody'")
        nodes.c.execute("SELECT pg_reload_conf()")
        assert wait_until(
            lambda: nodes.c.execute("SHOW synchronous_standby_names") == [("nobody",)], timeout=10
        )

    yield hold
    nodes.c.execute("ALTER SYSTEM RESET synchronous_standby_names")
    nodes.c.execute("SELECT pg_reload_conf()")
    assert wait_until(
        lambda: nodes.c.execute("SHOW synchronous_standby_names") == [("",)], timeout=10
    )


def test_a_connection_lost_during_commit_prepared_is_outcome_unknown(
    nodes: Nodes,
    make_shards: Callable[..., ss.ShardSet],
    synchronous_nobody: Callable[[], None],
) -> None:
    """A two-phase commit of shards a and c whose connection to c is lost during COMMIT
    PREPARED (it waits for a synchronous standby after its commit record) raises
    CommitOutcomeUnknown naming shard c (a prepared part's node is named by its shard, on
    the shard's primary); both rows are committed."""
    shard_set = make_shards("two_phase")
    Session = ss.sharded_sessionmaker(shard_set)
    killers: list[threading.Thread] = []

    def at_step(step: str) -> None:
        if step == "decided":  # every part is prepared: only COMMIT PREPARED waits now
            synchronous_nobody()
            killers.append(_terminate_when(nodes.c, "SyncRep"))

    _two_phase._step_hook = at_step
    try:
        with Session() as session:
            on_a, on_c = _add(session, KEY_A), _add(session, KEY_C)
            with pytest.raises(ss.CommitOutcomeUnknown) as caught:
                session.commit()
            session.rollback()
    finally:
        _two_phase._step_hook = None
    for killer in killers:
        killer.join(15)
    print(f"\nCommitOutcomeUnknown: {caught.value}")
    assert (caught.value.shard, caught.value.node) == ("c", "c")
    assert "prepared but not yet committed on 'c'" in str(caught.value)
    assert (nodes.rows(nodes.a, on_a), nodes.rows(nodes.c, on_c)) == (1, 1)


# -- the shard precedence, on real shards ---------------------------------------------------------


def test_placements_that_disagree_are_refused_on_real_shards(
    nodes: Nodes, make_shards: Callable[..., ss.ShardSet]
) -> None:
    """shard_id='c' with a shard_key owned by shard a, or a shard_key of a with a WHERE naming
    b's key, raises ShardKeyError; an explicit shard id with a WHERE naming another shard's key
    runs on the shard named (asked of the server)."""
    Session = ss.sharded_sessionmaker(make_shards())
    with Session() as session:
        with pytest.raises(ss.ShardKeyError, match="disagree"):
            session.execute(select(Note).execution_options(shard_id="c", shard_key=KEY_A))
        with pytest.raises(ss.ShardKeyError, match="disagree"):
            session.execute(select(Note).where(Note.k == KEY_B).execution_options(shard_key=KEY_A))
        port, found = session.execute(
            select(func.inet_server_port(), func.count(Note.id))
            .where(Note.k == KEY_A)
            .execution_options(shard_id="c")
        ).one()
    assert (port, found) == (nodes.c.port, 0)


def test_a_malformed_token_is_refused_when_the_session_is_made(
    make_shards: Callable[..., ss.ShardSet],
) -> None:
    """A causal token that is not scope=LSN pairs raises ConfigurationError at construction,
    before any statement."""
    with pytest.raises(ss.ConfigurationError, match="not a causal token"):
        ss.sharded_sessionmaker(make_shards(), causal_token="a=0/1&a=0/2")()


def test_get_bind_of_a_write_outside_a_transaction_leaves_the_next_transaction_alone(
    nodes: Nodes, make_shards: Callable[..., ss.ShardSet]
) -> None:
    """session.get_bind(clause=insert(...), shard_id="a") outside any transaction names a's
    primary but notes nothing: the next transaction reads a from its replica and may write
    to shard c without a cross-shard refusal (the routing session's rule, inside shards)."""
    shard_set = make_shards(max_lag_seconds=None)
    with ss.sharded_sessionmaker(shard_set)() as session:
        engine = session.get_bind(
            clause=insert(Note).values(id=0, k=KEY_A, slow=False, fail=False), shard_id="a"
        )
        with engine.connect() as conn:
            assert conn.execute(select(func.inet_server_port())).scalar_one() == nodes.a.port
        assert not session.router("a").has_written and not session.shard_writes.shards
        assert _read(session, KEY_A, 0)[:2] == (nodes.a_replica.port, True)
        row_id = _add(session, KEY_C)
        session.commit()
    assert nodes.rows(nodes.c, row_id) == 1


def test_a_process_mode_shard_commit_token_is_its_own_commits_position(
    nodes: Nodes, make_shards: Callable[..., ss.ShardSet], paused: Callable[[PgNode], None]
) -> None:
    """In "process" mode, the second of two commits on shard b over one pooled connection
    gives a token at its own commit, not at the position the first commit left with the
    process tracker: a session of another ShardSet given the token (b's replicas paused
    after replaying the first commit) reads the second row from b's primary."""
    shard_set = make_shards(
        max_lag_seconds=None, read_your_writes="process", pool_size=1, max_overflow=0
    )
    Session = ss.sharded_sessionmaker(shard_set)
    with Session() as session:
        _add(session, KEY_B)
        session.commit()
    for replica in nodes.b_replicas:
        replica.wait_for_replay()
        paused(replica)
    with Session() as session:
        row_id = _add(session, KEY_B)
        session.commit()
        token = session.causal_token
    with ss.sharded_sessionmaker(make_shards(max_lag_seconds=None), causal_token=token)() as other:
        assert _read(other, KEY_B, row_id) == (nodes.b.port, False, 1)


def test_a_two_phase_commit_token_is_not_an_earlier_commits_position(
    nodes: Nodes, make_shards: Callable[..., ss.ShardSet], paused: Callable[[PgNode], None]
) -> None:
    """A two-phase commit's token for shard b is read after its COMMIT PREPARED, not taken
    from the pooled connection that sends it, where an earlier read-only transaction's
    COMMIT left a position (psycopg 3): a session given the token (every replica paused
    after replaying that earlier commit) reads b's row from b's primary."""
    shard_set = make_shards("two_phase", max_lag_seconds=None, pool_size=2, max_overflow=0)
    Session = ss.sharded_sessionmaker(shard_set)
    with Session() as session, session.use_primary():
        assert _read(session, KEY_B, 0)[:2] == (nodes.b.port, False)
        session.commit()  # read-only: the position read with its COMMIT stays untaken
    nodes.b.execute("SELECT pg_current_xact_id()")  # a later commit: replicas replay past it
    for replica in nodes.replicas:
        replica.wait_for_replay()
        paused(replica)
    # Hold that connection while the session opens another to b, then give it back: the
    # COMMIT PREPARED on b goes out on it.
    held = shard_set.replica_set("b").primary.engine.connect()
    held.exec_driver_sql("SELECT 1")
    with Session() as session:
        _add(session, KEY_A)
        on_b = _add(session, KEY_B)
        session.flush()
        held.close()
        session.commit()
        token = session.causal_token
    with ss.sharded_sessionmaker(make_shards(max_lag_seconds=None), causal_token=token)() as other:
        assert _read(other, KEY_B, on_b) == (nodes.b.port, False, 1)


def test_a_write_through_an_explicit_shard_primary_bind_is_a_shard_write(
    nodes: Nodes, make_shards: Callable[..., ss.ShardSet], paused: Callable[[PgNode], None]
) -> None:
    """A ShardedSession's INSERT sent with ``bind_arguments={"bind": shard b's primary
    engine}`` counts as a write to b: the next read of b in that transaction and the first
    after its commit run on b's primary and find the row (b's replicas paused), and the
    session's token covers b."""
    shard_set = make_shards(max_lag_seconds=None)
    for replica in nodes.b_replicas:
        paused(replica)
    with ss.sharded_sessionmaker(shard_set)() as session:
        row_id = next(_ids)
        session.execute(
            insert(Note).values(id=row_id, k=KEY_B, slow=False, fail=False),
            bind_arguments={"bind": shard_set.replica_set("b").primary.engine},
        )
        inside = _read(session, KEY_B, row_id)
        session.commit()
        token = session.causal_token
        after = _read(session, KEY_B, row_id)
    assert (inside, after) == ((nodes.b.port, False, 1),) * 2
    assert token is not None and "b" in parse_token(token)


def test_a_second_shard_written_through_an_explicit_bind_is_refused(
    nodes: Nodes, make_shards: Callable[..., ss.ShardSet]
) -> None:
    """With cross_shard_writes="refuse", an INSERT sent to shard b's primary through
    ``bind_arguments={"bind": ...}`` after a write to shard a raises CrossShardWriteError
    before it is sent, and neither row is committed."""
    shard_set = make_shards("refuse")
    with ss.sharded_sessionmaker(shard_set)() as session:
        on_a = _add(session, KEY_A)
        session.flush()
        on_b = next(_ids)
        with pytest.raises(ss.CrossShardWriteError):
            session.execute(
                insert(Note).values(id=on_b, k=KEY_B, slow=False, fail=False),
                bind_arguments={"bind": shard_set.replica_set("b").primary.engine},
            )
        session.rollback()
    assert (nodes.rows(nodes.a, on_a), nodes.rows(nodes.b, on_b)) == (0, 0)
