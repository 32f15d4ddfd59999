"""RoutingSession against a real primary and two streaming replicas.

Every test proves where a statement ran by asking the server: the ORM model
carries ``inet_server_port()`` / ``pg_is_in_recovery()`` as column properties
(so every ORM load reports the server that answered it) and a server default
``inet_server_port()`` (so every INSERT records the server that executed it).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import (
    Column,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    column,
    create_engine,
    delete,
    func,
    insert,
    select,
    table,
    text,
    update,
)
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    column_property,
    mapped_column,
    sessionmaker,
)
from sqlalchemy.orm import Session as PlainSession
from sqlalchemy.schema import CreateTable, DropTable

import sqlalchemy_scale as ss
from sqlalchemy_scale.local import LocalCluster


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "routing_users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    written_on: Mapped[int] = mapped_column(server_default=text("inet_server_port()"))
    read_on: Mapped[int] = column_property(func.inet_server_port())
    read_in_recovery: Mapped[bool] = column_property(func.pg_is_in_recovery())


# Created and dropped by the DDL test itself, so not part of Base.metadata.
notes = Table("routing_notes", MetaData(), Column("id", Integer, primary_key=True))


WHERE = select(func.inet_server_port(), func.pg_is_in_recovery())


@pytest.fixture(scope="module")
def cluster(scale_cluster: LocalCluster) -> Iterator[LocalCluster]:
    """The shared topology with this module's tables created on the primary and replicated."""
    engine = create_engine(scale_cluster.primary.url())
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(User), [{"id": i, "name": f"user{i}"} for i in range(1, 6)])
    engine.dispose()
    _caught_up(scale_cluster)
    yield scale_cluster
    engine = create_engine(scale_cluster.primary.url())
    Base.metadata.drop_all(engine)
    engine.dispose()


def _caught_up(cluster: LocalCluster) -> None:
    for replica in cluster.replicas:
        replica.wait_for_replay()


@pytest.fixture
def replicas(cluster: LocalCluster, driver: str) -> Iterator[ss.ReplicaSet]:
    """A ReplicaSet over the real primary and both replicas, with fresh counters."""
    replica_set = ss.ReplicaSet(
        primary=cluster.primary.url(driver), replicas=[r.url(driver) for r in cluster.replicas]
    )
    yield replica_set
    replica_set.dispose()


@pytest.fixture
def Session(replicas: ss.ReplicaSet) -> sessionmaker[ss.RoutingSession]:
    return ss.routing_sessionmaker(replicas, expire_on_commit=False)


def ports(cluster: LocalCluster) -> tuple[int, set[int]]:
    return cluster.primary.port, {r.port for r in cluster.replicas}


def test_routing_sessionmaker_makes_sessions_as_sessionmaker_does(
    cluster: LocalCluster, replicas: ss.ReplicaSet
) -> None:
    """routing_sessionmaker() builds its sessions without RoutingSession.__init__'s second
    pass over Session's keywords; each one is configured exactly as SQLAlchemy's own
    sessionmaker(class_=RoutingSession, ...) configures it: with the factory's keywords, the
    call's (info merged), and configure()'s; a bad replica_set or default_role is refused when
    the factory is made or configured, and a session still reads from a replica."""
    token = "0/10"
    ours = ss.routing_sessionmaker(
        replicas, expire_on_commit=False, autoflush=False, info={"a": 1}, causal_token=token
    )
    theirs = sessionmaker(
        class_=ss.RoutingSession,
        replica_set=replicas,
        expire_on_commit=False,
        autoflush=False,
        info={"a": 1},
        causal_token=token,
    )

    def looks(session: ss.RoutingSession) -> tuple[object, ...]:
        return (
            type(session).__mro__[1],
            session.replica_set,
            session.default_role,
            session.causal_token,
            session.expire_on_commit,
            session.autoflush,
            dict(session.info),
            session.bind,
        )

    for call in ({}, {"info": {"b": 2}}, {"default_role": "primary", "causal_token": "0/20"}):
        with ours(**call) as mine, theirs(**call) as sqlalchemys:
            assert looks(mine) == looks(sqlalchemys)
    ours.configure(default_role="primary")
    theirs.configure(default_role="primary")
    with ours() as mine, theirs() as sqlalchemys:
        assert looks(mine) == looks(sqlalchemys)
        assert mine.default_role == "primary"
    with pytest.raises(ss.ConfigurationError, match="default_role"):
        ours.configure(default_role="nearest")
    with pytest.raises(ss.ConfigurationError, match=r"replica_set=ReplicaSet\(\.\.\.\), got str"):
        ss.routing_sessionmaker(cluster.primary.url())  # type: ignore[arg-type]
    with ss.routing_sessionmaker(replicas)() as session:
        port, in_recovery = session.execute(WHERE).one()
    assert port in {r.port for r in cluster.replicas} and in_recovery


