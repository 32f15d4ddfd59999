"""Routing you can watch: decision listeners, reasons in the DEBUG log, stats() counters,
and the README's Prometheus and OpenTelemetry examples, against the real servers.

Where a statement ran is asked of the server (``inet_server_port()``) and compared with
the node each decision named.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import sqlalchemy_scale as ss
from sqlalchemy_scale.local import LocalCluster
from sqlalchemy_scale.local._process import free_ports


class Base(DeclarativeBase):
    pass


class DecisionRow(Base):
    __tablename__ = "decision_rows"

    id: Mapped[int] = mapped_column(primary_key=True)


README = Path(__file__).resolve().parent.parent / "README.md"
WHERE = select(func.inet_server_port(), func.pg_is_in_recovery())


def readme_block(marker: str) -> str:
    """The README's python block containing ``marker``."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    (block,) = [b for b in blocks if marker in b]
    return block


def port_of(node: ss.Node) -> int:
    port = node.engine.url.port
    assert port is not None
    return port


@pytest.fixture
def decisions(replicas: ss.ReplicaSet) -> Iterator[list[ss.RoutingDecision]]:
    seen: list[ss.RoutingDecision] = []
    replicas.on_decision(seen.append)
    yield seen
    replicas.remove_decision_listener(seen.append)


def test_each_decision_names_the_node_that_ran_the_statement(
    replicas: ss.ReplicaSet, decisions: list[ss.RoutingDecision]
) -> None:
    """A listener gets one decision per statement, with the reason and kind; the node it
    names is the server that answered."""
    Session = ss.routing_sessionmaker(replicas)
    answers = []
    with Session() as session:
        answers.append(session.execute(WHERE).one())
        answers.append(session.execute(WHERE, execution_options={"use_primary": True}).one())
        with session.use_primary():
            answers.append(session.execute(WHERE).one())
        session.execute(text("CREATE TEMP TABLE decided (n int)"))
        answers.append(session.execute(WHERE).one())
        session.rollback()
    assert [(d.reason, d.kind) for d in decisions] == [
        ("read", "read"),
        ("use_primary option", "read"),
        ("use_primary block", "read"),
        ("text", "text"),
        ("transaction has written", "read"),
    ]
    ran = [d for d in decisions if d.kind != "text"]
    assert [port_of(d.node) for d in ran] == [port for port, _ in answers]
    assert ran[0].node.is_replica and answers[0][1] is True
    assert all(d.session is not None and d.replica_set is replicas for d in decisions)


def test_a_flush_is_reported_as_such(
    replicas: ss.ReplicaSet, decisions: list[ss.RoutingDecision]
) -> None:
    """The decision for an ORM flush says "flush" and names the primary, where the row is."""
    Session = ss.routing_sessionmaker(replicas)
    with Session() as session:
        session.execute(text("CREATE TEMP TABLE decision_rows (id int PRIMARY KEY)"))
        session.add(DecisionRow(id=1))
        session.flush()
        port = session.execute(
            select(func.inet_server_port()).where(
                select(DecisionRow.id).where(DecisionRow.id == 1).exists()
            )
        ).scalar_one()
        session.rollback()
    flush = next(d for d in decisions if d.kind == "flush")
    assert flush.reason == "flush" and flush.statement is None
    assert port_of(flush.node) == port == port_of(replicas.primary)


