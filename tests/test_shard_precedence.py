"""The shard precedence as a table: which shards a statement runs on, and which rule decided
(no server: :func:`choose_shards` is pure).

Where statements really run under these rules is proven against real shards in
``test_sharding.py`` and ``test_shard_promises.py``.
"""

from __future__ import annotations

from typing import Any

import pytest

import sqlalchemy_scale as ss
from sqlalchemy_scale.sharding._precedence import NOT_GIVEN, ShardChoice, choose_shards

ALL = ("s0", "s1", "s2", "s3")

# (case, inputs, expected choice)
ROWS: list[tuple[str, dict[str, Any], ShardChoice]] = [
    # One row per rule.
    ("explicit shard id", {"explicit": "s2"}, ShardChoice(("s2",), "shard id")),
    ("shard_key", {"key_owner": "s1"}, ShardChoice(("s1",), "shard_key")),
    ("shard_key no shard owns", {"key_owner": None}, ShardChoice((), "shard_key")),
    ("instance", {"instance": "s3"}, ShardChoice(("s3",), "instance")),
    ("WHERE pruned to one", {"planned": ["s1"]}, ShardChoice(("s1",), "statement")),
    ("WHERE pruned to two", {"planned": ["s0", "s2"]}, ShardChoice(("s0", "s2"), "statement")),
    ("not narrowed", {}, ShardChoice(ALL, "fan-out")),
    ("planned on every shard", {"planned": list(ALL)}, ShardChoice(ALL, "fan-out")),
    # Rules that agree: the higher one is named.
    (
        "explicit and shard_key agree",
        {"explicit": "s1", "key_owner": "s1"},
        ShardChoice(("s1",), "shard id"),
    ),
    (
        "explicit and instance agree",
        {"explicit": "s3", "instance": "s3"},
        ShardChoice(("s3",), "shard id"),
    ),
    (
        "shard_key and WHERE agree",
        {"key_owner": "s2", "planned": ["s2"]},
        ShardChoice(("s2",), "shard_key"),
    ),
    (
        "shard_key within a WHERE of two shards",
        {"key_owner": "s2", "planned": ["s0", "s2"]},
        ShardChoice(("s2",), "shard_key"),
    ),
    (
        "shard_key and an unmergeable statement (not planned)",
        {"key_owner": "s0", "planned": None},
        ShardChoice(("s0",), "shard_key"),
    ),
    (
        "shard_key and instance agree",
        {"key_owner": "s1", "instance": "s1"},
        ShardChoice(("s1",), "shard_key"),
    ),
    (
        "instance beats the statement's narrowing",
        {"instance": "s1", "planned": ["s1"]},
        ShardChoice(("s1",), "instance"),
    ),
    # An explicit shard id means "only there": it wins over what the WHERE names (this is
    # how misplaced rows are found), and over a WHERE that finds nothing anywhere.
    (
        "explicit wins over WHERE pruning elsewhere",
        {"explicit": "s0", "planned": ["s3"]},
        ShardChoice(("s0",), "shard id"),
    ),
    (
        "shard_key and a WHERE no shard can match",
        {"key_owner": "s1", "planned": []},
        ShardChoice(("s1",), "shard_key"),
    ),
]

# (case, inputs, words the refusal must contain): two placements that disagree are refused.
CONFLICTS: list[tuple[str, dict[str, Any], str]] = [
    ("explicit vs shard_key", {"explicit": "s0", "key_owner": "s1"}, "shard_id='s0'"),
    ("explicit vs shard_key no shard owns", {"explicit": "s0", "key_owner": None}, "no shard"),
    ("explicit vs instance", {"explicit": "s0", "instance": "s2"}, "places them on 's2'"),
    ("shard_key vs instance", {"key_owner": "s1", "instance": "s2"}, "shard_key=7"),
    ("shard_key vs WHERE", {"key_owner": "s1", "planned": ["s3"]}, "selects rows of shard(s)"),
    (
        "shard_key vs WHERE of two other shards",
        {"key_owner": "s1", "planned": ["s0", "s3"]},
        "['s0', 's3']",
    ),
]


@pytest.mark.parametrize(("case", "inputs", "expected"), ROWS, ids=[r[0] for r in ROWS])
def test_each_rule_decides_in_precedence_order(
    case: str, inputs: dict[str, Any], expected: ShardChoice
) -> None:
    """The first rule of the precedence that applies decides the shards, and is named."""
    assert choose_shards(ALL, shard_key=7, **inputs) == expected


@pytest.mark.parametrize(("case", "inputs", "words"), CONFLICTS, ids=[c[0] for c in CONFLICTS])
def test_placements_that_disagree_are_refused(
    case: str, inputs: dict[str, Any], words: str
) -> None:
    """Two explicit placements naming different shards raise ShardKeyError (nothing runs)
    rather than one of them being silently preferred."""
    with pytest.raises(ss.ShardKeyError, match="disagree") as caught:
        choose_shards(ALL, shard_key=7, **inputs)
    assert words in str(caught.value)
    assert "nothing was run" in str(caught.value)


def test_no_shard_key_given_is_not_the_same_as_no_owner() -> None:
    """NOT_GIVEN (no shard_key= option) leaves the statement to the lower rules, while
    None (a key no shard owns) places it nowhere: a read of it finds nothing."""
    assert choose_shards(ALL, key_owner=NOT_GIVEN, planned=["s1"]).rule == "statement"
    assert choose_shards(ALL, key_owner=None, planned=["s1"]).shards == ()