# -- reads -----------------------------------------------------------------------------


def test_orm_select_runs_on_a_replica(cluster: LocalCluster, Session: sessionmaker) -> None:
    """A plain ORM SELECT is answered by a server in recovery, i.e. a replica."""
    _, replica_ports = ports(cluster)
    with Session() as session:
        users = session.scalars(select(User).order_by(User.id)).all()
    assert [u.name for u in users][:5] == [f"user{i}" for i in range(1, 6)]
    assert {u.read_on for u in users} <= replica_ports
    assert all(u.read_in_recovery for u in users)


def test_core_select_runs_on_a_replica(cluster: LocalCluster, Session: sessionmaker) -> None:
    """A Core SELECT executed through the session is answered by a replica."""
    _, replica_ports = ports(cluster)
    with Session() as session:
        port, in_recovery = session.execute(WHERE).one()
    assert port in replica_ports and in_recovery is True


def test_get_runs_on_a_replica(cluster: LocalCluster, Session: sessionmaker) -> None:
    """session.get() is a read and is answered by a replica."""
    _, replica_ports = ports(cluster)
    with Session() as session:
        user = session.get(User, 1)
    assert user is not None and user.read_on in replica_ports


def test_round_robin_uses_both_replicas(cluster: LocalCluster, Session: sessionmaker) -> None:
    """Successive transactions alternate between the two replicas (the default policy)."""
    _, replica_ports = ports(cluster)
    seen = []
    for _ in range(4):
        with Session() as session:
            seen.append(session.execute(WHERE).one()[0])
    assert set(seen) == replica_ports
    assert seen[0] != seen[1] and seen[0] == seen[2]


def test_a_transaction_reads_from_one_replica(cluster: LocalCluster, Session: sessionmaker) -> None:
    """All reads of one transaction go to the replica that served its first read."""
    with Session() as session:
        seen = {session.execute(WHERE).one()[0] for _ in range(4)}
    assert len(seen) == 1


# -- writes ----------------------------------------------------------------------------


def test_flush_runs_on_the_primary(cluster: LocalCluster, Session: sessionmaker) -> None:
    """An ORM flush INSERTs on the primary: the row records the primary's port."""
    primary, _ = ports(cluster)
    with Session() as session:
        session.add(User(id=101, name="flushed"))
        session.commit()
    check = create_engine(cluster.primary.url())
    with check.connect() as conn:
        written_on = conn.scalar(select(User.written_on).where(User.id == 101))
        conn.execute(delete(User).where(User.id == 101))
        conn.commit()
    check.dispose()
    assert written_on == primary


def test_core_dml_runs_on_the_primary(cluster: LocalCluster, Session: sessionmaker) -> None:
    """INSERT, UPDATE and DELETE statements run on the primary."""
    primary, _ = ports(cluster)
    with Session() as session:
        inserted = session.execute(
            insert(User).values(id=102, name="core").returning(func.inet_server_port())
        ).scalar_one()
        updated = session.execute(
            update(User).where(User.id == 102).values(name="x").returning(func.inet_server_port())
        ).scalar_one()
        deleted = session.execute(
            delete(User).where(User.id == 102).returning(func.inet_server_port())
        ).scalar_one()
        session.commit()
    assert inserted == updated == deleted == primary


def test_reads_after_a_write_stay_on_the_primary(
    cluster: LocalCluster, Session: sessionmaker
) -> None:
    """Once a transaction has written, its later reads run on the primary and see the write."""
    primary, replica_ports = ports(cluster)
    with Session() as session:
        assert session.execute(WHERE).one()[0] in replica_ports
        session.add(User(id=103, name="uncommitted"))
        session.flush()
        assert session.has_written
        row = session.execute(
            select(User.name, func.inet_server_port()).where(User.id == 103)
        ).one()
        assert row == ("uncommitted", primary)
        session.rollback()
        assert not session.has_written
        assert session.execute(WHERE).one()[0] in replica_ports


