"""What the FastAPI integration costs a request, measured against its baseline in the same run.

One GET that loads a row by primary key, through FastAPI's TestClient:

- with ``CausalTokenMiddleware`` and ``session_dependency`` over a routing session (served by
  the replica), against the same app with a plain ``Session`` dependency bound to that
  replica server and no middleware (target: within noise of 1.0; the middleware parses two
  headers and the dependency sets one attribute);
- the same with a causal token the replica has replayed in the request's header, against no
  token (target ~1.0: the monitor already knows the replica's position, no round trip).

Compare the ratios printed at the end, measured in one run, not absolute times across runs.
(No ``from __future__ import annotations``: FastAPI resolves the route's ``Annotated``
alias, local to ``make_app``, only from evaluated annotations.)
"""

import statistics
import time
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import String, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import sqlalchemy_scale as ss
from sqlalchemy_scale.fastapi import CausalTokenMiddleware, session_dependency
from sqlalchemy_scale.local import LocalCluster

RESULTS: dict[str, tuple[float, float, float]] = {}


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "bench_web_items"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(40))


@pytest.fixture(scope="module")
def cluster(seeded: Any) -> Iterator[LocalCluster]:
    with seeded([Item.__table__], [Item(id=i, name=f"i{i}") for i in range(1, 101)]) as cluster:
        yield cluster


def make_app(dependency: Callable[..., Any], *, middleware: bool) -> FastAPI:
    app = FastAPI()
    if middleware:
        app.add_middleware(CausalTokenMiddleware)
    DbSession = Annotated[Session, Depends(dependency)]

    @app.get("/items/{item_id}")
    def read(item_id: int, session: DbSession) -> str:
        item = session.get(Item, item_id)
        assert item is not None
        return item.name

    return app


def interleaved_ratio(
    candidate: Callable[[], Any], baseline: Callable[[], Any], *, pairs: int = 300
) -> tuple[float, float, float]:
    """Median time of ``candidate`` / median of ``baseline``, timed alternately in one loop."""
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


def get(client: TestClient, headers: dict[str, str] | None = None) -> Callable[[], None]:
    keys = iter(range(10**9))

    def run() -> None:
        response = client.get(f"/items/{next(keys) % 100 + 1}", headers=headers)
        assert response.status_code == 200

    return run


def test_get_with_the_integration_vs_plain(benchmark: Any, cluster: LocalCluster) -> None:
    """A GET through the middleware and a routing-session dependency vs a plain FastAPI app
    with a plain Session on the same replica server."""
    engine = create_engine(cluster.replicas[0].url())
    plain_maker = sessionmaker(engine)

    def plain_dependency() -> Iterator[Session]:
        with plain_maker() as session:
            yield session

    with ss.ReplicaSet(
        primary=cluster.primary.url(), replicas=[cluster.replicas[0].url()]
    ) as replica_set:
        routed_app = make_app(
            session_dependency(ss.routing_sessionmaker(replica_set)), middleware=True
        )
        plain_app = make_app(plain_dependency, middleware=False)
        with TestClient(routed_app) as routed, TestClient(plain_app) as plain:
            RESULTS["GET integration / plain"] = interleaved_ratio(get(routed), get(plain))
            benchmark(get(routed))
    engine.dispose()


def test_get_with_a_replayed_token_vs_none(benchmark: Any, cluster: LocalCluster) -> None:
    """The same GET carrying, in X-Scale-Token, a token the replica has replayed, vs none."""
    token = cluster.primary.execute("SELECT pg_current_wal_flush_lsn()::text")[0][0]
    cluster.replicas[0].wait_for_replay()
    with ss.ReplicaSet(
        primary=cluster.primary.url(), replicas=[cluster.replicas[0].url()]
    ) as replica_set:
        assert replica_set.monitor is not None
        replica_set.monitor.refresh(replica_set.replicas[0])
        app = make_app(session_dependency(ss.routing_sessionmaker(replica_set)), middleware=True)
        with TestClient(app) as client:
            with_token = get(client, {"X-Scale-Token": token})
            RESULTS["GET with token / without"] = interleaved_ratio(with_token, get(client))
            benchmark(with_token)


@pytest.fixture(scope="module", autouse=True)
def report(request: pytest.FixtureRequest) -> Iterator[None]:
    """After the module: print the ratios measured in this run."""
    yield
    targets = {
        "GET integration / plain": "target ~1.0: two headers parsed, one attribute set",
        "GET with token / without": "target ~1.0: no extra round trip",
    }
    lines = ["", "web benchmarks: ratios of medians, both sides timed alternately in this run"]
    for name, (ratio, a, b) in RESULTS.items():
        lines.append(
            f"  {name}: {ratio:.3f} ({a * 1e6:.0f} us vs {b * 1e6:.0f} us; {targets[name]})"
        )
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        with capture.global_and_fixture_disabled():
            print("\n".join(lines))
    else:
        print("\n".join(lines))
