"""The health monitor: fork safety and what health() reports for a node that is down."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from typing import Any

from sqlalchemy import func, select

import sqlalchemy_scale as ss
from sqlalchemy_scale.local import LocalCluster, PgNode

WHERE = select(func.inet_server_port(), func.pg_is_in_recovery())
WHERE_PID = select(func.inet_server_port(), func.pg_backend_pid())


def _child(replica_set: ss.ReplicaSet, conn: Any) -> None:
    try:
        monitor = replica_set.monitor
        assert monitor is not None
        with ss.routing_sessionmaker(replica_set)() as session:
            port, backend = session.execute(WHERE_PID).one()
        conn.send((os.getpid(), monitor.is_running, port, backend))
    except BaseException as exc:  # report, never hang the parent
        conn.send(repr(exc))
    finally:
        conn.close()


def test_monitor_restarts_in_a_forked_child(
    scale_cluster: LocalCluster, replicas: ss.ReplicaSet
) -> None:
    """After os.fork() (gunicorn --preload), the child runs its own monitor and reads from
    a replica over its own connections, not the parent's pooled sockets."""
    parent_backends = set()
    for _ in range(2):  # starts the monitor and leaves a pooled connection to each replica
        with ss.routing_sessionmaker(replicas)() as session:
            parent_backends.add(session.execute(WHERE_PID).one()[1])
    assert replicas.monitor is not None and replicas.monitor.is_running
    context = multiprocessing.get_context("fork")
    parent_end, child_end = context.Pipe()
    process = context.Process(target=_child, args=(replicas, child_end))
    process.start()
    assert parent_end.poll(30), "the child did not answer within 30 s"
    answer = parent_end.recv()
    process.join(10)
    assert isinstance(answer, tuple), answer
    pid, monitor_running, port, backend = answer
    print(f"\nchild {pid}: monitor running={monitor_running}, read served by port {port}")
    assert pid != os.getpid()
    assert backend not in parent_backends  # its own connection, not the parent's socket
    assert monitor_running
    assert port in {r.port for r in scale_cluster.replicas}
    with ss.routing_sessionmaker(replicas)() as session:  # the parent's pool still works
        assert session.execute(WHERE).one()[1] is True


def test_health_names_the_error_of_a_down_replica(
    scale_cluster: LocalCluster, replicas: ss.ReplicaSet, scale_restart: Callable[[PgNode], None]
) -> None:
    """health() shows a stopped replica as down, out of rotation, with its error, no password."""
    victim = scale_cluster.replicas[1]
    scale_restart(victim)
    victim.stop()
    report = {h.name: h for h in replicas.health()}
    down = report["replica2"]
    assert down.state == "down" and not down.in_rotation
    assert down.last_error is not None and "OperationalError" in down.last_error
    assert report["replica1"].state == "up" and report["replica1"].in_rotation
    assert scale_cluster.password not in repr(report)
    with ss.routing_sessionmaker(replicas)() as session:
        assert session.execute(WHERE).one()[0] == scale_cluster.replicas[0].port
