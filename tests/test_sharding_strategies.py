"""Sharding strategies and ShardSet placement: pure logic, no server."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlalchemy_scale.errors import ConfigurationError, ShardKeyError
from sqlalchemy_scale.sharding import (
    DirectorySharding,
    HashSharding,
    JumpHashSharding,
    RangeSharding,
    ShardSet,
    jump_hash,
    stable_hash64,
)
from sqlalchemy_scale.sharding._proof import shards_for_statement
from sqlalchemy_scale.sharding.strategies import canonical_bytes


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "strategies_accounts"
    __shard_key__ = "tenant"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant: Mapped[int]


# Nothing connects until a statement runs, so unreachable URLs are fine for placement tests.
URLS = {f"s{i}": f"postgresql+psycopg2://u:p@127.0.0.1:1/db{i}" for i in range(4)}
IDS = list(URLS)


def test_stable_hash_is_pinned_across_versions() -> None:
    """The 64-bit key hash never changes (it decides where existing rows live)."""
    assert stable_hash64(0) == 8859566273657638067
    assert stable_hash64(42) == 1027869399216032918
    assert stable_hash64(-7) == 12632659496833761288
    assert stable_hash64("alice") == 10594030175081054182
    assert stable_hash64("é") == 13454443680327794163
    assert stable_hash64(uuid.UUID(int=1)) == 484968669700867334


def test_equal_numbers_are_the_same_key() -> None:
    """5, 5.0 and Decimal('5') are equal in PostgreSQL, so they land on the same shard."""
    assert canonical_bytes(5) == canonical_bytes(5.0) == canonical_bytes(Decimal("5.00"))
    assert canonical_bytes("5") != canonical_bytes(5)
    assert canonical_bytes(Decimal("1.50")) == canonical_bytes(Decimal("1.5"))


@pytest.mark.parametrize("value", [True, float("nan"), object(), [1]])
def test_unsupported_key_values_raise_type_error(value: Any) -> None:
    """Booleans, NaN and arbitrary objects are not shard keys."""
    with pytest.raises(TypeError):
        canonical_bytes(value)


def test_jump_hash_matches_reference_vectors() -> None:
    """jump_hash agrees with the published reference implementation's test vectors."""
    assert jump_hash(1, 1) == 0
    assert jump_hash(42, 57) == 43
    assert jump_hash(0xDEAD10CC, 1) == 0
    assert jump_hash(0xDEAD10CC, 666) == 361
    assert jump_hash(256, 1024) == 520


def test_jump_hash_moves_keys_only_to_the_new_bucket() -> None:
    """Growing from N to N+1 buckets moves about 1/(N+1) of keys, all into bucket N."""
    keys = [stable_hash64(i) for i in range(20_000)]
    before = [jump_hash(k, 4) for k in keys]
    after = [jump_hash(k, 5) for k in keys]
    moved = [(b, a) for b, a in zip(before, after, strict=True) if a != b]
    assert all(a == 4 for _, a in moved)
    assert 0.17 < len(moved) / len(keys) < 0.23


@pytest.mark.parametrize("strategy", [HashSharding(), JumpHashSharding()])
def test_hash_strategies_spread_keys_evenly(strategy: Any) -> None:
    """Each of 4 shards gets 25% +/- 2% of 20,000 sequential keys."""
    counts = Counter(strategy(i, IDS) for i in range(20_000))
    assert set(counts) == set(IDS)
    assert all(4_600 < n < 5_400 for n in counts.values())


def test_hash_mod_moves_most_keys_when_a_shard_is_added() -> None:
    """Hash-mod from 4 to 5 shards moves about 4/5 of keys (why JumpHashSharding exists)."""
    five = [*IDS, "s4"]
    strategy = HashSharding()
    moved = sum(strategy(i, IDS) != strategy(i, five) for i in range(10_000))
    assert 0.75 < moved / 10_000 < 0.85


def test_range_sharding_places_by_bounds() -> None:
    """Shard i owns bounds[i] <= v < bounds[i+1]; values outside every range are not placed."""
    strategy = RangeSharding([0, 100, 200, 300, 400])
    assert strategy(0, IDS) == "s0"
    assert strategy(99, IDS) == "s0"
    assert strategy(100, IDS) == "s1"
    assert strategy(399, IDS) == "s3"
    assert strategy(400, IDS) is None
    assert strategy(-1, IDS) is None


