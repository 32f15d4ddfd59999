"""Topology status: each node's server-reported role, state, lag and connections, and PgBouncer's pools.

:func:`topology_status` takes a :class:`~sqlalchemy_scale.ReplicaSet` or a
:class:`~sqlalchemy_scale.ShardSet` and asks every node (one health sweep per replica
set, see :mod:`sqlalchemy_scale.health`, plus one query per reachable node for
``pg_stat_activity`` and ``max_connections``). With a PgBouncer admin URL it also
reads the admin console's ``SHOW POOLS``. The result says what is wrong
(:attr:`TopologyStatus.problems`): a node down, a replica lagging beyond the replica
set's ``max_lag_bytes`` / ``max_lag_seconds``, a node whose server reports another
role than configured, an unreachable PgBouncer. ``sqlalchemy-scale status`` prints it
as a table or JSON and exits non-zero when there is a problem, so it serves as a
container health check or a cron job.

Lag in seconds comes from the monitor's own samples of the primary's position, so a
single sweep reports 0.0 s for a replica that is behind: the bytes are exact at once,
the seconds become meaningful with ``--watch`` (or inside an application whose monitor
runs). The pool column is the node's pool as seen by the process that asks: inside an
application it shows the application's connections; from the command line, which has
its own engines, it shows ``0/size``. URLs are printed with the password masked.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import text
from sqlalchemy.engine import URL, make_url

from .errors import render_url
from .health import NodeHealth, NodeState, _describe
from .topology import Node, ReplicaSet, Role

if TYPE_CHECKING:
    from .sharding import ShardSet

__all__ = ["BouncerPool", "NodeStatus", "TopologyStatus", "render_status", "topology_status"]

_CONNECTIONS = text(
    "SELECT count(*) FILTER (WHERE backend_type = 'client backend'),"
    " current_setting('max_connections')::int FROM pg_stat_activity"
)


@dataclass(frozen=True)
class NodeStatus:
    """One node: what the server says about itself and what the asking process sees."""

    shard: str | None
    node: str
    configured_role: Role
    server_role: Role | None
    state: NodeState
    in_rotation: bool
    lsn: str | None
    lag_bytes: int | None
    lag_seconds: float | None
    #: Connections of this process's pool for the node in use, and the pool's size (None
    #: for pools without a size, e.g. NullPool).
    pool_in_use: int
    pool_size: int | None
    #: Client connections the server has now, and its max_connections.
    server_connections: int | None
    max_connections: int | None
    url: str
    error: str | None

    @property
    def label(self) -> str:
        return self.node if self.shard is None else f"{self.shard}/{self.node}"


@dataclass(frozen=True)
class BouncerPool:
    """One row of PgBouncer's ``SHOW POOLS``."""

    database: str
    user: str
    mode: str | None
    clients_active: int
    clients_waiting: int
    servers_active: int
    servers_idle: int


