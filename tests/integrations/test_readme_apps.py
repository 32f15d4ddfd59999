"""The README's FastAPI and Flask apps, run as written against lagging replicas.

Each app is taken verbatim from its README block, given the topology's URLs, and driven
through its test client with replay paused on every replica: what a client writes it reads
in its next request; a client without the token reads a replica that lacks the write.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import SQLModel

from sqlalchemy_scale.local import LocalCluster, PgNode

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def forget_readme_tables() -> None:
    """Drop the README's SQLModel table from SQLModel's process-wide metadata, so the README
    (also run by tests/test_readme.py) can declare it again in this process."""
    if "note" in SQLModel.metadata.tables:
        SQLModel.metadata.remove(SQLModel.metadata.tables["note"])


def readme_app(first_line: str, cluster: LocalCluster, driver: str) -> dict[str, Any]:
    """Run the README block that starts with ``first_line``; return its namespace."""
    (block,) = [b for b in BLOCKS if b.startswith(first_line)]
    forget_readme_tables()
    namespace: dict[str, Any] = {
        "__name__": "readme_app",
        "PRIMARY_URL": cluster.primary.url(driver),
        "R1_URL": cluster.replicas[0].url(driver),
        "R2_URL": cluster.replicas[1].url(driver),
        "USERS_PRIMARY_URL": cluster.shards[0].url(driver),
        "USERS_REPLICA_URL": cluster.shard_replicas[0][0].url(driver),
    }
    exec(compile(block, f"README.md: {first_line}", "exec", dont_inherit=True), namespace)
    return namespace


@pytest.fixture
def fastapi_app(scale_cluster: LocalCluster, driver: str) -> Iterator[dict[str, Any]]:
    """The README's FastAPI app; its table and replica set go away after the test."""
    namespace = readme_app("# app.py: FastAPI + SQLModel", scale_cluster, driver)
    yield namespace
    namespace["replica_set"].dispose()
    scale_cluster.primary.execute("DROP TABLE IF EXISTS note")
    forget_readme_tables()


@pytest.fixture
def flask_app(scale_cluster: LocalCluster, driver: str) -> Iterator[dict[str, Any]]:
    """The README's Flask-SQLAlchemy app; its table and replica engines go away after the test."""
    namespace = readme_app("# app.py: Flask-SQLAlchemy", scale_cluster, driver)
    yield namespace
    namespace["scale"].dispose(namespace["app"])
    scale_cluster.primary.execute("DROP TABLE IF EXISTS post")


def test_the_readme_fastapi_app_reads_its_writes(
    fastapi_app: dict[str, Any], paused_replicas: LocalCluster
) -> None:
    """Each note the README's FastAPI app creates is returned by the client's next GET."""
    stale = 0
    with TestClient(fastapi_app["app"]) as client:
        for n in range(5):
            created = client.post("/notes", json={"body": f"readme {n}"})
            assert created.status_code == 200, created.text
            note = created.json()
            stale += client.get(f"/notes/{note['id']}").json() != note
        with TestClient(fastapi_app["app"]) as stranger:
            without = stranger.get(f"/notes/{note['id']}")
    assert stale == 0
    assert without.status_code == 200 and without.json() is None  # a paused replica answered


def test_the_readme_flask_app_shows_a_post_on_the_redirect(
    flask_app: dict[str, Any], paused_replicas: LocalCluster
) -> None:
    """Each form posted to the README's Flask app is shown on the page it redirects to."""
    client = flask_app["app"].test_client()
    stale = 0
    for n in range(5):
        page = client.post("/posts", data={"title": f"readme {n}"}, follow_redirects=True)
        stale += page.status_code != 200 or page.text != f"readme {n}"
    without = flask_app["app"].test_client().get(page.request.path)
    assert stale == 0
    assert without.status_code == 404  # a paused replica answered, without the post


@pytest.fixture
def two_bind_app(scale_cluster: LocalCluster, driver: str) -> Iterator[dict[str, Any]]:
    """The README's Flask app with two binds; its table and replica engines go away after."""
    namespace = readme_app("# app.py with two binds", scale_cluster, driver)
    scale_cluster.shard_replicas[0][0].wait_for_replay()  # the new table, before any pause
    yield namespace
    namespace["scale"].dispose(namespace["app"])
    scale_cluster.shards[0].execute("DROP TABLE IF EXISTS account")


def test_the_readme_two_bind_flask_app_shows_an_account_on_the_redirect(
    two_bind_app: dict[str, Any], paused_replicas: LocalCluster, paused: Callable[[PgNode], None]
) -> None:
    """Each account posted to the README's two-bind app (on its "users" bind) is shown on the
    page it redirects to, with replay paused on every replica of both binds."""
    for replica in paused_replicas.shard_replicas[0]:
        paused(replica)
    client = two_bind_app["app"].test_client()
    stale = 0
    for n in range(5):
        page = client.post("/accounts", data={"name": f"readme {n}"}, follow_redirects=True)
        stale += page.status_code != 200 or page.text != f"readme {n}"
    without = two_bind_app["app"].test_client().get(page.request.path)
    assert stale == 0
    assert without.status_code == 404  # the "users" bind's paused replica answered
