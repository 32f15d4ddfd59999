"""What a commit reports when a connection is lost around it, against real servers.

A connection is lost *during* COMMIT deterministically: a deferred constraint trigger
sleeps inside COMMIT (before the commit record: the transaction cannot have committed), or
a synchronous standby that does not exist holds COMMIT after the commit record is written
(the transaction has committed locally); another connection then terminates the backend
with ``pg_terminate_backend()``. The row is read back from the primary to tell which.

Replica connections are lost by terminating their backend the same way, after they served
a read of the transaction.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import Boolean, func, select, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import sqlalchemy_scale as ss
from sqlalchemy_scale.local import LocalCluster, PgNode
from sqlalchemy_scale.sharding import _two_phase
from sqlalchemy_scale.testing import wait_until

pytestmark = pytest.mark.fault

WHERE = select(func.inet_server_port(), func.pg_is_in_recovery())

_ids = itertools.count(1)


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "commit_outcome_items"

    id: Mapped[int] = mapped_column(primary_key=True)
    # Deferred constraint triggers act on these at COMMIT (see SCHEMA).
    slow: Mapped[bool] = mapped_column(Boolean, default=False)
    fail: Mapped[bool] = mapped_column(Boolean, default=False)


SCHEMA = """
DROP TABLE IF EXISTS commit_outcome_items;
CREATE TABLE commit_outcome_items (id int PRIMARY KEY, slow bool NOT NULL, fail bool NOT NULL);
CREATE OR REPLACE FUNCTION commit_outcome_check() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.slow THEN PERFORM pg_sleep(10); END IF;
  IF NEW.fail THEN RAISE EXCEPTION 'refused at commit' USING ERRCODE = '23514'; END IF;
  RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER commit_outcome_check AFTER INSERT ON commit_outcome_items
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION commit_outcome_check();
"""


def _install(node: PgNode) -> None:
    node.execute(SCHEMA)


def _rows(node: PgNode, row_id: int) -> int:
    return int(node.execute(f"SELECT count(*) FROM commit_outcome_items WHERE id = {row_id}")[0][0])


@pytest.fixture(scope="module")
def schema(scale_cluster: LocalCluster) -> Iterator[None]:
    """The items table and its deferred triggers on the shared primary, replicated."""
    _install(scale_cluster.primary)
    for replica in scale_cluster.replicas:
        replica.wait_for_replay()
    yield
    scale_cluster.primary.execute(
        "DROP TABLE IF EXISTS commit_outcome_items; DROP FUNCTION IF EXISTS commit_outcome_check()"
    )


def _hold_commits(primary: PgNode) -> None:
    """Make every COMMIT on ``primary`` wait, after its commit record, for a synchronous
    standby that does not exist ("nobody")."""
    primary.execute("ALTER SYSTEM SET synchronous_standby_names = 'nobody'")
    primary.execute("SELECT pg_reload_conf()")
    assert wait_until(
        lambda: primary.execute("SHOW synchronous_standby_names") == [("nobody",)], timeout=10
    )


def _terminate_when(node: PgNode, wait_event: str) -> threading.Thread:
    """A thread that terminates the backend found waiting on ``wait_event`` (within 10 s)."""

    def waiting() -> list[tuple[int]]:
        return [
            (int(pid),)
            for (pid,) in node.execute(
                f"SELECT pid FROM pg_stat_activity WHERE wait_event = '{wait_event}'"
            )
        ]

    def terminate() -> None:
        if wait_until(lambda: bool(waiting()), timeout=10):
            for (pid,) in waiting():
                node.execute(f"SELECT pg_terminate_backend({pid})")

    killer = threading.Thread(target=terminate, daemon=True)
    killer.start()
    return killer


@pytest.fixture(params=["direct", "pgbouncer"])
def primary_only(
    request: pytest.FixtureRequest, scale_cluster: LocalCluster, driver: str
) -> Iterator[ss.ReplicaSet]:
    """A ReplicaSet of the shared primary alone, reached directly or through the suite's
    PgBouncer in transaction pooling (with its pool preset)."""
    if request.param == "direct":
        replica_set = ss.ReplicaSet(primary=scale_cluster.primary.url(driver), monitor=False)
    else:
        bouncer = scale_cluster.pgbouncer
        if bouncer is None:
            pytest.fail("this test needs PgBouncer (--scale-pgbouncer transaction or session)")
        replica_set = ss.ReplicaSet(
            primary=bouncer.url(driver), pool="pgbouncer-transaction", monitor=False
        )
    yield replica_set
    replica_set.dispose()


@pytest.mark.usefixtures("schema")
def test_add_and_commit_lost_before_the_commit_record_is_outcome_unknown(
    scale_cluster: LocalCluster, primary_only: ss.ReplicaSet
) -> None:
    """session.add() + commit() whose connection is lost inside COMMIT (before the commit
    record) raises CommitOutcomeUnknown naming the primary, and the row is not there."""
    Session = ss.routing_sessionmaker(primary_only)
    row_id = next(_ids)
    killer = _terminate_when(scale_cluster.primary, "PgSleep")
    with Session() as session:
        session.add(Item(id=row_id, slow=True, fail=False))
        with pytest.raises(ss.CommitOutcomeUnknown) as caught:
            session.commit()
    killer.join(15)
    print(f"\nCommitOutcomeUnknown: {caught.value}")
    assert caught.value.node == "primary"
    assert scale_cluster.password not in str(caught.value)
    assert isinstance(caught.value, OperationalError)
    assert _rows(scale_cluster.primary, row_id) == 0


@pytest.mark.usefixtures("schema")
def test_a_commit_refused_by_the_server_is_reported_as_failed(
    scale_cluster: LocalCluster, primary_only: ss.ReplicaSet
) -> None:
    """A COMMIT the server refuses (a deferred constraint) raises the server's error, not
    CommitOutcomeUnknown, nothing is committed, and the session's next commit works."""
    Session = ss.routing_sessionmaker(primary_only)
    refused, accepted = next(_ids), next(_ids)
    with Session() as session:
        session.add(Item(id=refused, slow=False, fail=True))
        with pytest.raises(IntegrityError) as caught:
            session.commit()
        session.rollback()
        session.add(Item(id=accepted, slow=False, fail=False))
        session.commit()
        token = session.causal_token
    assert not isinstance(caught.value, ss.CommitOutcomeUnknown)
    assert "refused at commit" in str(caught.value)
    assert (_rows(scale_cluster.primary, refused), _rows(scale_cluster.primary, accepted)) == (0, 1)
    assert token is not None


