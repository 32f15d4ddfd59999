"""The runner of SQLAlchemy's own test_horizontal_shard.py refuses rather than run the wrong
thing: the import it swaps must be there exactly once, and the sdist must hold every file
it extracts.

Server-free and offline: the sdist here is a small archive made by the test (the real
download and run are ``nox -s horizontal_shard``).
"""

from __future__ import annotations

import importlib.util
import io
import sys
import tarfile
from pathlib import Path
from types import ModuleType

import pytest

RUNNER = Path(__file__).parent / "compat" / "run_sqlalchemy_horizontal_shard.py"


def _load_runner() -> ModuleType:
    spec = importlib.util.spec_from_file_location("run_sqlalchemy_horizontal_shard", RUNNER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


runner = _load_runner()


def _sdist(path: Path, files: dict[str, str]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"sqlalchemy-9.9.9/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("copies", [0, 2])
def test_the_import_line_must_be_there_exactly_once(tmp_path: Path, copies: int) -> None:
    """A test file without SQLAlchemy's ShardedSession import, or with it twice, stops the run
    and is left as it was."""
    test = tmp_path / "test_horizontal_shard.py"
    source = "import os\n" + runner.ORIGINAL * copies
    test.write_text(source)
    with pytest.raises(runner.RunnerError, match=f"found {copies} times, not once"):
        runner.use_our_sharded_session(test)
    assert test.read_text() == source


def test_the_import_line_is_the_only_line_changed(tmp_path: Path) -> None:
    """With the import there once, that line and no other becomes the import of ours."""
    test = tmp_path / "test_horizontal_shard.py"
    test.write_text("import os\n" + runner.ORIGINAL + "x = ShardedSession\n")
    runner.use_our_sharded_session(test)
    assert test.read_text() == "import os\n" + runner.OURS + "x = ShardedSession\n"


def test_an_sdist_without_the_scaffolding_is_refused(tmp_path: Path) -> None:
    """An sdist that lacks a file the run needs is refused, naming it, and nothing is written."""
    files = dict.fromkeys(runner.SCAFFOLDING, "")
    del files["test/orm/_fixtures.py"]
    sdist = _sdist(tmp_path / "sqlalchemy-9.9.9.tar.gz", files)
    dest = tmp_path / "tree"
    dest.mkdir()
    with pytest.raises(runner.RunnerError, match=r"lacks test/orm/_fixtures\.py"):
        runner.extract(sdist, dest)
    assert list(dest.iterdir()) == []


def test_the_scaffolding_is_extracted_without_the_top_directory(tmp_path: Path) -> None:
    """Every scaffolding file lands at its path under the tree, and nothing else does."""
    files = {name: f"# {name}\n" for name in runner.SCAFFOLDING}
    files["lib/sqlalchemy/__init__.py"] = "# not taken: the installed SQLAlchemy is used\n"
    sdist = _sdist(tmp_path / "sqlalchemy-9.9.9.tar.gz", files)
    dest = tmp_path / "tree"
    dest.mkdir()
    runner.extract(sdist, dest)
    found = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert found == sorted(runner.SCAFFOLDING)
    assert (dest / runner.TEST).read_text() == f"# {runner.TEST}\n"


def test_a_cached_sdist_is_found_whatever_the_case_of_its_name(tmp_path: Path) -> None:
    """SQLAlchemy-2.0.x.tar.gz (older releases) and sqlalchemy-2.1.x.tar.gz are both found in
    the cache, so nothing is downloaded again."""
    old = tmp_path / "SQLAlchemy-2.0.1.tar.gz"
    new = tmp_path / "sqlalchemy-2.1.9.tar.gz"
    old.touch()
    new.touch()
    assert runner.fetch_sdist("2.0.1", tmp_path) == old
    assert runner.fetch_sdist("2.1.9", tmp_path) == new