def test_autoflush_sends_the_query_to_the_primary(
    cluster: LocalCluster, Session: sessionmaker
) -> None:
    """A query that autoflushes pending objects runs on the primary, where they now exist."""
    primary, _ = ports(cluster)
    with Session() as session:
        session.add(User(id=104, name="pending"))
        user = session.scalars(select(User).where(User.id == 104)).one()
        assert user.read_on == primary
        session.rollback()


def test_locking_reads_run_on_the_primary(cluster: LocalCluster, Session: sessionmaker) -> None:
    """SELECT ... FOR UPDATE and FOR SHARE run on the primary and pin the transaction there."""
    primary, _ = ports(cluster)
    with Session() as session:
        user = session.scalars(select(User).where(User.id == 1).with_for_update()).one()
        assert user.read_on == primary
        assert session.execute(WHERE).one() == (primary, False)
    with Session() as session:
        shared = session.execute(select(func.inet_server_port()).with_for_update(read=True))
        assert shared.scalar_one() == primary


def test_text_goes_to_the_primary_unless_marked(
    cluster: LocalCluster, Session: sessionmaker
) -> None:
    """Unmarked text() runs on the primary; text() marked use_replica=True runs on a replica."""
    primary, replica_ports = ports(cluster)
    with Session() as session:
        assert session.execute(text("SELECT inet_server_port()")).scalar_one() == primary
    with Session() as session:
        marked = text("SELECT inet_server_port()").execution_options(use_replica=True)
        assert session.execute(marked).scalar_one() in replica_ports


def test_ddl_and_connection_go_to_the_primary(cluster: LocalCluster, Session: sessionmaker) -> None:
    """DDL constructs and session.connection() are served by the primary."""
    primary, _ = ports(cluster)
    with Session() as session:
        session.execute(CreateTable(notes))
        assert session.connection().execute(WHERE).one() == (primary, False)
        session.execute(DropTable(notes))
        session.commit()


# -- overrides ---------------------------------------------------------------------------


def test_use_primary_option_per_call_and_per_statement(
    cluster: LocalCluster, Session: sessionmaker
) -> None:
    """execution_options(use_primary=True) sends a read to the primary, per call or on the statement."""
    primary, replica_ports = ports(cluster)
    with Session() as session:
        assert session.execute(WHERE, execution_options={"use_primary": True}).one()[0] == primary
        assert session.scalar(WHERE.execution_options(use_primary=True)) == primary
        user = session.get(User, 2, execution_options={"use_primary": True})
        assert user is not None and user.read_on == primary
    with Session() as session:
        assert session.execute(WHERE).one()[0] in replica_ports


def test_use_primary_block_nests_and_restores(cluster: LocalCluster, Session: sessionmaker) -> None:
    """session.use_primary() pins reads inside the block, nests, and unpins on exit."""
    primary, replica_ports = ports(cluster)
    with Session() as session:
        with session.use_primary():
            assert session.execute(WHERE).one()[0] == primary
            with session.use_primary():
                assert session.execute(WHERE).one()[0] == primary
            assert session.execute(WHERE).one()[0] == primary
        session.commit()
        assert session.execute(WHERE).one()[0] in replica_ports


def test_use_primary_pins_only_its_own_session(
    cluster: LocalCluster, Session: sessionmaker
) -> None:
    """A session's use_primary() block does not pin another session."""
    primary, replica_ports = ports(cluster)
    with Session() as pinned, Session() as other, pinned.use_primary():
        assert pinned.execute(WHERE).one()[0] == primary
        assert other.execute(WHERE).one()[0] in replica_ports


def test_module_use_primary_is_a_decorator(cluster: LocalCluster, Session: sessionmaker) -> None:
    """@ss.use_primary() pins every routing session inside the decorated function."""
    primary, replica_ports = ports(cluster)

    @ss.use_primary()
    def read_port() -> int:
        with Session() as session:
            return int(session.execute(WHERE).one()[0])

    assert read_port() == primary
    assert read_port() == primary
    with Session() as session:
        assert session.execute(WHERE).one()[0] in replica_ports


