"""The demo's sharding, causal-read and status acts, and keeping/stopping its topology.

Every claim the demo prints is asked of the servers: which server holds a shard's rows
(``inet_server_port()`` on each shard), which server answered a read, whether a prepared
transaction is left behind (``pg_prepared_xacts``). The routing reasons come from
:meth:`ReplicaSet.on_decision <sqlalchemy_scale.ReplicaSet.on_decision>`.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, column_property, mapped_column

from .consistency import causal_context
from .decisions import RoutingDecision
from .errors import CrossShardWriteError, render_url
from .routing import routing_sessionmaker
from .sharding import HashSharding, ShardSet, sharded_sessionmaker
from .status import render_status, table, topology_status
from .topology import ReplicaSet

if TYPE_CHECKING:
    from .local import LocalCluster

__all__ = ["KEEP_FILE", "causal_act", "keep_cluster", "shard_act", "status_act", "stop_kept"]

#: The topology file a kept demo writes into its cluster directory.
KEEP_FILE = "topology.toml"

Say = Callable[[str], None]


class _ShardBase(DeclarativeBase):
    pass


class DemoOrder(_ShardBase):
    __tablename__ = "demo_orders"
    __shard_key__ = "customer_id"

    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int]
    total: Mapped[int]
    #: The port of the server that answered the SELECT that loaded this object.
    read_on: Mapped[int] = column_property(func.inet_server_port())


def shard_set_for(cluster: LocalCluster, driver: str, *, two_phase: bool) -> ShardSet:
    return ShardSet(
        {f"s{i}": shard.url(driver) for i, shard in enumerate(cluster.shards)},
        strategy=HashSharding(),
        cross_shard_writes="two_phase" if two_phase else "refuse",
    )


def shard_act(cluster: LocalCluster, driver: str, say: Say) -> list[str]:
    """Rows placed by key, a merged fan-out, a cross-shard write refused then committed
    with two-phase commit. Returns what did not go as expected (empty: all did)."""
    wrong: list[str] = []
    names = {shard.port: shard.name for shard in cluster.shards}
    with (
        shard_set_for(cluster, driver, two_phase=False) as shards,
        shard_set_for(cluster, driver, two_phase=True) as shards_2pc,
    ):
        engines = {s: shards.replica_set(s).primary.engine for s in shards}
        for engine in engines.values():
            _ShardBase.metadata.drop_all(engine)
            _ShardBase.metadata.create_all(engine)
        try:
            Session = sharded_sessionmaker(shards, expire_on_commit=False)
            for customer in range(1, 9):  # one customer per transaction: one shard each
                with Session() as session:
                    session.add_all(
                        DemoOrder(id=customer * 10 + n, customer_id=customer, total=customer * n)
                        for n in range(1, 4)
                    )
                    session.commit()
            rows = []
            for shard_id, engine in engines.items():
                with engine.connect() as conn:
                    port, customers, count = conn.execute(
                        text(
                            "SELECT inet_server_port(), string_agg(DISTINCT customer_id::text, ','),"
                            " count(*) FROM demo_orders"
                        )
                    ).one()
                rows.append([shard_id, names.get(port, str(port)), customers or "", str(count)])
                expected = [str(c) for c in range(1, 9) if shards.shard_for(c) == shard_id]
                if (customers or "").split(",") != expected and expected:
                    wrong.append(f"shard {shard_id} holds customers {customers}, not {expected}")
            say("\nRows placed by shard key (HashSharding of customer_id), asked of each shard:")
            say(table(["shard", "server", "customers", "orders"], rows))

            with Session() as session:
                top = session.scalars(
                    select(DemoOrder).order_by(DemoOrder.total.desc(), DemoOrder.id).limit(5)
                ).all()
            everything = sorted(
                ((c * n, c * 10 + n) for c in range(1, 9) for n in range(1, 4)),
                key=lambda row: (-row[0], row[1]),
            )[:5]
            merged = [(o.total, o.id) for o in top]
            servers = sorted({names.get(o.read_on, str(o.read_on)) for o in top})
            say(
                "\nFan-out: ORDER BY total DESC LIMIT 5 over every shard at once, merged: "
                f"{[t for t, _ in merged]} (rows from {', '.join(servers)}); "
                f"one database would answer {[t for t, _ in everything]}"
            )
            if merged != everything:
                wrong.append(f"fan-out merged {merged}, one database says {everything}")

            a, b = _customers_on_two_shards(shards)
            with Session() as session:
                session.add_all(
                    [
                        DemoOrder(id=1000, customer_id=a, total=1),
                        DemoOrder(id=1001, customer_id=b, total=1),
                    ]
                )
                try:
                    session.commit()
                    wrong.append("a cross-shard write committed without two-phase commit")
                except CrossShardWriteError as exc:
                    session.rollback()
                    say(f"\nCross-shard write without two_phase: refused ({exc})")
            written = _count_ids(engines, (1000, 1001))
            say(f"  orders 1000/1001 on the shards afterwards: {written} (nothing was written)")
            if written:
                wrong.append(f"a refused cross-shard write left {written} rows")

            with sharded_sessionmaker(shards_2pc)() as session:
                session.add_all(
                    [
                        DemoOrder(id=1000, customer_id=a, total=1),
                        DemoOrder(id=1001, customer_id=b, total=1),
                    ]
                )
                session.commit()
            written = _count_ids(engines, (1000, 1001))
            pending = sum(
                _scalar(e, "SELECT count(*) FROM pg_prepared_xacts") for e in engines.values()
            )
            say(
                "The same write with ShardSet(cross_shard_writes='two_phase'): committed with "
                f"PREPARE TRANSACTION / COMMIT PREPARED on {shards.shard_for(a)} and {shards.shard_for(b)}: "
                f"{written} rows, {pending} prepared transactions left"
            )
            if written != 2 or pending:
                wrong.append(f"two-phase commit left {written} rows and {pending} prepared")
        finally:
            for engine in engines.values():
                _ShardBase.metadata.drop_all(engine)
    return wrong


def _customers_on_two_shards(shards: ShardSet) -> tuple[int, int]:
    first = 100
    for other in range(101, 200):
        if shards.shard_for(other) != shards.shard_for(first):
            return first, other
    raise AssertionError("HashSharding placed 100 keys on one shard")


def _scalar(engine: Any, sql: str, **params: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(sql), params).scalar_one())


def _count_ids(engines: dict[str, Any], ids: tuple[int, ...]) -> int:
    return sum(
        _scalar(e, "SELECT count(*) FROM demo_orders WHERE id = ANY(:ids)", ids=list(ids))
        for e in engines.values()
    )


def causal_act(cluster: LocalCluster, replica_set: ReplicaSet, model: Any, say: Say) -> list[str]:
    """A write, then a causal read while every replica's replay is paused (the primary
    answers, and the decision says why), then again once replay resumes (a replica)."""
    wrong: list[str] = []
    reasons: list[str] = []

    def remember(decision: RoutingDecision) -> None:
        reasons.append(f"{decision.node.name}: {decision.reason}")

    names = {node.port: node.name for node in cluster.nodes}
    Session = routing_sessionmaker(replica_set, expire_on_commit=False)
    replica_set.on_decision(remember)
    say("\nCausal read with replay paused on every replica (pg_wal_replay_pause()):")
    try:
        for replica in cluster.replicas:
            replica.pause_replay()
        try:
            with causal_context() as ctx:
                with Session() as session:
                    session.add(model(id=500, name="written while replicas are paused"))
                    session.commit()
                reasons.clear()
                with Session() as session:
                    user = session.get(model, 500)
                    served = names.get(user.read_on, str(user.read_on)) if user else "nothing"
                say(f"  token {ctx.token}: the read found the row on {served} ({reasons[-1]})")
                if served != "primary":
                    wrong.append(f"a causal read during paused replay was served by {served}")
        finally:
            for replica in cluster.replicas:
                replica.resume_replay()
        for replica in cluster.replicas:
            replica.wait_for_replay()
        started = time.monotonic()
        served = "primary"
        while served == "primary" and time.monotonic() - started < 10:
            reasons.clear()
            with causal_context(ctx.token), Session() as session:
                user = session.get(model, 500)
                served = names.get(user.read_on, str(user.read_on)) if user else "nothing"
            if served == "primary":
                time.sleep(0.01)  # the monitor has not seen the replay yet
        say(f"  after resuming replay: served by {served} ({reasons[-1]})")
        if not served.startswith("replica"):
            wrong.append(f"after replay resumed the causal read was served by {served}")
    finally:
        replica_set.remove_decision_listener(remember)
    return wrong


def status_act(cluster: LocalCluster, driver: str, say: Say) -> None:
    """The status table of the topology the demo started (what `sqlalchemy-scale status` prints)."""
    admin = _admin_url(cluster)
    with ReplicaSet(
        primary=cluster.primary.url(driver),
        replicas=[r.url(driver) for r in cluster.replicas],
        monitor=False,
    ) as replica_set:
        say("\nsqlalchemy-scale status (the replica set):")
        say(render_status(topology_status(replica_set, pgbouncer_admin=admin)))
    if cluster.shards:
        with shard_set_for(cluster, driver, two_phase=False) as shards:
            say("\nsqlalchemy-scale status (the shard set):")
            say(render_status(topology_status(shards)))


def _admin_url(cluster: LocalCluster) -> str | None:
    if cluster.pgbouncer is None:
        return None
    url = cluster.pgbouncer.sa_url(database="pgbouncer")
    return url.render_as_string(hide_password=False)


def keep_cluster(cluster: LocalCluster, driver: str, say: Say) -> Path:
    """Leave the cluster running after this process exits; write its topology file.

    The cluster no longer stops at exit, and the directory loses its owner file, so no
    later ``LocalCluster.start()`` reaps it: ``sqlalchemy-scale stop DIR`` stops it.
    """
    from .local import _process

    base = cluster.base_dir
    assert base is not None
    _process.forget_at_exit(cluster)
    (base / "owner.pid").unlink(missing_ok=True)
    path = base / KEEP_FILE
    path.write_text(_toml(cluster, driver), encoding="utf-8")
    path.chmod(0o600)  # it holds the password
    say("\nThe topology is left running (--keep):")
    say(cluster.describe())
    say("\n  URLs (the password is in the topology file):")
    for node in cluster.nodes:
        say(f"    {node.name:<16} {render_url(node.url(driver))}")
    if cluster.pgbouncer is not None:
        say(f"    {'pgbouncer':<16} {render_url(cluster.pgbouncer.url(driver))}")
    say(f"\n  topology file (URLs with the password): {path}")
    say(f"  sqlalchemy-scale status --config {path} --section replica_set")
    say(f"  sqlalchemy-scale status --config {path} --section shard_set")
    say(f"  stop it:  sqlalchemy-scale stop {base}")
    return path


def _toml(cluster: LocalCluster, driver: str) -> str:
    def quoted(value: str) -> str:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = ["# Written by `sqlalchemy-scale demo --keep`; stop with `sqlalchemy-scale stop DIR`."]
    admin = _admin_url(cluster)
    if admin is not None:
        lines += ["[status]", f"pgbouncer_admin = {quoted(admin)}", ""]
    lines += [
        "[replica_set]",
        f"primary = {quoted(cluster.primary.url(driver))}",
        "replicas = [" + ", ".join(quoted(r.url(driver)) for r in cluster.replicas) + "]",
        "",
    ]
    if cluster.shards:
        lines += ["[shard_set]", 'strategy = "hash"', 'cross_shard_writes = "two_phase"']
        for index, shard in enumerate(cluster.shards):
            lines += [f"[shard_set.shards.s{index}]", f"primary = {quoted(shard.url(driver))}"]
            replicas = cluster.shard_replicas.get(index, [])
            if replicas:
                lines.append(
                    "replicas = [" + ", ".join(quoted(r.url(driver)) for r in replicas) + "]"
                )
    return "\n".join(lines) + "\n"


def stop_kept(directory: str | os.PathLike[str]) -> list[str]:
    """Stop the servers and PgBouncer of a cluster kept by ``demo --keep`` and remove its
    directory. Processes are found by their PID files and checked against their command
    line (it must name this directory) before any signal. Returns what was stopped."""
    from .local import _process, find_binaries

    base = Path(directory).absolute()
    if not (base / KEEP_FILE).is_file() or not (base / "primary").is_dir():
        raise FileNotFoundError(
            f"{base} is not a directory kept by `sqlalchemy-scale demo --keep` "
            f"(no {KEEP_FILE} and primary/ in it); nothing was stopped"
        )
    running = [
        pidfile.parent.name
        for pidfile in sorted(base.glob("*/postmaster.pid"))
        if (pid := _process.read_pid(pidfile)) is not None
        and _process.pid_matches(pid, str(pidfile.parent))
    ]
    if _process.read_pid(base / "pgbouncer" / "pgbouncer.pid") is not None:
        running.append("pgbouncer")
    try:
        pg_ctl: str | None = find_binaries().path("pg_ctl")
    except Exception:  # no binaries any more: SIGKILL by checked PID still works
        pg_ctl = None
    _process.stop_leftovers(base, pg_ctl)
    shutil.rmtree(base, ignore_errors=True)
    return running