def test_range_sharding_open_ends() -> None:
    """None as the first or last bound leaves that end open."""
    strategy = RangeSharding([None, "g", "n", "t", None])
    assert strategy("", IDS) == "s0"
    assert strategy("hello", IDS) == "s1"
    assert strategy("zzz", IDS) == "s3"


def test_range_sharding_rejects_bad_bounds() -> None:
    """Unsorted bounds, and a bounds count that does not match the shards, fail at construction."""
    with pytest.raises(ConfigurationError, match="ascending"):
        RangeSharding([0, 200, 100])
    with pytest.raises(ConfigurationError, match="3 ranges"):
        ShardSet(URLS, strategy=RangeSharding([0, 1, 2, 3]))


def test_directory_sharding_from_mapping_and_callable() -> None:
    """A mapping or a function can be the directory; unknown keys are not placed."""
    mapping = DirectorySharding({1: "s2", "acme": "s3"})
    assert mapping(1, IDS) == "s2"
    assert mapping(1.0, IDS) == "s2"
    assert mapping("acme", IDS) == "s3"
    assert mapping(2, IDS) is None
    function = DirectorySharding(lambda key: "s1" if key < 10 else None)
    assert function(3, IDS) == "s1"
    assert function(30, IDS) is None


def test_shard_key_error_names_model_column_and_value() -> None:
    """A value no shard owns raises ShardKeyError carrying the model, column and value."""
    shards = ShardSet(URLS, strategy=RangeSharding([0, 10, 20, 30, 40]))
    with pytest.raises(ShardKeyError, match=r"Order\.customer_id = 99") as info:
        shards.shard_for(99, model="Order", column="customer_id")
    assert (info.value.model, info.value.column, info.value.value) == ("Order", "customer_id", 99)
    with pytest.raises(ShardKeyError, match="missing"):
        shards.shard_for(None, model="Order", column="customer_id")
    with pytest.raises(ShardKeyError, match="not supported"):
        ShardSet(URLS, strategy=HashSharding()).shard_for(object(), model="O", column="k")


def test_plain_function_is_a_strategy() -> None:
    """Any function (value, shard_ids) -> shard id works as a strategy."""

    def by_parity(value: Any, shard_ids: Sequence[str]) -> str:
        return shard_ids[int(value) % 2]

    shards = ShardSet(URLS, strategy=by_parity)
    assert [shards.shard_for(v) for v in range(4)] == ["s0", "s1", "s0", "s1"]


def test_strategy_answering_an_unknown_shard_raises() -> None:
    """A strategy that names a shard the ShardSet does not have is an error, not a KeyError."""
    shards = ShardSet(URLS, strategy=lambda value, ids: "nowhere")
    with pytest.raises(ShardKeyError, match="unknown shard 'nowhere'"):
        shards.shard_for(1)


def test_shard_set_misconfiguration_raises_at_construction() -> None:
    """No shards, a non-callable strategy or a non-PostgreSQL URL raise ConfigurationError."""
    with pytest.raises(ConfigurationError):
        ShardSet({}, strategy=HashSharding())
    with pytest.raises(ConfigurationError):
        ShardSet(URLS, strategy="hash")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        ShardSet({"s0": "mysql://app:pw@127.0.0.1/app"}, strategy=HashSharding())


def test_placement_is_read_from_the_model_of_an_orm_statement() -> None:
    """The rule comes from ``__shard_key__`` even when the first lookup is an ORM statement's
    (annotated) table."""
    shards = ShardSet(URLS, strategy=RangeSharding([0, 10, 20, 30, 40]))
    assert shards_for_statement(select(Account).where(Account.tenant == 15), shards, None) == ["s1"]
    assert shards_for_statement(
        select(Account).where(Account.tenant.in_([1, 35])), shards, None
    ) == [
        "s0",
        "s3",
    ]
    assert shards_for_statement(select(Account).where(Account.id == 3), shards, None) == IDS
    assert shards.rule_for(Account.__table__) == ("key", "tenant")  # type: ignore[arg-type]