@pytest.mark.parametrize("via", ["direct", "pgbouncer"])
def test_add_and_commit_lost_after_the_commit_record_is_outcome_unknown(
    scale_cluster_factory: Callable[..., LocalCluster], driver: str, via: str
) -> None:
    """session.add() + commit() whose connection is lost while COMMIT waits for a synchronous
    standby (the commit record is written) raises CommitOutcomeUnknown, and the row is there:
    the same exception for both outcomes, since the application cannot tell them apart."""
    cluster = scale_cluster_factory(
        replicas=0, shards=0, pgbouncer="transaction" if via == "pgbouncer" else False
    )
    primary = cluster.primary
    _install(primary)
    _hold_commits(primary)
    if cluster.pgbouncer is not None:
        target = {"primary": cluster.pgbouncer.url(driver), "pool": "pgbouncer-transaction"}
    else:
        target = {"primary": primary.url(driver)}
    with ss.ReplicaSet(**target, monitor=False) as replica_set:
        Session = ss.routing_sessionmaker(replica_set)
        row_id = next(_ids)
        killer = _terminate_when(primary, "SyncRep")
        with Session() as session:
            session.add(Item(id=row_id, slow=False, fail=False))
            with pytest.raises(ss.CommitOutcomeUnknown) as caught:
                session.commit()
        killer.join(15)
    print(f"\nCommitOutcomeUnknown: {caught.value}")
    assert caught.value.node == "primary"
    assert cluster.password not in str(caught.value)
    assert _rows(primary, row_id) == 1


