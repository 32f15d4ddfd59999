"""What every node of one local cluster shares: programs, the account the servers run
as, the superuser's credentials, the loopback address; and the error they all raise.

Private to :mod:`sqlalchemy_scale.local`; :class:`ClusterError` is re-exported there.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sqlalchemy.engine import URL

from sqlalchemy_scale.local import _process
from sqlalchemy_scale.local._process import RunAs
from sqlalchemy_scale.local.binaries import PgBinaries

PoolMode = Literal["transaction", "session"]
StopMode = Literal["fast", "immediate", "smart"]

HOST = "127.0.0.1"


class ClusterError(RuntimeError):
    """A local server or PgBouncer could not be set up, started, stopped or reached.

    The message names the node and its data directory and, when a server did
    not start, ends with the last lines of its log. It never holds a password.
    """


@dataclass(eq=False)
class Runtime:
    """What every node of one cluster shares: programs, account, credentials."""

    binaries: PgBinaries
    run_as: RunAs | None
    base_dir: Path
    socket_dir: Path
    user: str
    database: str
    password: str = field(repr=False)

    def run(
        self,
        args: Sequence[str],
        *,
        timeout: float = 60.0,
        env: Mapping[str, str] | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        try:
            return _process.run_program(
                args, run_as=self.run_as, cwd=self.base_dir, timeout=timeout, env=env, input=input
            )
        except subprocess.TimeoutExpired as exc:
            raise ClusterError(
                f"{Path(args[0]).name} did not finish within {timeout:.0f}s "
                f"({' '.join(args[1:3])} ...)"
            ) from exc
        except OSError as exc:
            raise ClusterError(self.cannot_run(args[0], exc)) from exc

    def cannot_run(self, program: str, exc: OSError) -> str:
        who = f" as user {self.run_as.name}" if self.run_as else ""
        hint = (
            f"; as root, servers run as {self.run_as.name}, who must be able to reach and run it"
            if self.run_as
            else ""
        )
        return f"could not run {program}{who}: {exc}{hint}"

    def program(self, name: str) -> str:
        return self.binaries.path(name)

    def write(self, path: Path, text: str, mode: int = 0o600) -> None:
        path.write_text(text)
        path.chmod(mode)
        _process.chown_tree(path, self.run_as)

    def url(self, port: int, driver: str, database: str | None) -> URL:
        return URL.create(
            f"postgresql+{driver}" if driver else "postgresql",
            username=self.user,
            password=self.password,
            host=HOST,
            port=port,
            database=database or self.database,
        )

    def connect(self, port: int, database: str, *, timeout: int = 5) -> Any:
        """An autocommit DB-API connection (psycopg2, else psycopg 3) as the cluster user."""
        return _process.connect(HOST, port, self.user, self.password, database, timeout=timeout)
