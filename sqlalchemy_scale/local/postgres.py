"""One PostgreSQL server of a local cluster (primary, shard or streaming replica), driven
through ``pg_ctl`` and asked questions over TCP as the cluster's superuser.

Relies on ``pg_ctl start/stop/promote -w`` and ``postmaster.pid`` for process control
(SIGKILL only goes to a PID whose command line names our data directory),
``pg_stat_replication`` joined to ``pg_replication_slots`` to know a replica streams,
``pg_last_wal_replay_lsn()`` to wait for replay and ``pg_wal_replay_pause()`` /
``pg_get_wal_replay_pause_state()`` to make lag deterministic. Nodes are made by
:class:`~sqlalchemy_scale.local.LocalCluster`; not for production databases.
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL

from sqlalchemy_scale.consistency import format_lsn, reachable_position
from sqlalchemy_scale.local import _process
from sqlalchemy_scale.local._runtime import HOST, ClusterError, Runtime, StopMode

__all__ = ["PgNode"]

log = logging.getLogger("sqlalchemy_scale.local")

_LOG_NAME = "postgres.log"
# A statement in the server log: simple protocol ("statement: ...") or extended ("execute x: ...").
_LOGGED_SQL = re.compile(r"LOG:  (?:statement|execute [^:]*): (.*)")
NODE_CONF = "node.conf"


class PgNode:
    """One PostgreSQL server of a :class:`LocalCluster`: a primary, a shard or a replica.

    Nodes are created by the cluster; their methods drive the real server
    (``pg_ctl``) and ask it questions over TCP as the cluster's superuser.
    """

    def __init__(
        self,
        name: str,
        *,
        port: int,
        data_dir: Path,
        runtime: Runtime,
        upstream: PgNode | None = None,
    ) -> None:
        self.name = name
        self.port = port
        self.host = HOST
        self.data_dir = data_dir
        self.upstream = upstream
        self.is_replica = upstream is not None
        #: Programs, account and credentials shared by the cluster's nodes.
        self.runtime = runtime
        self._promoted = False

    def __repr__(self) -> str:
        return (
            f"<PgNode {self.name} ({self.role}) {self.host}:{self.port} data_dir={self.data_dir}>"
        )

    @property
    def role(self) -> str:
        """``primary``, ``replica of <upstream>`` or ``primary (promoted)``."""
        if self.upstream is not None:
            return f"replica of {self.upstream.name}"
        return "primary (promoted)" if self._promoted else "primary"

    # URLs ---------------------------------------------------------------

    def sa_url(self, driver: str = "psycopg2", *, database: str | None = None) -> URL:
        """SQLAlchemy URL for this server; ``driver`` as in ``postgresql+<driver>``."""
        return self.runtime.url(self.port, driver, database)

    def url(self, driver: str = "psycopg2", *, database: str | None = None) -> str:
        """URL string with the password, e.g. ``postgresql+psycopg2://scale:...@127.0.0.1:PORT/app``."""
        return self.sa_url(driver, database=database).render_as_string(hide_password=False)

    # process control ----------------------------------------------------

    @property
    def log_file(self) -> Path:
        """The server's log (``pg_ctl -l``), inside the data directory."""
        return self.data_dir / _LOG_NAME

    def statements_logged(self, work: Callable[[], object]) -> list[str]:
        """Run ``work`` and return the SQL statements the server logged meanwhile, in order
        (simple protocol ``statement: ...`` and extended ``execute <name>: ...`` lines).

        The connections ``work`` opens must log their statements: ``log_statement=all`` for
        the server (``settings=``) or per connection (libpq ``options="-c
        log_statement=all"``, asyncpg ``server_settings``)."""
        start = self.log_file.stat().st_size
        work()
        with self.log_file.open() as fh:
            fh.seek(start)
            found = [_LOGGED_SQL.search(line) for line in fh]
        return [match.group(1).strip() for match in found if match]

    @property
    def pid(self) -> int | None:
        """PID of the running postmaster, or None."""
        pid = _process.read_pid(self.data_dir / "postmaster.pid")
        if pid is not None and _process.pid_matches(pid, str(self.data_dir)):
            return pid
        return None

    def is_running(self) -> bool:
        """True if a postmaster for this data directory is alive."""
        return self.pid is not None

    def start(self, *, wait: bool = True) -> None:
        """Start the server (``pg_ctl start``); with ``wait`` until it accepts connections."""
        if self.is_running():
            return
        self._clear_stale_locks()
        offset = _process.file_size(self.log_file)
        waiting = ["-w", "-t", "60"] if wait else ["-W"]
        proc = self._pg_ctl("start", "-l", str(self.log_file), *waiting, timeout=60)
        if proc.returncode != 0:
            raise ClusterError(self._describe_failure("failed to start", proc, offset))
        log.debug("started %s on port %d", self.name, self.port)

    def stop(self, mode: StopMode = "fast") -> None:
        """Stop the server (``pg_ctl stop -m mode``), escalating to immediate, then SIGKILL."""
        if not self.is_running():
            self._clear_stale_locks()
            return
        proc = self._pg_ctl_stop(mode, timeout=30)
        if proc.returncode == 0 and not self.is_running():
            log.debug("stopped %s (%s)", self.name, mode)
            return
        log.warning(
            "%s: pg_ctl stop -m %s failed (%s); escalating", self.name, mode, proc.stderr.strip()
        )
        if mode != "immediate":
            self._pg_ctl_stop("immediate", timeout=15)
        if self.is_running():
            self.kill()
        if self.is_running():
            raise ClusterError(f"{self.name}: could not stop the server (data dir {self.data_dir})")

    def kill(self) -> None:
        """SIGKILL the postmaster (a simulated crash); its children exit by themselves.

        Returns once the postmaster and the children it had are gone, so that
        :meth:`start` can run crash recovery straight away.
        """
        pid = self.pid
        if pid is None:
            log.debug("kill %s: not running", self.name)
            return
        children = _process.children_of(pid)
        _process.signal_pid(pid, signal.SIGKILL)
        if not _process.wait_gone([pid, *children], timeout=15):
            raise ClusterError(
                f"{self.name}: postmaster {pid} or its children still alive 15s after SIGKILL "
                f"(data dir {self.data_dir})"
            )
        log.debug("killed %s (postmaster %d)", self.name, pid)

    def restart(self) -> None:
        """Stop (fast) and start the server."""
        self.stop()
        self.start()

    def _pg_ctl(self, command: str, *args: str, timeout: int) -> subprocess.CompletedProcess[str]:
        pg_ctl = self.runtime.program("pg_ctl")
        return self.runtime.run(
            [pg_ctl, command, "-D", str(self.data_dir), "-s", *args], timeout=timeout + 15
        )

    def _pg_ctl_stop(self, mode: StopMode, *, timeout: int) -> subprocess.CompletedProcess[str]:
        return self._pg_ctl("stop", "-m", mode, "-w", "-t", str(timeout), timeout=timeout)

    def _clear_stale_locks(self) -> None:
        # A postmaster killed with SIGKILL leaves its lock files behind; where
        # PID 1 does not reap orphans it is also a zombie whose PID still
        # "exists", and postgres would refuse to start over it.
        for lock in (
            self.data_dir / "postmaster.pid",
            self.runtime.socket_dir / f".s.PGSQL.{self.port}.lock",
        ):
            pid = _process.read_pid(lock)
            if pid is not None and not _process.pid_matches(pid, str(self.data_dir)):
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()
                    log.debug(
                        "%s: removed stale %s (PID %d is not ours)", self.name, lock.name, pid
                    )

    def _describe_failure(
        self, what: str, proc: subprocess.CompletedProcess[str] | None, offset: int = 0
    ) -> str:
        detail = (proc.stderr or proc.stdout).strip() if proc else ""
        lines = _process.tail(self.log_file, since=offset) or "(log is empty)"
        message = f"{self.name}: PostgreSQL {what} (port {self.port}, data dir {self.data_dir})"
        if detail:
            message += f"\n{detail}"
        return f"{message}\nlast lines of {self.log_file}:\n{lines}"

    def address_in_use_since(self, offset: int) -> bool:
        """Whether the log, from byte ``offset`` on, says the port was taken."""
        text = _process.tail(self.log_file, lines=50, since=offset)
        return "could not bind" in text or "Address already in use" in text

    def write_config(self, settings: Mapping[str, str | int]) -> None:
        """Write this node's ``node.conf`` (port, name, socket dir, ``settings``)."""
        lines = [
            f"# written by sqlalchemy_scale.local for node {self.name}",
            f"port = {self.port}",
            _process.render_setting("cluster_name", self.name),
            _process.render_setting("unix_socket_directories", str(self.runtime.socket_dir)),
            *(_process.render_setting(k, v) for k, v in settings.items()),
        ]
        self.runtime.write(self.data_dir / NODE_CONF, "\n".join(lines) + "\n")

    # replication ---------------------------------------------------------

    @property
    def slot_name(self) -> str:
        """Name of this replica's physical replication slot on its upstream."""
        return re.sub(r"[^a-z0-9_]", "_", self.name.lower())

    def _require_replica(self, action: str) -> PgNode:
        if not self.is_replica or self.upstream is None:
            raise ClusterError(f"{self.name}: {action} needs a replica, and this node is a primary")
        return self.upstream

    def pause_replay(self) -> None:
        """Pause WAL replay (``pg_wal_replay_pause()``) and wait until it is paused."""
        self._require_replica("pause_replay")
        self.execute("SELECT pg_wal_replay_pause()")
        if self.runtime.binaries.version >= 14:
            check = "SELECT pg_get_wal_replay_pause_state() = 'paused'"
        else:
            check = "SELECT pg_is_wal_replay_paused()"
        if not _process.wait_until(lambda: bool(self.execute(check)[0][0]), timeout=10):
            raise ClusterError(
                f"{self.name}: WAL replay still not paused after 10s (data dir {self.data_dir})"
            )

    def resume_replay(self) -> None:
        """Resume WAL replay (``pg_wal_replay_resume()``)."""
        self._require_replica("resume_replay")
        self.execute("SELECT pg_wal_replay_resume()")

    def promote(self) -> None:
        """Promote this replica to a primary (``pg_ctl promote -w``)."""
        self._require_replica("promote")
        proc = self._pg_ctl("promote", "-w", "-t", "60", timeout=60)
        if proc.returncode != 0:
            raise ClusterError(self._describe_failure("was not promoted", proc))
        self.is_replica = False
        self.upstream = None
        self._promoted = True
        log.info("promoted %s to primary", self.name)

    def wait_for_replay(self, lsn: str | None = None, timeout: float = 10.0) -> None:
        """Wait until this replica has replayed ``lsn``.

        :param lsn: target position; by default everything the upstream had
          flushed when called (``pg_current_wal_flush_lsn()``; the insert position
          under ``synchronous_commit=off``, so unflushed commits count). WAL that
          is inserted but not flushed (e.g. page pruning by a SELECT) is not waited
          for: it is not sent to replicas until the next flush.
        :param timeout: seconds before :class:`ClusterError`.
        """
        upstream = self._require_replica("wait_for_replay")
        target = lsn if lsn is not None else upstream.reachable_lsn()
        done = "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn"
        if not _process.wait_until(lambda: bool(self.execute(done, (target,))[0][0]), timeout):
            replayed = self.execute("SELECT pg_last_wal_replay_lsn()")[0][0]
            raise ClusterError(
                f"{self.name}: replay reached {replayed}, not {target}, within {timeout}s "
                f"(data dir {self.data_dir}; is replay paused?)"
            )

    def reachable_lsn(self) -> str:
        """The WAL position a replica of this server can reach now (see :meth:`wait_for_replay`)."""
        lsn, block = self.execute(
            "SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()"
            " WHEN current_setting('synchronous_commit') = 'off' THEN pg_current_wal_insert_lsn()"
            " ELSE pg_current_wal_flush_lsn() END, current_setting('wal_block_size')::int"
        )[0]
        # A position just past a fresh page's header is the page boundary to a replica.
        return format_lsn(reachable_position(lsn, block))

    def wait_for_streaming(self, timeout: float = 30.0) -> None:
        """Wait until the upstream's ``pg_stat_replication`` shows this replica streaming."""
        upstream = self._require_replica("wait_for_streaming")
        sql = (
            "SELECT r.state FROM pg_replication_slots s"
            " JOIN pg_stat_replication r ON r.pid = s.active_pid WHERE s.slot_name = %s"
        )
        last_error: list[str] = []

        def streaming() -> bool:
            if not self.is_running():
                raise ClusterError(
                    self._describe_failure("stopped while waiting for streaming", None)
                )
            try:
                rows = upstream.execute(sql, (self.slot_name,))
            except Exception as exc:  # upstream restarting: keep waiting
                last_error[:] = [str(exc).strip()]
                return False
            return bool(rows) and rows[0][0] == "streaming"

        if not _process.wait_until(streaming, timeout, interval=0.1):
            why = f"; last error from {upstream.name}: {last_error[0]}" if last_error else ""
            raise ClusterError(
                self._describe_failure(
                    f"is not streaming from {upstream.name} (slot {self.slot_name}) after {timeout:.0f}s{why}",
                    None,
                )
            )

    # SQL -------------------------------------------------------------------

    def execute(
        self,
        sql: str,
        params: Sequence[Any] | Mapping[str, Any] | None = None,
        *,
        database: str | None = None,
    ) -> list[tuple[Any, ...]]:
        """Run one statement on a short-lived autocommit connection; return its rows."""
        conn = self.runtime.connect(self.port, database or self.runtime.database)
        return _process.query(conn, sql, params)
