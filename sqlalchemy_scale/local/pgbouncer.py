"""PgBouncer in front of a local cluster's servers, run as our child process.

Relies on PgBouncer's SCRAM pass-through: the auth file holds the verifier read from
``pg_authid``, identical on every server because they all come from one template, so
PgBouncer can log in to each of them as the client did. Made by
:class:`~sqlalchemy_scale.local.LocalCluster`.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import URL

from sqlalchemy_scale.local import _process
from sqlalchemy_scale.local._runtime import HOST, ClusterError, PoolMode, Runtime

if TYPE_CHECKING:
    from sqlalchemy_scale.local.postgres import PgNode

__all__ = ["PgBouncerNode"]

log = logging.getLogger("sqlalchemy_scale.local")


class PgBouncerNode:
    """PgBouncer in front of the cluster's servers, run as our child process.

    Database ``app`` (the cluster's database) reaches the primary; a database
    named after a node (``shard0``, ``replica1``...) reaches that server.
    """

    def __init__(
        self, *, port: int, mode: PoolMode, config_path: Path, program: str, runtime: Runtime
    ) -> None:
        self.port = port
        self.host = HOST
        self.mode: PoolMode = mode
        self.config_path = config_path
        self._program = program
        #: Programs, account and credentials shared by the cluster's nodes.
        self.runtime = runtime
        self._proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"<PgBouncerNode {self.mode} {self.host}:{self.port} config={self.config_path}>"

    @property
    def log_file(self) -> Path:
        return self.config_path.with_name("pgbouncer.log")

    @property
    def pidfile(self) -> Path:
        return self.config_path.with_name("pgbouncer.pid")

    @property
    def pid(self) -> int | None:
        """PID of the running PgBouncer, or None."""
        return self._proc.pid if self.is_running() and self._proc else None

    def sa_url(self, driver: str = "psycopg2", *, database: str | None = None) -> URL:
        """SQLAlchemy URL through PgBouncer; ``database`` is ``app`` or a node name."""
        return self.runtime.url(self.port, driver, database)

    def url(self, driver: str = "psycopg2", *, database: str | None = None) -> str:
        """URL string with the password through PgBouncer."""
        return self.sa_url(driver, database=database).render_as_string(hide_password=False)

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start PgBouncer in the foreground as our child and wait until a query passes through it."""
        if self.is_running():
            return
        offset = _process.file_size(self.log_file)
        kwargs = self.runtime.run_as.popen_kwargs() if self.runtime.run_as else {}
        with self.log_file.open("ab") as log_fh:
            _process.chown_tree(self.log_file, self.runtime.run_as)
            try:
                self._proc = subprocess.Popen(
                    [self._program, str(self.config_path)],
                    cwd=self.config_path.parent,
                    env=_process.program_env(),
                    stdin=subprocess.DEVNULL,
                    stdout=log_fh,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # a terminal's Ctrl-C reaches us, and we stop it
                    **kwargs,
                )
            except OSError as exc:
                raise ClusterError(
                    "pgbouncer: " + self.runtime.cannot_run(self._program, exc)
                ) from exc
        last_error: list[str] = []

        def answers() -> bool:
            if self._proc is None or self._proc.poll() is not None:
                raise ClusterError(self._describe_failure("exited during startup", offset))
            try:
                rows = _process.query(
                    self.runtime.connect(self.port, self.runtime.database, timeout=2),
                    "SELECT 1",
                    None,
                )
            except Exception as exc:
                last_error[:] = [str(exc).strip()]
                return False
            return rows == [(1,)]

        if not _process.wait_until(answers, timeout=15, interval=0.1):
            self.kill()
            why = last_error[0] if last_error else "no answer"
            raise ClusterError(
                self._describe_failure(f"did not answer SELECT 1 within 15s ({why})", offset)
            )
        log.debug("started pgbouncer (%s) on port %d", self.mode, self.port)

    def stop(self) -> None:
        """Stop PgBouncer (SIGTERM, then SIGKILL after 10 s)."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log.warning("pgbouncer %d ignored SIGTERM for 10s; killing it", proc.pid)
                proc.kill()
                proc.wait(timeout=10)
        self._proc = None

    def kill(self) -> None:
        """SIGKILL PgBouncer (a simulated crash)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def admin(self, command: str) -> list[tuple[Any, ...]]:
        """Run an admin console command (``SHOW POOLS``, ``RELOAD``...) and return its rows."""
        return _process.query(self.runtime.connect(self.port, "pgbouncer"), command, None)

    def auth_file(self, user: str, verifier: str) -> str:
        """The ``auth_file`` line for ``user``: its SCRAM verifier, read from ``pg_authid``."""
        return f'"{_ini_quote(user)}" "{verifier}"\n'

    def config(
        self,
        databases: Mapping[str, PgNode],
        *,
        database: str,
        settings: Mapping[str, str | int],
    ) -> str:
        """``pgbouncer.ini``: each of ``databases`` reaches ``database`` on its node;
        ``settings`` override the ``[pgbouncer]`` defaults."""
        merged: dict[str, str | int] = {
            "listen_addr": HOST,
            "listen_port": self.port,
            "unix_socket_dir": "",
            "auth_type": "scram-sha-256",
            "auth_file": str(self.config_path.with_name("userlist.txt")),
            "admin_users": self.runtime.user,
            "pool_mode": self.mode,
            "default_pool_size": 10,
            "max_client_conn": 500,
            "server_reset_query": "DISCARD ALL",
            "ignore_startup_parameters": "extra_float_digits,options",
            "server_login_retry": 1,  # a restarted server is usable again within a second
            "pidfile": str(self.pidfile),
            **settings,
        }
        lines = ["; written by sqlalchemy_scale.local", "[databases]"]
        lines += [
            f"{name} = host={HOST} port={node.port} dbname={database}"
            for name, node in databases.items()
        ]
        lines += ["", "[pgbouncer]"]
        lines += [f"{key} = {value}" for key, value in merged.items()]
        return "\n".join(lines) + "\n"

    def address_in_use_since(self, offset: int) -> bool:
        """Whether the log, from byte ``offset`` on, says the port was taken."""
        return "Address already in use" in _process.tail(self.log_file, lines=50, since=offset)

    def _describe_failure(self, what: str, offset: int = 0) -> str:
        lines = _process.tail(self.log_file, since=offset) or "(log is empty)"
        return (
            f"pgbouncer: {what} (port {self.port}, config {self.config_path})\n"
            f"last lines of {self.log_file}:\n{lines}"
        )


def _ini_quote(value: str) -> str:
    return value.replace('"', '""')