def test_pins_are_per_thread(cluster: LocalCluster, Session: sessionmaker) -> None:
    """A use_primary() block in one thread does not pin reads made in another thread."""
    primary, replica_ports = ports(cluster)
    results: dict[str, int] = {}
    inside = threading.Event()
    done = threading.Event()

    def pinned() -> None:
        with ss.use_primary(), Session() as session:
            results["pinned"] = session.execute(WHERE).one()[0]
            inside.set()
            done.wait(10)

    thread = threading.Thread(target=pinned)
    thread.start()
    assert inside.wait(10)
    with Session() as session:
        results["other"] = session.execute(WHERE).one()[0]
    done.set()
    thread.join(10)
    assert results["pinned"] == primary
    assert results["other"] in replica_ports


def test_default_role_primary(cluster: LocalCluster, replicas: ss.ReplicaSet) -> None:
    """default_role="primary" reads from the primary unless a statement opts into a replica."""
    primary, replica_ports = ports(cluster)
    Session = ss.routing_sessionmaker(replicas, default_role="primary")
    with Session() as session:
        assert session.execute(WHERE).one()[0] == primary
        assert (
            session.execute(WHERE, execution_options={"use_replica": True}).one()[0]
            in replica_ports
        )


def test_plain_sessionmaker_spelling(cluster: LocalCluster, replicas: ss.ReplicaSet) -> None:
    """sessionmaker(class_=ss.RoutingSession, replica_set=...) routes like routing_sessionmaker."""
    primary, replica_ports = ports(cluster)
    Session = sessionmaker(class_=ss.RoutingSession, replica_set=replicas)
    with Session() as session:
        assert session.execute(WHERE).one()[0] in replica_ports
        session.add(User(id=105, name="spelling"))
        session.flush()
        assert session.execute(WHERE).one()[0] == primary
        session.rollback()


# -- fallbacks and errors -------------------------------------------------------------


def test_no_replicas_reads_from_primary_and_logs_once(
    cluster: LocalCluster, driver: str, caplog: pytest.LogCaptureFixture
) -> None:
    """With no replicas configured, reads go to the primary, counted as fallbacks, warned once."""
    primary, _ = ports(cluster)
    with ss.ReplicaSet(primary=cluster.primary.url(driver)) as replica_set:
        Session = ss.routing_sessionmaker(replica_set)
        with caplog.at_level(logging.WARNING, logger="sqlalchemy_scale"):
            for _ in range(3):
                with Session() as session:
                    assert session.execute(WHERE).one() == (primary, False)
        assert replica_set.stats()["primary"] == {
            "statements": 3,
            "fallbacks": 3,
            "retries": 0,
            "breaker_openings": 0,
        }
    warnings = [r for r in caplog.records if "reads go to the primary" in r.getMessage()]
    assert len(warnings) == 1


def test_unusable_replicas_fall_back_to_the_primary(
    cluster: LocalCluster, Session: sessionmaker, replicas: ss.ReplicaSet
) -> None:
    """When every replica is out of rotation reads go to the primary, and return when one is back."""
    primary, _ = ports(cluster)
    for node in replicas.replicas:
        replicas.set_usable(node, False, reason="test")
    with Session() as session:
        assert session.execute(WHERE).one()[0] == primary
    replicas.set_usable(replicas.replicas[1], True)
    with Session() as session:
        assert session.execute(WHERE).one()[0] == cluster.replicas[1].port


def test_write_marked_for_a_replica_fails_and_writes_nothing(
    cluster: LocalCluster, Session: sessionmaker
) -> None:
    """A write that reaches a replica raises ReplicaWriteError naming the node; nothing is written."""
    statement = text("INSERT INTO routing_users (id, name) VALUES (106, 'lost')").execution_options(
        use_replica=True
    )
    with Session() as session, pytest.raises(ss.ReplicaWriteError) as caught:
        session.execute(statement)
    assert caught.value.node in {"replica1", "replica2"}
    assert caught.value.node in str(caught.value)
    assert cluster.primary.execute("SELECT count(*) FROM routing_users WHERE id = 106") == [(0,)]


def test_use_replica_on_a_write_is_refused_before_sending(
    cluster: LocalCluster, Session: sessionmaker
) -> None:
    """use_replica=True on an INSERT raises ReplicaWriteError without contacting any server."""
    with Session() as session, pytest.raises(ss.ReplicaWriteError, match="nothing was sent"):
        session.execute(
            insert(User).values(id=107, name="lost"), execution_options={"use_replica": True}
        )
    assert cluster.primary.execute("SELECT count(*) FROM routing_users WHERE id = 107") == [(0,)]


