"""A committing application for the two-phase recovery tests, run as its own process.

``python twophase_app.py CONFIG.json``: the JSON holds ``urls`` (shard id -> URL),
``kill_at`` (a protocol step name, or null) and ``marker`` (a file path). The
application moves 10 units from every shard's account 1 to a new row per shard in one
cross-shard transaction and commits it with two-phase commit. At the step ``kill_at``
it writes the step's name to ``marker`` and waits, so the test kills it (SIGKILL by
PID) at exactly that point of the protocol. Exits 0 after a commit.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from sqlalchemy import Integer, update
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlalchemy_scale.sharding import RangeSharding, ShardSet, _two_phase, sharded_sessionmaker


class Base(DeclarativeBase):
    pass


class Account(Base):
    """One account per (shard key, id); shard key k lives on shard k (RangeSharding)."""

    __tablename__ = "tpc_accounts"
    __shard_key__ = "k"

    k: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    balance: Mapped[int]


def shard_set(urls: dict[str, str]) -> ShardSet:
    """The ShardSet the application and the tests use: key i on the i-th shard."""
    return ShardSet(
        urls, strategy=RangeSharding(list(range(len(urls) + 1))), cross_shard_writes="two_phase"
    )


def transfer(shards: ShardSet) -> None:
    """One transaction on every shard: account 1 loses 10, a new account 2 gets them."""
    with sharded_sessionmaker(shards)() as session:
        for k in range(len(shards.shard_ids)):
            session.execute(
                update(Account)
                .where(Account.k == k, Account.id == 1)
                .values(balance=Account.balance - 10)
            )
            session.add(Account(k=k, id=2, balance=10))
        session.commit()


def main() -> int:
    config = json.loads(Path(sys.argv[1]).read_text())
    marker = Path(config["marker"])

    def hold_at(step: str) -> None:
        if step == config["kill_at"]:
            marker.write_text(step)
            time.sleep(120)  # the test kills this process here; bounded if it does not

    _two_phase._step_hook = hold_at
    with shard_set(config["urls"]) as shards:
        transfer(shards)
    print("committed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
