"""Benchmarks (run with ``python3 -m pytest benchmarks/... --benchmark-only -s``).

The real topology fixtures (``scale_cluster``, ``scale_cluster_factory``) come from
the ``sqlalchemy_scale.testing`` plugin, registered through the package's pytest11
entry point. ``seeded`` is the one way a benchmark module puts its rows on the primary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import pytest
from sqlalchemy import Table, create_engine
from sqlalchemy.orm import Session

from sqlalchemy_scale.local import LocalCluster

Seeder = Callable[[Sequence[Table], Sequence[Any]], AbstractContextManager[LocalCluster]]


@pytest.fixture(scope="session")
def seeded(scale_cluster: LocalCluster) -> Seeder:
    """``with seeded(tables, rows) as cluster:`` (re)creates ``tables`` on the primary, adds
    ``rows`` (ORM objects), waits until every replica has replayed them, and drops the
    tables afterwards."""

    @contextmanager
    def seed(tables: Sequence[Table], rows: Sequence[Any]) -> Iterator[LocalCluster]:
        engine = create_engine(scale_cluster.primary.url())
        try:
            for table in reversed(tables):
                table.drop(engine, checkfirst=True)
            for table in tables:
                table.create(engine)
            with Session(engine) as session:
                session.add_all(rows)
                session.commit()
            for replica in scale_cluster.replicas:
                replica.wait_for_replay()
            yield scale_cluster
        finally:
            for table in reversed(tables):
                table.drop(engine, checkfirst=True)
            engine.dispose()

    return seed
