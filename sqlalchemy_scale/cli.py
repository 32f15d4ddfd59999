"""The ``sqlalchemy-scale`` command line: ``demo``, ``status``, ``alembic-init``, ``stop`` and ``recover``.

``demo`` starts a real primary with two streaming replicas on 127.0.0.1 (the
local topology, :mod:`sqlalchemy_scale.local`), runs a small ORM workload through
a :class:`~sqlalchemy_scale.RoutingSession`, prints which server answered each
step (asked of the server itself: ``inet_server_port()``, ``pg_is_in_recovery()``),
and stops everything it started.

``status`` reads a ReplicaSet or ShardSet topology from a TOML file (``--config``,
or the ``SQLALCHEMY_SCALE_CONFIG`` environment variable) or from ``--primary`` /
``--replica`` URLs, and prints each node's server-reported role, state, lag and
connections, and PgBouncer's pools (:mod:`sqlalchemy_scale.status`); ``--json``,
``--watch``; the exit code is 1 when something is wrong. Passwords are never printed.

``alembic-init DIR`` writes an Alembic project that migrates every shard's primary
(:mod:`sqlalchemy_scale.alembic`).

``recover`` reads a ShardSet from a TOML file (:meth:`ShardSet.from_config
<sqlalchemy_scale.ShardSet.from_config>`) and finishes two-phase transactions left
prepared (:mod:`sqlalchemy_scale.sharding.recovery`); ``--dry-run`` only lists them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import String, func, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, column_property, mapped_column

from .consistency import causal_context, parse_lsn
from .errors import ScaleError
from .routing import routing_sessionmaker
from .topology import ReplicaSet

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sqlalchemy-scale",
        description="Replica routing and sharding for SQLAlchemy on PostgreSQL.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="start a local primary + 2 replicas + 2 shards, run routing and sharding, report, stop",
    )
    demo.add_argument("--driver", default="psycopg2", choices=["psycopg2", "psycopg"])
    demo.add_argument("--verbose", action="store_true", help="log every routing decision")
    demo.add_argument(
        "--keep",
        action="store_true",
        help="leave the servers running and write a topology file (stop: sqlalchemy-scale stop DIR)",
    )
    status = commands.add_parser("status", help="show each node's role, state and lag")
    status.add_argument("--config", default=os.environ.get("SQLALCHEMY_SCALE_CONFIG"))
    status.add_argument("--section", default=None, help="TOML table holding the topology")
    status.add_argument("--primary", help="primary URL (instead of --config)")
    status.add_argument("--replica", action="append", default=[], help="replica URL (repeatable)")
    _add_status_options(status)
    _add_alembic_init(commands)
    _add_stop(commands)
    _add_recover_command(commands)
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            return run_demo(driver=args.driver, verbose=args.verbose, keep=args.keep)
        if args.command == "stop":
            return run_stop(args)
        if args.command == "alembic-init":
            return run_alembic_init(args)
        if args.command == "recover":
            return run_recover(args)
        return run_status(args)
    except ScaleError as exc:
        print(f"sqlalchemy-scale: {exc}", file=sys.stderr)
        return 2


# -- alembic-init ---------------------------------------------------------------------------


def _add_alembic_init(commands: Any) -> None:
    init = commands.add_parser(
        "alembic-init",
        help="write alembic.ini + env.py + script.py.mako that migrate every shard's primary",
    )
    init.add_argument("directory", help="the directory to create (like `alembic init DIR`)")
    init.add_argument("--config", default=os.environ.get("SQLALCHEMY_SCALE_CONFIG"))
    init.add_argument("--section", default=None, help="TOML table holding the topology")


def run_alembic_init(args: argparse.Namespace) -> int:
    if not args.config:
        print(
            "sqlalchemy-scale alembic-init: give --config FILE (or SQLALCHEMY_SCALE_CONFIG), "
            "the topology TOML file the migrations run against",
            file=sys.stderr,
        )
        return 2
    try:
        from .alembic import write_project
    except ImportError as exc:
        print(
            f"sqlalchemy-scale alembic-init needs Alembic: pip install 'sqlalchemy-scale[alembic]' "
            f"({exc})",
            file=sys.stderr,
        )
        return 2
    written = write_project(args.directory, args.config, section=args.section)  # ScaleError: 2
    for path in written:
        print(f"  created {path}")
    print(
        f"Edit {args.directory}/env.py to set target_metadata, add revisions "
        f"(alembic -c {args.directory}/alembic.ini revision -m ...), then "
        f"`alembic -c {args.directory}/alembic.ini upgrade head` migrates every shard."
    )
    return 0


# -- stop -----------------------------------------------------------------------------------


def _add_stop(commands: Any) -> None:
    stop = commands.add_parser("stop", help="stop a topology left running by `demo --keep`")
    stop.add_argument("directory", help="the cluster directory `demo --keep` printed")


def run_stop(args: argparse.Namespace) -> int:
    from ._demo import stop_kept

    try:
        stopped = stop_kept(args.directory)
    except FileNotFoundError as exc:
        print(f"sqlalchemy-scale stop: {exc}", file=sys.stderr)
        return 2
    print(
        f"stopped {', '.join(stopped) or 'nothing (no server was running)'}; removed {args.directory}"
    )
    return 0


# -- status ---------------------------------------------------------------------------------


def _add_status_options(status: argparse.ArgumentParser) -> None:
    status.add_argument("--json", action="store_true", help="print JSON (one object per refresh)")
    status.add_argument(
        "--watch", type=float, default=None, metavar="SECONDS", help="refresh every SECONDS"
    )
    status.add_argument(
        "--count", type=int, default=None, help="with --watch: stop after this many refreshes"
    )


def run_status(args: argparse.Namespace) -> int:
    """Print the topology's status; exit 1 when a node is down, lagging beyond its limits
    or not in the role configured (or PgBouncer cannot be asked), 0 when all is well.

    The PgBouncer admin URL comes from ``pgbouncer_admin`` in the file's ``[status]``
    table or ``SQLALCHEMY_SCALE_PGBOUNCER_ADMIN``; passwords come from the file, the
    environment or libpq's ``PGPASSWORD`` / ``~/.pgpass``, never need the command line.
    """
    from ._config import load_topology
    from .status import render_status, topology_status

    admin = os.environ.get(PGBOUNCER_ADMIN_ENV)
    topology: Any
    if args.primary:
        topology = ReplicaSet(primary=args.primary, replicas=args.replica, monitor=False)
    elif args.config:
        topology = load_topology(args.config, section=args.section)
        if admin is None:
            admin = _status_table(args.config).get("pgbouncer_admin")
    else:
        print(
            "sqlalchemy-scale status: give --config FILE (or SQLALCHEMY_SCALE_CONFIG) "
            "or --primary URL [--replica URL ...]",
            file=sys.stderr,
        )
        return 2
    refreshes = 0
    healthy = False
    with topology:
        while True:
            status = topology_status(topology, pgbouncer_admin=admin)
            healthy = status.is_healthy
            if args.json:
                print(json.dumps(status.as_dict()), flush=True)
            else:
                if args.watch and sys.stdout.isatty():
                    print("\033[H\033[J", end="")  # clear the terminal between refreshes
                print(render_status(status), flush=True)
            refreshes += 1
            if not args.watch or (args.count is not None and refreshes >= args.count):
                break
            try:
                time.sleep(args.watch)
            except KeyboardInterrupt:
                break
    return 0 if healthy else 1


PGBOUNCER_ADMIN_ENV = "SQLALCHEMY_SCALE_PGBOUNCER_ADMIN"


def _status_table(path: str) -> dict[str, Any]:
    from ._config import load_config

    table = load_config(path).get("status", {})
    return dict(table) if isinstance(table, dict) else {}


# -- recover (two-phase commits left prepared) ------------------------------------------------


def _add_recover_command(commands: Any) -> None:
    recover = commands.add_parser(
        "recover",
        help="commit or roll back two-phase transactions left prepared on the shards",
        description=(
            "Finish every sqlalchemy-scale two-phase transaction with a part prepared for at "
            "least --older-than seconds, by the decision recorded on the home shard: commit "
            "if the application recorded 'commit', else roll back. Safe to run at any time."
        ),
    )
    recover.add_argument("--config", default=os.environ.get("SQLALCHEMY_SCALE_CONFIG"))
    recover.add_argument("--section", default=None, help="TOML table holding the ShardSet")
    recover.add_argument(
        "--older-than", type=float, default=60.0, help="seconds prepared (default 60)"
    )
    recover.add_argument(
        "--dry-run", action="store_true", help="only list prepared transactions; change nothing"
    )


def run_recover(args: argparse.Namespace) -> int:
    from .sharding import ShardSet
    from .sharding.recovery import prepared_status, recover_prepared

    if not args.config:
        print(
            "sqlalchemy-scale recover: give --config FILE (or SQLALCHEMY_SCALE_CONFIG)",
            file=sys.stderr,
        )
        return 2
    if not args.older_than >= 0:
        print("sqlalchemy-scale recover: --older-than must be >= 0", file=sys.stderr)
        return 2
    with ShardSet.from_config(args.config, section=args.section) as shard_set:
        if args.dry_run:
            prepared = shard_set.prepared_transactions()
            print(
                _table(
                    ["shard", "gid", "age s", "owner"],
                    [[p.shard_id, p.gid, f"{p.age_seconds:.1f}", p.owner] for p in prepared],
                )
            )
            print(prepared_status(shard_set, older_than=args.older_than))
            return 0
        report = recover_prepared(shard_set, older_than=args.older_than)
        print(report)
        print(prepared_status(shard_set, older_than=args.older_than))
    return 0 if report.is_complete else 1


# -- demo -----------------------------------------------------------------------------------


class _Base(DeclarativeBase):
    pass


class DemoUser(_Base):
    __tablename__ = "demo_users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    #: The port of the server that executed the INSERT (a server default).
    written_on: Mapped[int] = mapped_column(server_default=text("inet_server_port()"))
    #: The port of the server that answered the SELECT that loaded this object.
    read_on: Mapped[int] = column_property(func.inet_server_port())


_WHERE = select(func.inet_server_port(), func.pg_is_in_recovery())


def run_demo(*, driver: str = "psycopg2", verbose: bool = False, keep: bool = False) -> int:
    from . import _demo
    from .local import LocalCluster, find_pgbouncer

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="  log: %(name)s %(levelname)s %(message)s",
    )
    if verbose:
        logging.getLogger("sqlalchemy_scale.routing").setLevel(logging.DEBUG)
    pgbouncer = find_pgbouncer() is not None
    print(
        "Starting a PostgreSQL primary with two streaming replicas and two shard servers"
        + (" behind PgBouncer" if pgbouncer else "")
        + " on 127.0.0.1 ..."
    )
    started = time.monotonic()
    cluster = LocalCluster(
        replicas=2, shards=2, pgbouncer="transaction" if pgbouncer else False
    ).start()
    kept = False
    try:
        print(f"  ready in {time.monotonic() - started:.1f} s\n")
        print(cluster.describe())
        names = {node.port: node.name for node in cluster.nodes}
        replica_set = ReplicaSet(
            primary=cluster.primary.url(driver),
            replicas=[r.url(driver) for r in cluster.replicas],
            monitor_interval=0.1,
        )
        reasons: list[str] = []
        replica_set.on_decision(lambda decision: reasons.append(decision.reason))
        with replica_set:
            report = _workload(replica_set, names, reasons)
            wrong = [f"{row[0]}: served by {row[1]}" for row in report if not _as_expected(row)]
            print("\nWhich server answered each step (asked of the server, not our bookkeeping):")
            print(
                _table(["step", "served by", "in recovery", "expected", "why (decision)"], report)
            )
            wrong += _demo.causal_act(cluster, replica_set, DemoUser, print)
            with replica_set.primary.engine.begin() as conn:
                _Base.metadata.drop_all(conn)
            stats = replica_set.stats()
        print("\nStatements routed per node (ReplicaSet.stats()):")
        print(
            _table(
                ["node", "statements", "fallbacks"],
                [[n, str(s["statements"]), str(s["fallbacks"])] for n, s in stats.items()],
            )
        )
        wrong += _demo.shard_act(cluster, driver, print)
        _demo.status_act(cluster, driver, print)
        if keep:
            _demo.keep_cluster(cluster, driver, print)
            kept = True
    finally:
        if not kept:
            cluster.stop()
    if not kept:
        print("\nAll servers stopped.", "Every step went where expected." if not wrong else "")
    elif not wrong:
        print("\nEvery step went where expected.")
    if wrong:
        print(f"UNEXPECTED results in {len(wrong)} step(s): {wrong}", file=sys.stderr)
        return 1
    return 0


def _as_expected(row: Sequence[str]) -> bool:
    served, expected = row[1], row[3]
    return expected == "any" or served.startswith(expected)


def _workload(
    replica_set: ReplicaSet, names: dict[int, str], reasons: list[str]
) -> list[list[str]]:
    Session = routing_sessionmaker(replica_set, expire_on_commit=False)
    rows: list[list[str]] = []

    def record(
        step: str, port: Any, in_recovery: Any, expected: str, why: str | None = None
    ) -> None:
        name = names.get(port, str(port))
        recovery = str(name != "primary") if in_recovery == "?" else str(bool(in_recovery))
        rows.append([step, name, recovery, expected, why or (reasons[-1] if reasons else "")])

    # Every step runs in one causal context, as a web request would: each read sees the
    # writes committed before it (exact read-your-writes by WAL position), served by a
    # replica once that replica has replayed them.
    with causal_context() as ctx:
        with Session() as session:
            _Base.metadata.create_all(session.connection())
            session.add_all([DemoUser(id=i, name=f"user{i}") for i in range(1, 21)])
            session.commit()
        insert_reason = reasons[-1] if reasons else ""  # the flush's decision
        with Session() as session:
            user = session.scalars(
                select(DemoUser).where(DemoUser.id == 1), execution_options={"use_primary": True}
            ).one()
            record(
                "INSERT 20 users (flush, commit)", user.written_on, False, "primary", insert_reason
            )
        print(f"\n  causal token after the insert: {ctx.token}")
        _wait_for_replay(replica_set, ctx.token)
        for i in range(2):
            with Session() as session:
                users = session.scalars(select(DemoUser).order_by(DemoUser.id)).all()
                record(f"SELECT users #{i + 1} (plain read)", users[0].read_on, True, "replica")
        with Session() as session:
            user = session.get(DemoUser, 7)
            assert user is not None
            record("session.get(DemoUser, 7)", user.read_on, True, "replica")
            user.name = "renamed"
            session.flush()
            record(
                "SELECT in the same transaction after UPDATE",
                *_row(session.execute(_WHERE).one()),
                "primary",
            )
            session.commit()
        with Session() as session:
            locked = session.scalars(
                select(DemoUser).where(DemoUser.id == 3).with_for_update()
            ).one()
            record("SELECT ... FOR UPDATE", locked.read_on, False, "primary")
            session.rollback()
        with Session() as session, session.use_primary():
            record(
                "SELECT inside session.use_primary()",
                *_row(session.execute(_WHERE).one()),
                "primary",
            )
        with Session() as session:
            record(
                "SELECT with execution_options(use_primary=True)",
                *_row(session.execute(_WHERE, execution_options={"use_primary": True}).one()),
                "primary",
            )
        with Session() as session:
            record(
                "text('SELECT ...') (unmarked text)",
                *_row(
                    session.execute(text("SELECT inet_server_port(), pg_is_in_recovery()")).one()
                ),
                "primary",
            )
        with Session() as session:
            renamed = session.get(DemoUser, 7)
            assert renamed is not None and renamed.name == "renamed"
            record("get(DemoUser, 7) right after the UPDATE", renamed.read_on, "?", "any")
        _wait_for_replay(replica_set, ctx.token)
        with Session() as session:
            renamed = session.get(DemoUser, 7)
            assert renamed is not None and renamed.name == "renamed"
            record("get(DemoUser, 7) once replicas replayed it", renamed.read_on, True, "replica")
    return rows


def _wait_for_replay(replica_set: ReplicaSet, token: str | None, timeout: float = 10.0) -> None:
    """Wait (bounded) until every replica has replayed ``token``, and say how long it took."""
    if token is None or replica_set.monitor is None:
        return
    position = parse_lsn(token)
    started = time.monotonic()
    pending = list(replica_set.replicas)
    while pending and time.monotonic() - started < timeout:
        pending = [node for node in pending if (replica_set.monitor.refresh(node) or 0) < position]
        if pending:
            time.sleep(0.001)
    waited = (time.monotonic() - started) * 1000
    state = "replayed" if not pending else "NOT replayed"
    print(f"  replicas {state} token {token} after {waited:.1f} ms")


def _row(row: Any) -> tuple[Any, Any]:
    """(port, in recovery) from a ``SELECT inet_server_port(), pg_is_in_recovery()`` row."""
    return row[0], row[1]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)), line]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join("  " + r.rstrip() for r in out)