def test_fallback_reason_names_the_token_in_the_decision_and_the_log(
    scale_cluster: LocalCluster,
    replicas: ss.ReplicaSet,
    decisions: list[ss.RoutingDecision],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A read whose causal token no replica has replayed goes to the primary, and both the
    decision and the DEBUG log line say "fallback: no replica at <token>"."""
    for node in scale_cluster.replicas:
        node.pause_replay()
    try:
        # A real commit position that neither paused replica has replayed (a token ahead
        # of the primary itself would be ignored as forged).
        token = scale_cluster.primary.execute(
            "CREATE TEMP TABLE decision_probe AS SELECT 1; SELECT pg_current_wal_insert_lsn()::text"
        )[0][0]
        Session = ss.routing_sessionmaker(replicas, causal_token=token)
        with (
            caplog.at_level(logging.DEBUG, logger="sqlalchemy_scale.routing"),
            Session() as session,
        ):
            port, in_recovery = session.execute(WHERE).one()
            again = session.execute(WHERE).one()
    finally:
        for node in scale_cluster.replicas:
            node.resume_replay()
    assert (port, in_recovery) == (port_of(replicas.primary), False)
    assert again[0] == port
    assert [d.reason for d in decisions] == [f"fallback: no replica at {token}"] * 2
    assert decisions[0].kind == "read"
    assert f"[primary] default: fallback: no replica at {token}" in caplog.text
    assert replicas.stats()["primary"]["fallbacks"] == 1


def test_no_replicas_configured_is_the_fallback_reason(
    scale_cluster: LocalCluster, driver: str
) -> None:
    """With no replica configured, a read's decision says so and the primary answers."""
    seen: list[ss.RoutingDecision] = []
    with ss.ReplicaSet(primary=scale_cluster.primary.url(driver)) as replica_set:
        replica_set.on_decision(seen.append)
        with ss.routing_sessionmaker(replica_set)() as session:
            port = session.execute(WHERE).one()[0]
    assert port == scale_cluster.primary.port
    assert [d.reason for d in seen] == ["fallback: no replicas configured"]


def test_a_failing_listener_does_not_change_routing(
    replicas: ss.ReplicaSet, caplog: pytest.LogCaptureFixture
) -> None:
    """A listener that raises is logged; the statement still runs where it was routed, and
    the other listeners still hear of it."""
    seen: list[str] = []

    def broken(decision: ss.RoutingDecision) -> None:
        raise RuntimeError("listener bug")

    replicas.on_decision(broken)
    replicas.on_decision(lambda d: seen.append(d.node.name))
    with ss.routing_sessionmaker(replicas)() as session:
        port, in_recovery = session.execute(WHERE).one()
    assert in_recovery is True and port in {port_of(r) for r in replicas.replicas}
    assert len(seen) == 1 and "listener bug" in caplog.text
    replicas.remove_decision_listener(broken)
    with pytest.raises(ValueError):
        replicas.remove_decision_listener(broken)


def test_sharded_sessions_report_decisions_per_shard(
    scale_cluster: LocalCluster, driver: str
) -> None:
    """A sharded session routes inside each shard with that shard's ReplicaSet, whose
    listeners name the shard and the node (shard0's replica for a read)."""
    shard0 = ss.ReplicaSet(
        primary=scale_cluster.shards[0].url(driver),
        replicas=[r.url(driver) for r in scale_cluster.shard_replicas[0]],
        name="s0",
    )
    seen: list[ss.RoutingDecision] = []
    shard0.on_decision(seen.append)
    with (
        ss.ShardSet(
            {"s0": shard0, "s1": scale_cluster.shards[1].url(driver)}, strategy=ss.HashSharding()
        ) as shards,
        ss.sharded_sessionmaker(shards)() as session,
    ):
        port, in_recovery = session.execute(WHERE, bind_arguments={"shard_id": "s0"}).one()
    assert in_recovery is True
    assert [(d.replica_set.name, port_of(d.node), d.reason) for d in seen] == [("s0", port, "read")]


def test_stats_count_retries_and_breaker_openings_of_a_dead_replica(
    scale_cluster: LocalCluster, driver: str
) -> None:
    """A replica that refuses connections fails the first read: stats() counts one retry
    and one breaker opening on it, and the primary served the read (a fallback)."""
    (dead_port,) = free_ports(1)
    dead = scale_cluster.primary.sa_url(driver).set(port=dead_port)
    seen: list[ss.RoutingDecision] = []
    with ss.ReplicaSet(
        primary=scale_cluster.primary.url(driver),
        replicas=[dead.render_as_string(hide_password=False)],
        monitor=False,
    ) as replica_set:
        replica_set.on_decision(seen.append)
        with ss.routing_sessionmaker(replica_set)() as session:
            port = session.execute(WHERE).one()[0]
        stats = replica_set.stats()
    assert port == scale_cluster.primary.port
    assert stats["replica1"]["retries"] == 1 and stats["replica1"]["breaker_openings"] == 1
    assert stats["primary"]["fallbacks"] == 1
    assert [(d.node.name, d.reason) for d in seen] == [
        ("replica1", "read"),
        ("primary", "fallback: no usable replica"),
    ]


def test_stats_report_lag_the_monitor_measured(replicas: ss.ReplicaSet) -> None:
    """After a health sweep, stats() carries each replica's lag in bytes and milliseconds."""
    replicas.health()
    stats = replicas.stats()
    for replica in replicas.replicas:
        assert stats[replica.name]["lag_bytes"] >= 0 and stats[replica.name]["lag_ms"] >= 0
    assert "lag_bytes" not in stats["primary"]


def test_readme_prometheus_example_exports_routing(replicas: ss.ReplicaSet) -> None:
    """The README's Prometheus example exports one routed-statement sample per node and
    reason, and the stats() counters, matching where the statements ran."""
    namespace: dict[str, Any] = {"replicas": replicas, "ss": ss}
    exec(readme_block("prometheus_client"), namespace)
    ports = []
    with ss.routing_sessionmaker(replicas)() as session:
        for _ in range(3):
            ports.append(session.execute(WHERE).one()[0])
        with session.use_primary():
            ports.append(session.execute(WHERE).one()[0])
    registry = namespace["registry"]
    node_by_port = {port_of(n): n.name for n in replicas.nodes}
    replica_name = node_by_port[ports[0]]
    labels = {"replica_set": "default", "node": replica_name, "reason": "read"}
    assert registry.get_sample_value("sqlalchemy_scale_routed_statements_total", labels) == 3
    labels = {"replica_set": "default", "node": "primary", "reason": "use_primary block"}
    assert registry.get_sample_value("sqlalchemy_scale_routed_statements_total", labels) == 1
    statements = {"replica_set": "default", "node": replica_name}
    assert registry.get_sample_value("sqlalchemy_scale_statements_total", statements) == 3
    assert "sqlalchemy_scale_lag_bytes" in namespace["metrics_text"]
    replicas.remove_decision_listener(namespace["count_decision"])


def test_readme_opentelemetry_example_adds_node_and_reason_to_spans(
    replicas: ss.ReplicaSet,
) -> None:
    """The README's OpenTelemetry example adds an event per statement to the current span,
    naming the node that answered and the reason."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    namespace: dict[str, Any] = {"replicas": replicas, "ss": ss}
    exec(readme_block("opentelemetry"), namespace)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("request"), ss.routing_sessionmaker(replicas)() as session:
        read_port = session.execute(WHERE).one()[0]
        write_port = session.execute(WHERE, execution_options={"use_primary": True}).one()[0]
    (span,) = exporter.get_finished_spans()
    events = [dict(e.attributes or {}) for e in span.events if e.name == "sqlalchemy_scale.route"]
    node_by_name = {n.name: port_of(n) for n in replicas.nodes}
    assert [node_by_name[str(e["db.sqlalchemy_scale.node"])] for e in events] == [
        read_port,
        write_port,
    ]
    assert [e["db.sqlalchemy_scale.reason"] for e in events] == ["read", "use_primary option"]
    replicas.remove_decision_listener(namespace["trace_decision"])
    provider.shutdown()
