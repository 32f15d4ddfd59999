"""Routing overhead, measured against its baseline in the same run.

- a primary-key lookup through ``RoutingSession`` (served by a replica) against a plain
  ``Session`` bound to the same replica server (target ratio <= 1.05);
- the same lookup through a ``ReplicaSet`` built from URLs and one built from the user's
  own engines, each against the plain ``Session``, all three timed in one interleaved loop
  (target < 1.03 for both: the read-only view of a user's engine has a pool of its own whose
  connections are made read-only once, at connect time, so it adds no per-checkout work);
- one ``get_bind`` decision for a SELECT (target <= 1.9 us);
- causal routing on reads (token already replayed) against plain routing (target: same,
  within noise: no extra round trip);
- one write transaction with causal-token capture against one without, per driver
  (target <= 1.05: on psycopg 3 the position query travels with the COMMIT; psycopg2
  keeps one extra round trip, see ``consistency.COMMIT_AND_POSITION_SQL``;
  ``tests/test_consistency.py`` counts the statements in the server's own log);
- a primary-key lookup carrying a causal token while WAL replay is paused on the replica
  against the same lookup through a plain ``Session`` on the primary (target <= 1.2: the
  read goes to the primary at once instead of waiting ``max_wait`` for the replica).

Machines here are noisy: compare the ratios printed at the end of the module, measured
in one run, rather than absolute times across runs.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import String, create_engine, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import sqlalchemy_scale as ss
from sqlalchemy_scale.local import LocalCluster

RESULTS: dict[str, tuple[float, float, float]] = {}


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "bench_accounts"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(40))


@pytest.fixture(scope="module")
def cluster(seeded: Any) -> Iterator[LocalCluster]:
    with seeded(
        [Account.__table__], [Account(id=i, name=f"a{i}") for i in range(1, 1001)]
    ) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def replica_set(cluster: LocalCluster) -> Iterator[ss.ReplicaSet]:
    # One replica, so the routed and the plain session talk to the very same server.
    with ss.ReplicaSet(
        primary=cluster.primary.url(), replicas=[cluster.replicas[0].url()]
    ) as replica_set:
        yield replica_set


def interleaved_ratios(runs: list[Any], *, rounds: int = 1000) -> tuple[list[float], list[float]]:
    """For each of ``runs[1:]``, the median over rounds of its time / ``runs[0]``'s time in
    the same round, and each run's median time.

    Each round times every run once, in each possible order in turn, so that none always
    runs first or always follows the same other run (a run pays for what the one before it
    left behind: garbage to collect, cold caches); pairing within a round cancels load that
    drifts over seconds on a shared machine, which medians taken over the whole loop do not.
    """
    for run in runs:
        run()
    times: list[list[float]] = [[] for _ in runs]
    orders = list(itertools.permutations(range(len(runs))))
    for r in range(rounds):
        for index in orders[r % len(orders)]:
            t0 = time.perf_counter()
            runs[index]()
            times[index].append(time.perf_counter() - t0)
    ratios = [
        statistics.median(t / b for t, b in zip(own, times[0], strict=True)) for own in times[1:]
    ]
    return ratios, [statistics.median(t) for t in times]


def interleaved_ratio(
    candidate: Any, baseline: Any, *, pairs: int = 1000
) -> tuple[float, float, float]:
    """Median time of ``candidate`` / median of ``baseline``, timed alternately in one loop.

    Alternating the two (rather than running one benchmark after the other) exposes both
    to the same background noise, which on a shared 2-core machine dominates otherwise.
    """
    candidate()
    baseline()
    a: list[float] = []
    b: list[float] = []
    for _ in range(pairs):
        t0 = time.perf_counter()
        candidate()
        t1 = time.perf_counter()
        baseline()
        t2 = time.perf_counter()
        a.append(t1 - t0)
        b.append(t2 - t1)
    ma, mb = statistics.median(a), statistics.median(b)
    return ma / mb, ma, mb


def _lookup(factory: Any) -> Any:
    keys = iter(range(10**9))

    def run() -> None:
        with factory() as session:
            account = session.get(Account, next(keys) % 1000 + 1)
            assert account is not None

    return run


def test_pk_lookup_routed_vs_plain(
    benchmark: Any, replica_set: ss.ReplicaSet, cluster: LocalCluster
) -> None:
    """A PK lookup through RoutingSession (to the replica) vs a plain Session on that server."""
    engine = create_engine(cluster.replicas[0].url())
    routed = _lookup(ss.routing_sessionmaker(replica_set))
    RESULTS["pk routed / plain"] = interleaved_ratio(routed, _lookup(sessionmaker(engine)))
    benchmark(routed)
    engine.dispose()


def test_pk_lookup_user_engines_vs_urls(benchmark: Any, cluster: LocalCluster) -> None:
    """The PK lookup through ReplicaSets of URLs and of the user's engines, each vs plain."""
    plain_engine = create_engine(cluster.replicas[0].url())
    primary = create_engine(cluster.primary.url())
    replica = create_engine(cluster.replicas[0].url())
    with (
        ss.ReplicaSet(
            primary=cluster.primary.url(), replicas=[cluster.replicas[0].url()]
        ) as from_urls,
        ss.ReplicaSet(primary=primary, replicas=[replica]) as from_engines,
    ):
        user_engines = _lookup(ss.routing_sessionmaker(from_engines))
        (urls, engines), (plain, url_time, engine_time) = interleaved_ratios(
            [
                _lookup(sessionmaker(plain_engine)),
                _lookup(ss.routing_sessionmaker(from_urls)),
                user_engines,
            ],
            rounds=1800,
        )
        benchmark(user_engines)
    RESULTS["pk routed / plain, URLs"] = (urls, url_time, plain)
    RESULTS["pk routed / plain, user engines"] = (engines, engine_time, plain)
    for engine in (plain_engine, primary, replica):
        engine.dispose()