def test_a_routed_get_sends_a_standby_what_a_plain_session_sends(
    cluster: LocalCluster, driver: str
) -> None:
    """A primary-key get through RoutingSession sends a hot standby the same statements as a
    plain Session on that server does (read in the server's statement log): no READ ONLY in
    its BEGIN, since the standby refuses writes itself, and no extra round trip."""
    replica = cluster.replicas[0]
    logged = {"options": "-c log_statement=all"}

    def routed() -> None:
        with ss.ReplicaSet(
            primary=cluster.primary.url(driver),
            replicas=[replica.url(driver)],
            monitor=False,
            connect_args=logged,
        ) as replica_set:
            for _ in range(2):  # the second get runs on a warm connection
                with ss.routing_sessionmaker(replica_set)() as session:
                    assert session.get(User, 1) is not None

    def plain() -> None:
        engine = create_engine(replica.url(driver), connect_args=logged)
        for _ in range(2):
            with PlainSession(engine) as session:
                assert session.get(User, 1) is not None
        engine.dispose()

    # The two gets: each BEGIN, SELECT, ROLLBACK (before them, each engine's first connect
    # and the ReplicaSet's check of the replica's role at first use).
    routed_statements, plain_statements = (
        replica.statements_logged(routed)[-6:],
        replica.statements_logged(plain)[-6:],
    )
    print(f"\nrouted: {routed_statements}\nplain: {plain_statements}")
    assert routed_statements == plain_statements
    assert routed_statements[::3] == ["BEGIN", "BEGIN"]


def test_a_writable_server_named_as_replica_is_still_read_only(
    cluster: LocalCluster, driver: str
) -> None:
    """A replica URL that wrongly points at the primary, kept with allow_writable_replicas=True,
    cannot be written through (BEGIN READ ONLY)."""
    url = cluster.primary.url(driver)
    with ss.ReplicaSet(
        primary=url, replicas={"misconfigured": url}, allow_writable_replicas=True
    ) as replica_set:
        Session = ss.routing_sessionmaker(replica_set)
        statement = text("INSERT INTO routing_users (id, name) VALUES (108, 'lost')")
        with Session() as session, pytest.raises(ss.ReplicaWriteError) as caught:
            session.execute(statement.execution_options(use_replica=True))
    assert caught.value.node == "misconfigured"
    assert cluster.primary.execute("SELECT count(*) FROM routing_users WHERE id = 108") == [(0,)]


def test_a_users_writable_engine_as_replica_is_read_only_and_stays_the_users(
    cluster: LocalCluster, driver: str
) -> None:
    """A user's engine on a writable server, given as a replica, cannot be written through
    the ReplicaSet (every transaction READ ONLY), while the user's own use of that engine
    (its own pool, untouched) still writes."""
    engine: Engine = create_engine(cluster.primary.url(driver), pool_size=1, max_overflow=0)
    with ss.ReplicaSet(
        primary=cluster.primary.url(driver),
        replicas={"users-engine": engine},
        allow_writable_replicas=True,
    ) as replica_set:
        Session = ss.routing_sessionmaker(replica_set)
        show = text("SHOW transaction_read_only").execution_options(use_replica=True)
        with Session() as session:
            assert session.execute(show).scalar() == "on"
        statement = text("INSERT INTO routing_users (id, name) VALUES (109, 'lost')")
        with Session() as session, pytest.raises(ss.ReplicaWriteError) as caught:
            session.execute(statement.execution_options(use_replica=True))
        assert caught.value.node == "users-engine"
        with engine.begin() as conn:  # the one pooled connection, back in the user's hands
            assert conn.execute(text("SHOW transaction_read_only")).scalar() == "off"
            conn.execute(text("INSERT INTO routing_users (id, name) VALUES (110, 'mine')"))
    assert cluster.primary.execute("SELECT count(*) FROM routing_users WHERE id = 109") == [(0,)]
    assert cluster.primary.execute("DELETE FROM routing_users WHERE id = 110 RETURNING id") == [
        (110,)
    ]
    engine.dispose()


def test_a_users_replica_engine_hands_each_connection_to_the_node_once(
    cluster: LocalCluster, driver: str
) -> None:
    """The connections a user's replica engine serves reads on are known to their node, so
    abort_connections() (read_timeout's cut) reaches them: the reads' one pooled connection
    and the monitor's probe, as for a URL; the user's own pool opens none."""
    engine: Engine = create_engine(cluster.replicas[0].url(driver), pool_size=1, max_overflow=0)
    with ss.ReplicaSet(primary=cluster.primary.url(driver), replicas={"mine": engine}) as rs:
        Session = ss.routing_sessionmaker(rs)
        for _ in range(3):
            with Session() as session:
                assert session.execute(WHERE).one() == (cluster.replicas[0].port, True)
        assert rs.replicas[0].abort_connections() == 2
        assert engine.pool.checkedin() + engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    engine.dispose()


