"""The ``sqlalchemy-scale`` command line: ``demo`` and ``status``.

``demo`` starts a real primary with two streaming replicas on 127.0.0.1 (the
local topology, :mod:`sqlalchemy_scale.local`), runs a small ORM workload through
a :class:`~sqlalchemy_scale.RoutingSession`, prints which server answered each
step (asked of the server itself: ``inet_server_port()``, ``pg_is_in_recovery()``),
and stops everything it started.

``status`` reads a topology from a TOML file (``--config``, or the
``SQLALCHEMY_SCALE_CONFIG`` environment variable) or from ``--primary`` /
``--replica`` URLs, and prints each node's server-reported role, state and lag.
Passwords are never printed.
"""

from __future__ import annotations

import argparse
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
        "demo", help="start a local primary + 2 replicas, run an ORM workload, report, stop"
    )
    demo.add_argument("--driver", default="psycopg2", choices=["psycopg2", "psycopg"])
    demo.add_argument("--verbose", action="store_true", help="log every routing decision")
    status = commands.add_parser("status", help="show each node's role, state and lag")
    status.add_argument("--config", default=os.environ.get("SQLALCHEMY_SCALE_CONFIG"))
    status.add_argument("--section", default=None, help="TOML table holding the ReplicaSet")
    status.add_argument("--primary", help="primary URL (instead of --config)")
    status.add_argument("--replica", action="append", default=[], help="replica URL (repeatable)")
    _add_alembic_init(commands)
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            return run_demo(driver=args.driver, verbose=args.verbose)
        if args.command == "alembic-init":
            return run_alembic_init(args)
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


# -- status ---------------------------------------------------------------------------------


def run_status(args: argparse.Namespace) -> int:
    if args.primary:
        replica_set = ReplicaSet(primary=args.primary, replicas=args.replica, monitor=False)
    elif args.config:
        replica_set = ReplicaSet.from_config(args.config, section=args.section)
    else:
        print(
            "sqlalchemy-scale status: give --config FILE (or SQLALCHEMY_SCALE_CONFIG) "
            "or --primary URL [--replica URL ...]",
            file=sys.stderr,
        )
        return 2
    with replica_set:
        rows = replica_set.health()
        urls = {node.name: node.url for node in replica_set.nodes}
    print(
        _table(
            [
                "node",
                "configured",
                "server says",
                "state",
                "lag bytes",
                "lag s",
                "url / last error",
            ],
            [
                [
                    h.name,
                    h.configured_role,
                    h.server_role or "?",
                    h.state,
                    "" if h.lag_bytes is None else str(h.lag_bytes),
                    "" if h.lag_seconds is None else f"{h.lag_seconds:.2f}",
                    h.last_error or urls[h.name],
                ]
                for h in rows
            ],
        )
    )
    return 0 if all(h.state != "down" for h in rows) else 1


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


def run_demo(*, driver: str = "psycopg2", verbose: bool = False) -> int:
    from .local import LocalCluster

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="  log: %(name)s %(levelname)s %(message)s",
    )
    if verbose:
        logging.getLogger("sqlalchemy_scale.routing").setLevel(logging.DEBUG)
    print("Starting a PostgreSQL primary and two streaming replicas on 127.0.0.1 ...")
    started = time.monotonic()
    with LocalCluster(replicas=2, shards=0, pgbouncer=False) as cluster:
        print(f"  ready in {time.monotonic() - started:.1f} s\n")
        print(cluster.describe())
        names = {node.port: node.name for node in cluster.nodes}
        replica_set = ReplicaSet(
            primary=cluster.primary.url(driver),
            replicas=[r.url(driver) for r in cluster.replicas],
            monitor_interval=0.1,
        )
        with replica_set:
            report = _workload(replica_set, names)
            stats = replica_set.stats()
    print("\nWhich server answered each step (asked of the server, not our bookkeeping):")
    print(_table(["step", "served by", "in recovery", "expected"], report))
    print("\nStatements routed per node (ReplicaSet.stats()):")
    print(
        _table(
            ["node", "statements", "fallbacks"],
            [[n, str(s["statements"]), str(s["fallbacks"])] for n, s in stats.items()],
        )
    )
    wrong = [row for row in report if not _as_expected(row)]
    print("\nAll servers stopped.", "Every step went where expected." if not wrong else "")
    if wrong:
        print(f"UNEXPECTED routing in {len(wrong)} step(s): {wrong}", file=sys.stderr)
        return 1
    return 0


def _as_expected(row: Sequence[str]) -> bool:
    served, expected = row[1], row[3]
    return expected == "any" or served.startswith(expected)


def _workload(replica_set: ReplicaSet, names: dict[int, str]) -> list[list[str]]:
    Session = routing_sessionmaker(replica_set, expire_on_commit=False)
    rows: list[list[str]] = []

    def record(step: str, port: Any, in_recovery: Any, expected: str) -> None:
        name = names.get(port, str(port))
        recovery = str(name != "primary") if in_recovery == "?" else str(bool(in_recovery))
        rows.append([step, name, recovery, expected])

    # Every step runs in one causal context, as a web request would: each read sees the
    # writes committed before it (exact read-your-writes by WAL position), served by a
    # replica once that replica has replayed them.
    with causal_context() as ctx:
        with Session() as session:
            _Base.metadata.create_all(session.connection())
            session.add_all([DemoUser(id=i, name=f"user{i}") for i in range(1, 21)])
            session.commit()
        with Session() as session:
            user = session.scalars(
                select(DemoUser).where(DemoUser.id == 1), execution_options={"use_primary": True}
            ).one()
            record("INSERT 20 users (flush, commit)", user.written_on, False, "primary")
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
    with replica_set.primary.engine.begin() as conn:
        _Base.metadata.drop_all(conn)
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