def test_pk_lookup_causal_vs_routed(
    benchmark: Any, replica_set: ss.ReplicaSet, cluster: LocalCluster
) -> None:
    """The same lookup with a causal token every replica has replayed, vs no token."""
    token = cluster.primary.execute("SELECT pg_current_wal_flush_lsn()::text")[0][0]
    cluster.replicas[0].wait_for_replay()
    assert replica_set.monitor is not None
    replica_set.monitor.refresh(replica_set.replicas[0])
    causal = _lookup(ss.routing_sessionmaker(replica_set, causal_token=token))
    RESULTS["pk causal / routed"] = interleaved_ratio(
        causal, _lookup(ss.routing_sessionmaker(replica_set))
    )
    benchmark(causal)


def test_get_bind_decision(benchmark: Any, replica_set: ss.ReplicaSet) -> None:
    """One routing decision for a SELECT, without I/O."""
    session = ss.RoutingSession(replica_set=replica_set)
    statement = select(Account).where(Account.id == 5)
    # Inside a transaction (which connects nothing until a statement runs): a statement's
    # decision is recorded; outside one, get_bind() only says where it would go.
    session.begin()

    def decide() -> None:
        session.get_bind(clause=statement)
        session.router.end_transaction()  # each decision starts afresh, as a new transaction would

    benchmark(decide)
    session.close()
    RESULTS["get_bind us"] = (benchmark.stats.stats.median * 1e6, 0.0, 0.0)


def _write(factory: Any) -> Any:
    ids = iter(range(10_000, 10**9))

    def run() -> None:
        with factory() as session:
            session.execute(
                text("UPDATE bench_accounts SET name = :n WHERE id = :id"),
                {"n": "x", "id": next(ids) % 1000 + 1},
            )
            session.commit()

    return run


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_write_with_token_vs_plain(benchmark: Any, cluster: LocalCluster, driver: str) -> None:
    """One write transaction through RoutingSession (capturing the causal token) vs a plain
    Session on the primary, on each driver."""
    engine = create_engine(cluster.primary.url(driver))
    with ss.ReplicaSet(
        primary=cluster.primary.url(driver), replicas=[cluster.replicas[0].url(driver)]
    ) as replica_set:
        routed = _write(ss.routing_sessionmaker(replica_set))
        RESULTS[f"write routed / plain ({driver})"] = interleaved_ratio(
            routed, _write(sessionmaker(engine)), pairs=600
        )
        benchmark(routed)
    engine.dispose()


def test_token_read_replay_paused_vs_primary(
    benchmark: Any, replica_set: ss.ReplicaSet, cluster: LocalCluster
) -> None:
    """A PK lookup carrying a token the paused replica has not replayed vs a plain Session's
    lookup on the primary: the token read must not wait for the replica."""
    replica = cluster.replicas[0]
    with ss.routing_sessionmaker(replica_set)() as session:
        session.get(Account, 1)  # starts the monitor
    replica.pause_replay()
    try:
        with ss.routing_sessionmaker(replica_set)() as session:
            session.execute(text("UPDATE bench_accounts SET name = 'paused' WHERE id = 1"))
            session.commit()
            token = session.causal_token
        deadline = time.monotonic() + 10
        while not replica_set.replicas[0].replay_stalled and time.monotonic() < deadline:
            time.sleep(0.01)
        assert replica_set.replicas[0].replay_stalled
        engine = create_engine(cluster.primary.url())
        causal = _lookup(ss.routing_sessionmaker(replica_set, causal_token=token))
        RESULTS["token read, replay paused / primary"] = interleaved_ratio(
            causal, _lookup(sessionmaker(engine))
        )
        benchmark(causal)
        engine.dispose()
    finally:
        replica.resume_replay()
        replica.wait_for_replay()


@pytest.fixture(scope="module", autouse=True)
def report(request: pytest.FixtureRequest) -> Iterator[None]:
    """After the module: print the ratios measured in this run."""
    yield
    targets = {
        "pk routed / plain": "target <= 1.05",
        "pk routed / plain, URLs": "target < 1.03; median of per-round ratios",
        "pk routed / plain, user engines": "target < 1.03; median of per-round ratios",
        "pk causal / routed": "target ~1.0: no extra round trip",
        "write routed / plain (psycopg2)": "target <= 1.05; psycopg2 keeps the SELECT after COMMIT",
        "write routed / plain (psycopg)": "target <= 1.05: the SELECT travels with the COMMIT",
        "token read, replay paused / primary": "target <= 1.2: no wait for a paused replica",
    }
    lines = ["", "routing benchmarks: ratios of medians, both sides timed alternately in this run"]
    for name, (ratio, a, b) in RESULTS.items():
        if name == "get_bind us":
            lines.append(f"  one get_bind decision: {ratio:.2f} us (target <= 1.9 us)")
        else:
            lines.append(
                f"  {name}: {ratio:.3f} ({a * 1e6:.0f} us vs {b * 1e6:.0f} us; {targets[name]})"
            )
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        with capture.global_and_fixture_disabled():
            print("\n".join(lines))
    else:
        print("\n".join(lines))