# -- policies and stats -------------------------------------------------------------


def test_least_busy_avoids_a_busy_replica(cluster: LocalCluster, driver: str) -> None:
    """LeastBusy sends reads to the replica whose pool has fewer connections checked out."""
    with ss.ReplicaSet(
        primary=cluster.primary.url(driver),
        replicas=[r.url(driver) for r in cluster.replicas],
        policy="least_busy",
    ) as replica_set:
        Session = ss.routing_sessionmaker(replica_set)
        busy = replica_set.replicas[0].engine.connect()
        try:
            for _ in range(3):
                with Session() as session:
                    assert session.execute(WHERE).one()[0] == cluster.replicas[1].port
        finally:
            busy.close()


def test_random_policy_and_plain_function_policies(cluster: LocalCluster, driver: str) -> None:
    """The random policy only picks replicas, and a plain function is a valid policy."""
    _, replica_ports = ports(cluster)
    urls = [r.url(driver) for r in cluster.replicas]
    with ss.ReplicaSet(primary=cluster.primary.url(driver), replicas=urls, policy="random") as rs:
        Session = ss.routing_sessionmaker(rs)
        for _ in range(4):
            with Session() as session:
                assert session.execute(WHERE).one()[0] in replica_ports

    def always_last(nodes: object) -> ss.Node:
        return nodes[-1]  # type: ignore[index, no-any-return]

    with ss.ReplicaSet(
        primary=cluster.primary.url(driver), replicas=urls, policy=always_last
    ) as rs:
        Session = ss.routing_sessionmaker(rs)
        with Session() as session:
            assert session.execute(WHERE).one()[0] == cluster.replicas[-1].port


def test_stats_count_statements_per_node(Session: sessionmaker, replicas: ss.ReplicaSet) -> None:
    """stats() counts the statements routed to each node."""
    with Session() as session:
        session.execute(WHERE)
        session.execute(WHERE)
        session.execute(text("SELECT 1"))
    stats = replicas.stats()
    assert stats["primary"] == {
        "statements": 1,
        "fallbacks": 0,
        "retries": 0,
        "breaker_openings": 0,
    }
    assert sorted(s["statements"] for name, s in stats.items() if name != "primary") == [0, 2]


def test_engines_are_accepted_in_place_of_urls(cluster: LocalCluster, driver: str) -> None:
    """Ready-made Engines work as nodes and are not disposed by the ReplicaSet."""
    primary_engine: Engine = create_engine(cluster.primary.url(driver))
    replica_engine: Engine = create_engine(cluster.replicas[0].url(driver))
    with ss.ReplicaSet(primary=primary_engine, replicas=[replica_engine]) as replica_set:
        Session = ss.routing_sessionmaker(replica_set)
        with Session() as session:
            assert session.execute(WHERE).one() == (cluster.replicas[0].port, True)
    with replica_engine.connect() as conn:  # still usable after the ReplicaSet closed
        assert conn.execute(WHERE).one()[0] == cluster.replicas[0].port
    primary_engine.dispose()
    replica_engine.dispose()


def test_pins_are_per_asyncio_task(cluster: LocalCluster, Session: sessionmaker) -> None:
    """A use_primary() block in one asyncio task does not pin a task running beside it."""
    primary, replica_ports = ports(cluster)

    async def pinned(started: asyncio.Event, release: asyncio.Event) -> int:
        with ss.use_primary():
            started.set()
            await release.wait()  # the other task runs while this one is inside the block
            with Session() as session:
                return int(session.execute(WHERE).one()[0])

    async def unpinned(started: asyncio.Event, release: asyncio.Event) -> int:
        await started.wait()
        with Session() as session:
            port = int(session.execute(WHERE).one()[0])
        release.set()
        return port

    async def main() -> tuple[int, int]:
        started, release = asyncio.Event(), asyncio.Event()
        a, b = await asyncio.gather(pinned(started, release), unpinned(started, release))
        return a, b

    in_block, beside = asyncio.run(main())
    assert in_block == primary
    assert beside in replica_ports