@dataclass(frozen=True)
class TopologyStatus:
    """The status of every node (and PgBouncer's pools, when an admin URL was given)."""

    nodes: list[NodeStatus]
    pgbouncer: list[BouncerPool] | None = None
    pgbouncer_url: str | None = None
    problems: list[str] = field(default_factory=list)
    checked_at: float = field(default_factory=time.time)

    @property
    def is_healthy(self) -> bool:
        """No node down or lagging beyond its limits, every role as configured, PgBouncer
        (if asked) reachable."""
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``json.dumps(status.as_dict())``)."""
        return {
            "healthy": self.is_healthy,
            "problems": list(self.problems),
            "checked_at": self.checked_at,
            "nodes": [asdict(n) for n in self.nodes],
            "pgbouncer": None
            if self.pgbouncer_url is None
            else {
                "url": self.pgbouncer_url,
                "pools": None if self.pgbouncer is None else [asdict(p) for p in self.pgbouncer],
            },
        }


def topology_status(
    topology: ReplicaSet | ShardSet, *, pgbouncer_admin: str | URL | None = None
) -> TopologyStatus:
    """Ask every node of ``topology`` (and PgBouncer's admin console) for its status now.

    :param topology: a ReplicaSet, or a ShardSet (every shard's primary and replicas).
    :param pgbouncer_admin: URL of PgBouncer's admin console, e.g.
        ``postgresql://admin:secret@127.0.0.1:6432/pgbouncer`` (the user must be in
        ``admin_users`` or ``stats_users``). Without a password in the URL, libpq's
        ``PGPASSWORD`` / ``~/.pgpass`` apply.

    .. versionadded:: 0.1
    """
    sets: list[tuple[str | None, ReplicaSet]]
    if isinstance(topology, ReplicaSet):
        sets = [(None, topology)]
    else:
        sets = [(s, topology.replica_set(s)) for s in topology.shard_ids]
    nodes: list[NodeStatus] = []
    problems: list[str] = []
    for shard, replica_set in sets:
        for health in replica_set.health():
            status = _node_status(shard, replica_set.node(health.name), health)
            nodes.append(status)
            problems += _problems(status)
    pools: list[BouncerPool] | None = None
    admin_url: str | None = None
    if pgbouncer_admin is not None:
        admin_url = render_url(pgbouncer_admin)
        try:
            pools = show_pools(pgbouncer_admin)
        except Exception as exc:
            problems.append(f"pgbouncer {admin_url} cannot be asked: {_describe(exc)}")
    return TopologyStatus(nodes, pools, admin_url, problems)


def _node_status(shard: str | None, node: Node, health: NodeHealth) -> NodeStatus:
    pool: Any = node.engine.pool
    size = pool.size() if hasattr(pool, "size") else None
    connections: int | None = None
    max_connections: int | None = None
    error = health.last_error if health.state == "down" else None
    if health.state != "down":
        try:
            with node.engine.connect() as conn:
                connections, max_connections = conn.execute(_CONNECTIONS).one()
        except Exception as exc:  # gone since the sweep: report it, do not fail the report
            error = _describe(exc)
    return NodeStatus(
        shard=shard,
        node=node.name,
        configured_role=node.role,
        server_role=health.server_role,
        state=health.state,
        in_rotation=health.in_rotation,
        lsn=health.lsn,
        lag_bytes=health.lag_bytes,
        lag_seconds=health.lag_seconds,
        pool_in_use=node.checked_out(),
        pool_size=int(size) if size is not None else None,
        server_connections=connections,
        max_connections=max_connections,
        url=node.url,
        error=error,
    )


def _problems(status: NodeStatus) -> list[str]:
    label = status.label
    if status.state == "down":
        return [f"{label} is down: {status.error or 'no answer'}"]
    found: list[str] = []
    if status.state == "lagging":
        lag = f"{status.lag_bytes} bytes"
        if status.lag_seconds is not None:
            lag += f", {status.lag_seconds:.1f} s"
        found.append(f"{label} is lagging beyond its limits ({lag} behind)")
    if status.server_role is not None and status.server_role != status.configured_role:
        found.append(
            f"{label} is configured as {status.configured_role} but the server reports "
            f"{status.server_role}"
        )
    return found


def show_pools(admin: str | URL) -> list[BouncerPool]:
    """PgBouncer's ``SHOW POOLS``, asked of its admin console (simple query protocol,
    autocommit: the console accepts nothing else)."""
    import psycopg2

    url = make_url(admin)
    params: dict[str, Any] = {
        "host": url.host or "127.0.0.1",
        "port": url.port or 6432,
        "user": url.username,
        "dbname": url.database or "pgbouncer",
        "connect_timeout": 5,
    }
    if url.password is not None:
        params["password"] = url.password
    conn = psycopg2.connect(**params)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SHOW POOLS")
            names = [d[0] for d in cur.description]
            rows = [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
    finally:
        conn.close()
    return [
        BouncerPool(
            database=str(row["database"]),
            user=str(row["user"]),
            mode=row.get("pool_mode"),
            clients_active=int(row["cl_active"]),
            clients_waiting=int(row["cl_waiting"]),
            servers_active=int(row["sv_active"]),
            servers_idle=int(row["sv_idle"]),
        )
        for row in rows
    ]


def render_status(status: TopologyStatus) -> str:
    """The status as text tables (the ``sqlalchemy-scale status`` output)."""
    sharded = any(n.shard is not None for n in status.nodes)
    header = [
        *(["shard"] if sharded else []),
        "node",
        "configured",
        "server says",
        "state",
        "lag bytes",
        "lag s",
        "pool",
        "server conns",
        "url / last error",
    ]
    rows = [
        [
            *([n.shard or ""] if sharded else []),
            n.node,
            n.configured_role,
            n.server_role or "?",
            n.state,
            _blank(n.lag_bytes),
            "" if n.lag_seconds is None else f"{n.lag_seconds:.2f}",
            f"{n.pool_in_use}/{'-' if n.pool_size is None else n.pool_size}",
            "" if n.server_connections is None else f"{n.server_connections}/{n.max_connections}",
            n.error or n.url,
        ]
        for n in status.nodes
    ]
    out = [table(header, rows)]
    if status.pgbouncer_url is not None:
        out.append(f"\nPgBouncer pools ({status.pgbouncer_url}):")
        if status.pgbouncer is not None:
            out.append(
                table(
                    ["database", "user", "mode", "cl active", "cl waiting", "sv active", "sv idle"],
                    [
                        [
                            p.database,
                            p.user,
                            p.mode or "",
                            str(p.clients_active),
                            str(p.clients_waiting),
                            str(p.servers_active),
                            str(p.servers_idle),
                        ]
                        for p in status.pgbouncer
                        if p.database != "pgbouncer"
                    ],
                )
            )
    if status.problems:
        out.append("\nProblems:")
        out += [f"  - {p}" for p in status.problems]
    else:
        out.append("\nAll nodes healthy.")
    return "\n".join(out)


def _blank(value: object) -> str:
    return "" if value is None else str(value)


def table(header: list[str], body: list[list[str]]) -> str:
    """A plain text table with a rule under the header, indented two spaces."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body, strict=False)]
    line = "  ".join("-" * w for w in widths)
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)), line]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in body]
    return "\n".join("  " + r.rstrip() for r in lines)
