"""Causal tokens as strings: one opaque token covering one or several primaries (no server).

Where reads carrying these tokens go is proven against real servers in
``test_consistency.py`` (one primary) and ``test_shard_promises.py`` (shards).
"""

from __future__ import annotations

import pytest

import sqlalchemy_scale as ss
from sqlalchemy_scale.consistency import (
    CausalContext,
    format_token,
    parse_token,
    reject_position,
)

# A ReplicaSet connects only when a statement runs: these never do.
_URL = "postgresql+psycopg2://app@127.0.0.1:9/app"


def test_a_plain_lsn_is_the_unscoped_position_and_formats_back_unchanged() -> None:
    """A one-primary token stays a plain PostgreSQL LSN, as RoutingSession has always made."""
    assert parse_token("0/16B3748") == {None: 0x16B3748}
    assert format_token({None: 0x16B3748}) == "0/16B3748"


@pytest.mark.parametrize(
    "positions",
    [
        {"s0": 0x10, "s1": 0x2_0000_0020},
        {None: 0x5, "orders": 0x7},
        {"a.b&c=d": 1, "ünï": 2, "%41": 3},
    ],
)
def test_a_token_covering_several_primaries_round_trips(positions: dict[str | None, int]) -> None:
    """Any scope names (even with '.', '&', '=', '%' or non-ASCII) survive formatting and
    parsing, and the token holds no '.', which signed tokens use as separator."""
    token = format_token(positions)
    assert token is not None and "." not in token
    assert parse_token(token) == positions


@pytest.mark.parametrize(
    "token",
    [
        "s0=",
        "s0=0/1&s0=0/2",
        "s0=0/1&",
        "%ff=0/1",
        "s0=0/1;x",
        "&".join(f"s{i}=0/1" for i in range(65)),
    ],
)
def test_malformed_tokens_are_refused(token: str) -> None:
    """A value that is not exactly scope=LSN pairs raises ConfigurationError, so a tampered
    cookie is never read as positions."""
    with pytest.raises(ss.ConfigurationError):
        parse_token(token)


def test_newer_token_takes_the_later_position_per_primary() -> None:
    """Merging two tokens keeps, for each primary, the later position, and every primary
    either token names."""
    merged = ss.newer_token("s0=0/30&s1=0/10", "s1=0/20&s2=0/5")
    assert merged is not None
    assert parse_token(merged) == {"s0": 0x30, "s1": 0x20, "s2": 0x5}
    assert ss.newer_token(None, "0/5") == "0/5"
    assert ss.newer_token("0/9", "0/5") == "0/9"


def test_a_context_advances_and_caps_each_primary_on_its_own() -> None:
    """A commit on one shard advances only that shard's position; a cap of one shard
    (a position no commit made) leaves the others alone."""
    ctx = CausalContext("s0=0/10")
    ctx.observe_position(0x40, "s1")
    ctx.observe_position(0x05, "s0")  # older: ignored
    assert ctx.position_for("s0") == 0x10 and ctx.position_for("s1") == 0x40
    assert ctx.position is None  # no unscoped position
    ctx.cap(0x30, "s1")
    assert dict(ctx.positions) == {"s0": 0x10, "s1": 0x30}
    assert ctx.token is not None and parse_token(ctx.token) == {"s0": 0x10, "s1": 0x30}


def test_a_position_rejected_for_one_primary_still_counts_for_another() -> None:
    """A position found ahead of one shard's primary is ignored for that shard only: the
    same WAL position is an ordinary commit of another shard."""
    position = 0x7_7777_0001
    reject_position(position, primary=0x10, where="'s0'", scope="tokens-s0")
    ctx = CausalContext()
    ctx.observe_position(position, "tokens-s0")
    ctx.observe_position(position, "tokens-s1")
    assert ctx.position_for("tokens-s0") is None
    assert ctx.position_for("tokens-s1") == position


def test_a_router_takes_its_own_primarys_part_of_a_token() -> None:
    """Given a token covering several shards, each shard's router honours only the
    position of its own scope (the ShardSet names each shard's scope by its id)."""
    shard_set = ss.ShardSet(
        {"s0": _URL, "s1": _URL.replace("/app", "/app1")}, strategy=ss.HashSharding(), monitor=False
    )
    try:
        assert [shard_set.replica_set(s).causal_scope for s in ("s0", "s1")] == ["s0", "s1"]
        token = "s0=0/10&s1=0/20"
        assert ss.Router(shard_set.replica_set("s0"), causal_token=token).causal_position() == 0x10
        assert ss.Router(shard_set.replica_set("s1"), causal_token=token).causal_position() == 0x20
        plain = ss.ReplicaSet(primary=_URL, monitor=False)
        try:
            assert plain.causal_scope is None
            assert ss.Router(plain, causal_token=token).causal_position() is None
            assert ss.Router(plain, causal_token="0/99").causal_position() == 0x99
        finally:
            plain.dispose()
    finally:
        shard_set.dispose()


def test_a_causal_scope_must_be_a_non_empty_string() -> None:
    """An empty scope would collide with the unscoped position: refused at construction."""
    with pytest.raises(ss.ConfigurationError, match="causal_scope"):
        ss.ReplicaSet(primary=_URL, causal_scope="", monitor=False)