def test_advisory_locks_and_nextval_run_on_the_primary(
    cluster: LocalCluster,
    Session: sessionmaker,
) -> None:
    """A SELECT of an advisory-lock function runs on the primary, where the lock excludes."""
    primary, _ = ports(cluster)
    with Session() as session:
        row = session.execute(
            select(func.pg_try_advisory_xact_lock(4242), func.inet_server_port())
        ).one()
        assert row == (True, primary)
        assert session.has_written  # the lock's transaction stays on the primary
        session.rollback()


def test_a_bare_get_bind_does_not_pin_the_next_transaction(
    cluster: LocalCluster,
    Session: sessionmaker,
) -> None:
    """session.get_bind() outside a transaction returns the primary and changes no routing."""
    primary, replica_ports = ports(cluster)
    with Session() as session:
        engine = session.get_bind()
        with engine.connect() as conn:
            assert conn.execute(WHERE).one()[0] == primary
        assert not session.has_written
        assert session.execute(WHERE).one()[0] in replica_ports
        assert session.connection().execute(WHERE).one()[0] == primary
        assert session.has_written  # connection() may be written through: pinned


def test_get_bind_of_a_write_outside_a_transaction_leaves_the_next_reads_on_a_replica(
    cluster: LocalCluster,
    Session: sessionmaker,
) -> None:
    """session.get_bind(clause=insert(...)) outside any transaction names the primary but
    marks nothing written: the next transaction's reads still go to a replica (issue 9)."""
    primary, replica_ports = ports(cluster)
    with Session() as session:
        engine = session.get_bind(clause=insert(table("t", column("id"))).values(id=1))
        with engine.connect() as conn:
            assert conn.execute(WHERE).one()[0] == primary
        assert not session.has_written
        assert session.execute(WHERE).one()[0] in replica_ports
        assert not session.has_written


def test_savepoints_are_not_commits(
    cluster: LocalCluster,
    Session: sessionmaker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Releasing a savepoint records no token and warns nothing; the real commit does."""
    from sqlalchemy_scale import consistency

    with caplog.at_level(logging.WARNING, logger="sqlalchemy_scale"), Session() as session:
        with session.begin_nested():
            session.add(User(id=109, name="nested"))
        assert session.causal_token is None
        session.execute(delete(User).where(User.id == 109))
        session.commit()
        assert session.causal_token is not None
    assert consistency._COMMITTING.get() is None
    assert [r.getMessage() for r in caplog.records] == []


def test_one_use_primary_object_shared_by_threads(
    cluster: LocalCluster,
    Session: sessionmaker,
) -> None:
    """One ss.use_primary() object entered by several threads at once pins each of them."""
    primary, _ = ports(cluster)
    pin = ss.use_primary()
    barrier = threading.Barrier(3)
    seen: list[int] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with pin:
                barrier.wait(10)
                with Session() as session:
                    seen.append(session.execute(WHERE).one()[0])
                barrier.wait(10)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(20)
    assert errors == []
    assert seen == [primary] * 3


def test_use_primary_refuses_generators() -> None:
    """Decorating a generator raises TypeError instead of silently pinning nothing."""
    with pytest.raises(TypeError, match="generator"):

        @ss.use_primary()
        def rows() -> Iterator[int]:
            yield 1


def test_a_second_replica_set_must_have_its_own_primary_engine_and_scope() -> None:
    """A session routing several replica sets (one per bind) refuses one that shares another's
    primary engine or causal scope: their positions would mix in the one token. No server:
    nothing connects."""
    url = "postgresql+psycopg2://app@127.0.0.1:9/app"
    first = ss.ReplicaSet(primary=url, monitor=False)
    same_scope = ss.ReplicaSet(primary=url.replace("/app", "/other"), monitor=False)
    same_engine = ss.ReplicaSet(primary=first.primary.engine, causal_scope="b", monitor=False)
    other = ss.ReplicaSet(primary=url.replace("/app", "/b"), causal_scope="b", monitor=False)
    try:
        session = ss.RoutingSession(replica_set=first)
        with pytest.raises(ss.ConfigurationError, match="causal_scope \\(None\\)"):
            session._add_replica_set(same_scope)
        with pytest.raises(ss.ConfigurationError, match="primary engine"):
            session._add_replica_set(same_engine)
        session._add_replica_set(other)
        assert session.causal_token is None and not session.has_written
    finally:
        for replica_set in (first, same_scope, same_engine, other):
            replica_set.dispose()
