"""Run SQLAlchemy's own ``test/ext/test_horizontal_shard.py`` with ``ss.ShardedSession``.

Not collected by pytest (it needs a SQLAlchemy git checkout, which CI does not
have offline); run by hand when SQLAlchemy or the sharded session changes::

    python tests/compat/run_sqlalchemy_horizontal_shard.py /path/to/sqlalchemy.git [REF]

It exports the test file and SQLAlchemy's test scaffolding (``test/conftest.py``,
``test/requirements.py``, ``test/orm/_fixtures.py``, ``setup.cfg``,
``pyproject.toml``) at ``REF`` (default ``HEAD``; pick the tag of the installed
version when it exists) into a temporary directory, points its ``lib/sqlalchemy``
at the *installed* SQLAlchemy (whose ``sqlalchemy.testing`` plugin the suite
uses), replaces exactly one line, the import of SQLAlchemy's ``ShardedSession``,
with ``from sqlalchemy_scale import ShardedSession``, and runs pytest there. It
exits with pytest's status and fails if the import line is not found, so nothing
is skipped silently. SQLAlchemy's suite runs on SQLite files (its default
``--dburi``); its ``MultipleDialectShardTest`` needs ``--dburi postgresql://...``.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import sqlalchemy

TEST = "test/ext/test_horizontal_shard.py"
SCAFFOLDING = [
    TEST,
    "test/__init__.py",
    "test/conftest.py",
    "test/requirements.py",
    "test/ext/__init__.py",
    "test/orm/__init__.py",
    "test/orm/_fixtures.py",
    "setup.cfg",
    "pyproject.toml",
]
ORIGINAL = "from sqlalchemy.ext.horizontal_shard import ShardedSession\n"
OURS = "from sqlalchemy_scale import ShardedSession\n"


def main(checkout: str, ref: str = "HEAD", *pytest_args: str) -> int:
    root = Path(__file__).resolve().parents[2]
    archive = subprocess.run(
        ["git", "-C", checkout, "archive", ref, *SCAFFOLDING], check=True, capture_output=True
    ).stdout
    with tempfile.TemporaryDirectory(prefix="sa-horizontal-shard-") as tmp:
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        (Path(tmp) / "lib").mkdir()
        (Path(tmp) / "lib" / "sqlalchemy").symlink_to(Path(sqlalchemy.__file__).parent)
        test = Path(tmp) / TEST
        source = test.read_text()
        if source.count(ORIGINAL) != 1:
            print(f"{TEST} at {ref}: the ShardedSession import line was not found", file=sys.stderr)
            return 2
        test.write_text(source.replace(ORIGINAL, OURS))
        env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}
        command = [sys.executable, "-m", "pytest", TEST, "-p", "no:cacheprovider", "-rs"]
        return subprocess.run([*command, *pytest_args], cwd=tmp, env=env, check=False).returncode


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    sys.exit(main(*sys.argv[1:]))
