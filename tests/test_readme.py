"""Every ``python`` block of the README runs, in order, against the real topology."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import String, create_engine, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlmodel import SQLModel

from sqlalchemy_scale.local import LocalCluster

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "readme_users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50), default="someone")


class ShardBase(DeclarativeBase):
    """The README's sharding example declares its models on ``Base``."""


class Response:
    """Stands in for a web framework's response in the causal_context example."""

    def __init__(self) -> None:
        self.cookies: dict[str, Any] = {}

    def set_cookie(self, name: str, value: Any) -> None:
        self.cookies[name] = value


@pytest.fixture(scope="module")
def namespace(scale_cluster: LocalCluster, driver: str) -> Iterator[dict[str, Any]]:
    engine = create_engine(scale_cluster.primary.url(driver))
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    for replica in scale_cluster.replicas:
        replica.wait_for_replay()
    ns: dict[str, Any] = {
        "__name__": "readme",  # Flask(__name__) needs a module name that is not builtins
        "PRIMARY_URL": scale_cluster.primary.url(driver),
        "R1_URL": scale_cluster.replicas[0].url(driver),
        "R2_URL": scale_cluster.replicas[1].url(driver),
        # The asyncio example's async URLs: asyncpg beside psycopg2, psycopg async beside psycopg.
        **{
            f"ASYNC_{name}_URL": node.url("asyncpg" if driver == "psycopg2" else "psycopg_async")
            for name, node in zip(
                ("PRIMARY", "R1", "R2"),
                [scale_cluster.primary, *scale_cluster.replicas],
                strict=False,
            )
        },
        "select": select,
        "text": text,
        "User": User,
        "token_from_cookie": None,
        "Base": ShardBase,
        "Mapped": Mapped,
        "mapped_column": mapped_column,
        **{f"S{i}_URL": shard.url(driver) for i, shard in enumerate(scale_cluster.shards)},
        # The Flask app with two binds: its "users" bind is shard0 and its replica.
        "USERS_PRIMARY_URL": scale_cluster.shards[0].url(driver),
        "USERS_REPLICA_URL": scale_cluster.shard_replicas[0][0].url(driver),
        "response": Response(),
    }
    yield ns
    if "replicas" in ns:
        ns["replicas"].dispose()
    if "shards" in ns:
        for shard_id in ns["shards"]:
            ShardBase.metadata.drop_all(ns["shards"].replica_set(shard_id).primary.engine)
        ns["shards"].dispose()
    if "replica_set" in ns:  # the FastAPI app's
        ns["replica_set"].dispose()
    if "scale" in ns:  # the Flask app's
        ns["scale"].dispose(ns["app"])
    with engine.begin() as conn:  # the web apps' tables
        conn.exec_driver_sql("DROP TABLE IF EXISTS note, post")
    scale_cluster.shards[0].execute("DROP TABLE IF EXISTS account")  # the two-bind app's
    if "Note" in ns:  # SQLModel's metadata is process-wide: let the README declare it again
        SQLModel.metadata.remove(ns["Note"].__table__)
    Base.metadata.drop_all(engine)
    engine.dispose()


def test_readme_has_the_examples() -> None:
    """The README keeps its quick start, routing tour and causal example."""
    assert len(BLOCKS) >= 3
    assert "ss.ReplicaSet(" in BLOCKS[0] and "routing_sessionmaker" in BLOCKS[0]


def test_readme_blocks_run_in_order(namespace: dict[str, Any]) -> None:
    """The README's python blocks run as written, in order, as a reader would run them."""
    for index, block in enumerate(BLOCKS):
        if "ss_flask.Scale(app" in block and "scale" in namespace:
            namespace["scale"].dispose(namespace["app"])  # a second Flask app replaces the first
        code = compile(block, f"README.md python block {index}", "exec", dont_inherit=True)
        exec(code, namespace)
        if index == 0:  # the quick start's one read went to a replica
            stats = namespace["replicas"].stats()
            assert stats["primary"]["statements"] == 0
            assert sum(s["statements"] for name, s in stats.items() if name != "primary") == 1