def _terminate_backend_of(session: ss.RoutingSession, cluster: LocalCluster) -> PgNode:
    """Terminate the replica backend serving ``session``'s transaction; return its node."""
    port, pid = session.execute(
        select(func.inet_server_port(), func.pg_backend_pid()).where(func.pg_is_in_recovery())
    ).one()
    node = next(r for r in cluster.replicas if r.port == port)
    node.execute(f"SELECT pg_terminate_backend({int(pid)})")
    assert wait_until(
        lambda: (
            node.execute(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {int(pid)}") == [(0,)]
        ),
        timeout=10,
    )
    return node


@pytest.mark.usefixtures("schema")
def test_a_lost_replica_connection_does_not_decide_the_commit(
    scale_cluster: LocalCluster, replicas: ss.ReplicaSet
) -> None:
    """A transaction that read from a replica, lost that replica connection, then added a row
    and committed: commit() succeeds and the row is committed, in every round."""
    Session = ss.routing_sessionmaker(replicas)
    rounds, errors, committed = 12, [], 0
    for _ in range(rounds):
        row_id = next(_ids)
        try:
            with Session() as session:
                _terminate_backend_of(session, scale_cluster)
                session.add(Item(id=row_id, slow=False, fail=False))
                session.commit()
                assert session.causal_token is not None
        except OperationalError as exc:
            errors.append(type(exc).__name__)
        committed += _rows(scale_cluster.primary, row_id)
    print(f"\nrounds: {rounds}, committed: {committed}, errors: {errors}")
    assert errors == []
    assert committed == rounds


def test_a_read_only_session_closes_quietly_after_losing_its_replica(
    scale_cluster: LocalCluster, replicas: ss.ReplicaSet, caplog: pytest.LogCaptureFixture
) -> None:
    """A session that only read, whose replica backend was then terminated, raises nothing
    when the `with` block ends, on rollback(), or on commit(), and logs why."""
    Session = ss.routing_sessionmaker(replicas)
    with Session() as session:  # ends by close()
        _terminate_backend_of(session, scale_cluster)
    with Session() as session:
        _terminate_backend_of(session, scale_cluster)
        session.rollback()
        assert session.execute(WHERE).one()[1] is True  # the next transaction reads again
    with Session() as session:
        _terminate_backend_of(session, scale_cluster)
        session.commit()
    with Session.begin() as session:
        _terminate_backend_of(session, scale_cluster)
    failures = [r for r in caplog.records if "read-only transaction" in r.getMessage()]
    print(f"\nlogged: {[r.getMessage() for r in failures]}")
    assert len(failures) == 4
    assert all(scale_cluster.password not in r.getMessage() for r in failures)


@pytest.mark.usefixtures("schema")
def test_savepoints_roll_back_with_a_replica_in_the_transaction(
    scale_cluster: LocalCluster, replicas: ss.ReplicaSet
) -> None:
    """A transaction that read on a replica, then wrote under a savepoint, rolls back (the
    savepoint and then the whole transaction) and commits as before: nothing stays written."""
    Session = ss.routing_sessionmaker(replicas)
    kept, undone = next(_ids), next(_ids)
    with Session() as session:
        assert session.execute(WHERE).one()[1] is True  # a replica's read
        with session.begin_nested():
            session.add(Item(id=kept, slow=False, fail=False))
        savepoint = session.begin_nested()
        session.add(Item(id=undone, slow=False, fail=False))
        session.flush()
        savepoint.rollback()
        session.commit()
    with Session() as session:
        session.execute(WHERE)
        with session.begin_nested():
            session.add(Item(id=next(_ids), slow=False, fail=False))
        session.rollback()
    assert (_rows(scale_cluster.primary, kept), _rows(scale_cluster.primary, undone)) == (1, 0)


def test_a_replica_reached_through_connection_stays_one_connection(
    replicas: ss.ReplicaSet,
) -> None:
    """A transaction that first reached a replica through session.connection() with a
    statement, then read through execute(), uses one replica connection: same backend."""
    Session = ss.routing_sessionmaker(replicas)
    with Session() as session:
        conn = session.connection(bind_arguments={"clause": WHERE})
        first = conn.execute(select(func.pg_backend_pid(), func.pg_is_in_recovery())).one()
        second = session.execute(select(func.pg_backend_pid(), func.pg_is_in_recovery())).one()
        session.commit()
    assert first == second
    assert first[1] is True


def test_a_read_after_an_unknown_commit_outcome_sees_the_commit(
    scale_cluster_factory: Callable[..., LocalCluster], driver: str
) -> None:
    """After CommitOutcomeUnknown (connection lost while COMMIT waited for a synchronous
    standby, the commit record written), the session's read-back to reconcile runs on the
    primary and finds the row, not on its replica that has not replayed it (paused)."""
    cluster = scale_cluster_factory(replicas=1, shards=0, pgbouncer=False)
    primary, replica = cluster.primary, cluster.replicas[0]
    _install(primary)
    replica.wait_for_replay()
    replica.pause_replay()
    _hold_commits(primary)
    with ss.ReplicaSet(
        primary=primary.url(driver), replicas=[replica.url(driver)], max_lag_seconds=None
    ) as replica_set:
        row_id = next(_ids)
        killer = _terminate_when(primary, "SyncRep")
        with ss.routing_sessionmaker(replica_set)() as session:
            session.add(Item(id=row_id, slow=False, fail=False))
            with pytest.raises(ss.CommitOutcomeUnknown):
                session.commit()
            killer.join(15)
            session.rollback()
            port, found = session.execute(
                select(func.inet_server_port(), func.count(Item.id)).where(Item.id == row_id)
            ).one()
    assert (port, found) == (primary.port, 1)


def test_a_shard_read_after_an_unknown_commit_outcome_sees_the_commit(
    scale_cluster_factory: Callable[..., LocalCluster], driver: str
) -> None:
    """The same for a ShardedSession: after CommitOutcomeUnknown on its one written shard,
    its read-back of that shard runs on the shard's primary and finds the row, not on the
    shard's paused replica."""
    cluster = scale_cluster_factory(replicas=1, shards=0, pgbouncer=False)
    primary, replica = cluster.primary, cluster.replicas[0]
    _install(primary)
    replica.wait_for_replay()
    replica.pause_replay()
    _hold_commits(primary)
    shard = ss.ReplicaSet(
        primary=primary.url(driver), replicas=[replica.url(driver)], max_lag_seconds=None
    )
    with ss.ShardSet({"a": shard}, strategy=ss.RangeSharding([0, 1_000_000])) as shard_set:
        row_id = next(_ids)
        killer = _terminate_when(primary, "SyncRep")
        with ss.sharded_sessionmaker(shard_set)() as session:
            session.execute(
                text("INSERT INTO commit_outcome_items VALUES (:id, false, false)"),
                {"id": row_id},
                bind_arguments={"shard_id": "a"},
            )
            with pytest.raises(ss.CommitOutcomeUnknown):
                session.commit()
            killer.join(15)
            session.rollback()
            port, found = session.execute(
                select(func.inet_server_port(), func.count(Item.id)).where(Item.id == row_id),
                bind_arguments={"shard_id": "a"},
            ).one()
    assert (port, found) == (primary.port, 1)


def test_a_commit_whose_position_query_fails_is_reported_as_committed(
    scale_cluster_factory: Callable[..., LocalCluster], driver: str
) -> None:
    """A COMMIT that succeeds while the WAL position query after it fails (its role lost
    EXECUTE on pg_current_wal_insert_lsn() after the connection's first commit; psycopg 3
    sends the two in one message) is reported as committed, and the session's read-back
    runs on the primary and finds the row, not on its replica that has not replayed it."""
    cluster = scale_cluster_factory(replicas=1, shards=0, pgbouncer=False)
    primary, replica = cluster.primary, cluster.replicas[0]
    _install(primary)
    primary_url, replica_url = _app_role_urls(cluster, driver)
    replica.wait_for_replay()
    replica.pause_replay()
    with ss.ReplicaSet(primary=primary_url, replicas=[replica_url], monitor=False) as replica_set:
        first, second = next(_ids), next(_ids)
        with ss.routing_sessionmaker(replica_set)() as session:
            session.add(Item(id=first, slow=False, fail=False))
            session.commit()  # the connection's first commit reads the position after it
            _revoke_position_query(primary)
            session.add(Item(id=second, slow=False, fail=False))
            session.commit()
            port, found = session.execute(
                select(func.inet_server_port(), func.count(Item.id)).where(Item.id == second)
            ).one()
    assert _rows(primary, second) == 1
    assert (port, found) == (primary.port, 1)


_APP_ROLE = "commit_outcome_app"


def _app_role_urls(cluster: LocalCluster, driver: str) -> tuple[str, str]:
    """URLs of the primary and the first replica for a role that may read and add items but
    is not a superuser (a superuser has every privilege, so none can be taken from it)."""
    password = cluster.password.replace("'", "''")
    cluster.primary.execute(f"CREATE ROLE {_APP_ROLE} LOGIN PASSWORD '{password}'")
    cluster.primary.execute(f"GRANT SELECT, INSERT ON commit_outcome_items TO {_APP_ROLE}")
    primary_url, replica_url = (
        node.sa_url(driver).set(username=_APP_ROLE).render_as_string(hide_password=False)
        for node in (cluster.primary, cluster.replicas[0])
    )
    return primary_url, replica_url


def _revoke_position_query(primary: PgNode) -> None:
    """Take EXECUTE on pg_current_wal_insert_lsn() (the position query) from every role but
    superusers."""
    primary.execute("REVOKE EXECUTE ON FUNCTION pg_current_wal_insert_lsn() FROM PUBLIC")


def _two_shards(
    cluster: LocalCluster, driver: str, mode: ss.CrossShardWrites, *, app_role: bool = False
) -> ss.ShardSet:
    """Shard a on the cluster's shard server (no replica), shard b on its primary and
    replica (as the app role if ``app_role``), both holding the items table and the replica
    paused."""
    a, b, b_replica = cluster.shards[0], cluster.primary, cluster.replicas[0]
    for node in (a, b):
        _install(node)
    b_urls = _app_role_urls(cluster, driver) if app_role else (b.url(driver), b_replica.url(driver))
    b_replica.wait_for_replay()
    b_replica.pause_replay()
    return ss.ShardSet(
        {
            "a": a.url(driver),
            "b": ss.ReplicaSet(
                primary=b_urls[0], replicas=[b_urls[1]], monitor=False, max_lag_seconds=None
            ),
        },
        strategy=ss.RangeSharding([0, 1_000_000, 2_000_000]),
        cross_shard_writes=mode,
    )


def _insert_on(session: ss.ShardedSession, shard_id: str) -> int:
    row_id = next(_ids)
    session.execute(
        text("INSERT INTO commit_outcome_items VALUES (:id, false, false)"),
        {"id": row_id},
        bind_arguments={"shard_id": shard_id},
    )
    return row_id


def _read_back(session: ss.ShardedSession, shard_id: str, row_id: int) -> tuple[int, int]:
    """Where a read of ``row_id`` on ``shard_id`` ran, and whether it found the row (0 or 1)."""
    port, found = session.execute(
        select(func.inet_server_port(), func.count(Item.id)).where(Item.id == row_id),
        bind_arguments={"shard_id": shard_id},
    ).one()
    return int(port), int(found)


def test_a_best_effort_read_after_a_shard_commit_outcome_unknown_sees_the_commit(
    scale_cluster_factory: Callable[..., LocalCluster], driver: str
) -> None:
    """After a best-effort commit of shards a and b stopped with PartialCommitError because
    b's connection was lost during COMMIT (after its commit record: outcome unknown), the
    session's read-back of b runs on b's primary and finds the row, not on b's replica that
    has not replayed it (paused)."""
    cluster = scale_cluster_factory(replicas=1, shards=1, pgbouncer=False)
    primary = cluster.primary
    with _two_shards(cluster, driver, "best_effort") as shard_set:
        _hold_commits(primary)
        killer = _terminate_when(primary, "SyncRep")
        with ss.sharded_sessionmaker(shard_set)() as session:
            _insert_on(session, "a")
            on_b = _insert_on(session, "b")
            with pytest.raises(ss.PartialCommitError) as caught:
                session.commit()
            killer.join(15)
            session.rollback()
            where = _read_back(session, "b", on_b)
    assert (caught.value.committed, caught.value.unknown) == (["a"], ["b"])
    assert where == (primary.port, 1)


def test_a_two_phase_read_after_commit_prepared_outcome_unknown_sees_the_commit(
    scale_cluster_factory: Callable[..., LocalCluster], driver: str
) -> None:
    """After a two-phase commit of shards a and b raised CommitOutcomeUnknown because b's
    connection was lost during COMMIT PREPARED (after its commit record), the session's
    read-back of b runs on b's primary and finds the row, not on b's paused replica."""
    cluster = scale_cluster_factory(replicas=1, shards=1, pgbouncer=False)
    primary = cluster.primary
    killers: list[threading.Thread] = []

    def at_step(step: str) -> None:
        if step == "decided":  # every part is prepared: only COMMIT PREPARED waits now
            _hold_commits(primary)
            killers.append(_terminate_when(primary, "SyncRep"))

    with _two_shards(cluster, driver, "two_phase") as shard_set:
        _two_phase._step_hook = at_step
        try:
            with ss.sharded_sessionmaker(shard_set)() as session:
                _insert_on(session, "a")
                on_b = _insert_on(session, "b")
                with pytest.raises(ss.CommitOutcomeUnknown) as caught:
                    session.commit()
                for killer in killers:
                    killer.join(15)
                session.rollback()
                where = _read_back(session, "b", on_b)
        finally:
            _two_phase._step_hook = None
    assert caught.value.shard == "b"
    assert where == (primary.port, 1)


def test_a_shard_commit_whose_position_query_fails_is_reported_as_committed(
    scale_cluster_factory: Callable[..., LocalCluster], driver: str
) -> None:
    """A best-effort commit of shards a and b whose COMMIT on b succeeds while the position
    query after it fails (b's role lost EXECUTE on pg_current_wal_insert_lsn() after the
    connection's first commit) commits, with no PartialCommitError, and the session's
    read-back of b runs on b's primary and finds the row, not on b's paused replica."""
    cluster = scale_cluster_factory(replicas=1, shards=1, pgbouncer=False)
    primary = cluster.primary
    shard_set = _two_shards(cluster, driver, "best_effort", app_role=True)
    with shard_set, ss.sharded_sessionmaker(shard_set)() as session:
        _insert_on(session, "b")
        session.commit()  # the connection's first commit reads the position after it
        _revoke_position_query(primary)
        on_a, on_b = _insert_on(session, "a"), _insert_on(session, "b")
        session.commit()
        where = _read_back(session, "b", on_b)
    assert (_rows(cluster.shards[0], on_a), _rows(primary, on_b)) == (1, 1)
    assert where == (primary.port, 1)
