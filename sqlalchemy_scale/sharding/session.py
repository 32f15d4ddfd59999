"""Shard sessions: SQLAlchemy's horizontal_shard ShardedSession with choosers derived from models.

A model names its shard key (``__shard_key__ = "customer_id"``) and the
:class:`~sqlalchemy_scale.ShardSet`'s strategy maps key values to shards;
:class:`ShardedSession` derives horizontal_shard's three choosers from that,
so applications write none. What it adds to horizontal_shard:

* inserts route by the instance's key; a missing or unplaceable key raises
  :class:`~sqlalchemy_scale.ShardKeyError` in ``before_flush``, before any SQL;
* statements whose WHERE pins the key (``==``, ``IN``) run only on the owning
  shards; ``execution_options(shard_key=v)`` and ``session.get(Model, pk,
  shard_key=v)`` route explicitly; ``set_shard_id``, ``shard_id`` and
  ``bind_arguments={"shard_id": ...}`` keep working;
* every statement is first proven to need only the shards it runs on
  (:func:`~sqlalchemy_scale.sharding._proof.prove`: co-located joins,
  subqueries correlated on the key or pruned to the same shard), else it raises
  :class:`~sqlalchemy_scale.CrossShardQueryError` before anything runs;
* other SELECTs fan out to every shard *concurrently* and are merged into one
  database's answer (:mod:`~sqlalchemy_scale.sharding.planner`,
  :mod:`~sqlalchemy_scale.sharding.fanout`); ``SELECT EXISTS`` is the OR of the
  shards' answers, ``Query.count()`` counts merged rows, and a bulk write of a
  global table reports one copy's rowcount;
* reads of a key no shard owns (a range gap, a directory miss) find nothing,
  and ``get()`` returns None, as one database would;
* inside a shard that is a :class:`~sqlalchemy_scale.ReplicaSet`, reads and
  writes are routed by a :class:`~sqlalchemy_scale.Router` per shard, the one
  under RoutingSession, so the rules are the same, not a copy: lag and health
  rotation, causal tokens (one token covers every shard, each shard's position
  under its id), the retry of a transaction's first read on another node after a
  replica failed, :class:`~sqlalchemy_scale.NodeUnavailableError` naming the shard
  and node in the middle of a transaction;
* a transaction that writes to two shards follows the ShardSet's
  ``cross_shard_writes``: ``"refuse"`` raises :class:`~sqlalchemy_scale.CrossShardWriteError`
  before the second shard is written, ``"two_phase"`` commits with two-phase commit,
  ``"best_effort"`` commits shard by shard and raises
  :class:`~sqlalchemy_scale.PartialCommitError` naming what committed when one fails;
  a connection lost during a shard's COMMIT (or COMMIT PREPARED) raises
  :class:`~sqlalchemy_scale.CommitOutcomeUnknown` naming the shard (:mod:`._commit`);
* global tables (``__shard__ = "all"``) are written to every shard and read
  from the ShardSet's home shard (:mod:`._global_tables`); ``__shard__ = "<shard id>"``
  pins a table.

Where each part lives: this module is the session (choosers, ``get_bind``,
``connection()``, the per-shard routers, retries); :mod:`._precedence` decides the
shards of a statement, :mod:`._execute` runs it there (an ORM bulk INSERT/UPDATE, rows
given as parameters, row by row on their shards: :mod:`._bulk`), :mod:`._commit` ends the
transaction.

Fan-out reads inside a session transaction run on the session's own
connection for each shard (one connection per shard, each used by one worker
thread while the calling thread waits): they see the transaction's own
uncommitted writes and its isolation level, exactly as a non-sharded session
would. Running them on fresh connections would be faster to set up but would
silently read other snapshots.

When *not* to use it: data that fits one server (sharding costs joins,
unique constraints and transactions across shards), and queries that need
DISTINCT, window functions, joins across shard keys or subqueries over all
shards (global averages, top-N lists) in one statement.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from sqlalchemy import event, inspect
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext import horizontal_shard
from sqlalchemy.orm import Mapper, ORMExecuteState, Session, SessionTransaction, sessionmaker
from sqlalchemy.orm.state import InstanceState
from sqlalchemy.sql.elements import ClauseElement

from .._sa import is_flushing, without_connection_callable
from ..consistency import CausalContext, format_token, parse_token
from ..errors import (
    ConfigurationError,
    CrossShardQueryError,
    CrossShardWriteError,
    NodeUnavailableError,
    render_url,
)
from ..router import Router, bound_statement_writes, drop_kept_connection, use_primary
from ..routing import CALL_OPTIONS
from ..topology import Role
from . import _commit, _global_tables
from ._commit import ShardWrites, is_late_write
from ._execute import execute_statement
from ._global_tables import GLOBAL_COPY
from ._keys import key_attr, key_column, read_owners
from ._precedence import choose_shards
from ._proof import Proof, prove, shards_for_statement
from ._shard_set import ShardRule, ShardSet, rule_for_mapper
from ._user_choosers import execute_with_user_choosers
from .strategies import ShardId

__all__ = ["ShardedSession", "set_shard_id", "sharded_sessionmaker"]

log = logging.getLogger("sqlalchemy_scale.sharding")

set_shard_id = horizontal_shard.set_shard_id

_UNKNOWN: Any = object()


class ShardedSession(horizontal_shard.ShardedSession):
    """A horizontal_shard :class:`~sqlalchemy.ext.horizontal_shard.ShardedSession`
    whose choosers come from ``__shard_key__`` and a :class:`~sqlalchemy_scale.ShardSet`,
    or, given SQLAlchemy's own arguments, a drop-in for horizontal_shard's.

    Built one of two ways (not both):

    * ``ShardedSession(shard_set=ShardSet(...))``: the choosers are derived from the
      models and the ShardSet's strategy, statements are proven to need only the shards
      they run on, fan-outs are merged into one database's answer, and each shard is
      routed to its primary or replicas (the rest of this class);
    * ``ShardedSession(shard_chooser=..., identity_chooser=..., execute_chooser=...,
      shards={...})``: exactly SQLAlchemy's horizontal_shard (``set_shard_id``,
      ``Query.set_shard()``, ``bind_arguments={"shard_id": ...}``, identity tokens, the
      deprecated ``id_chooser``/``query_chooser`` with SQLAlchemy's warnings), on any
      engines, with the shards of a fan-out SELECT queried concurrently and concatenated
      as horizontal_shard does (see :mod:`~sqlalchemy_scale.sharding._user_choosers`).

    :param shard_chooser: SQLAlchemy's ``shard_chooser`` (user-chooser sessions only).
    :param identity_chooser: SQLAlchemy's ``identity_chooser``.
    :param execute_chooser: SQLAlchemy's ``execute_chooser``.
    :param shards: shard id -> :class:`~sqlalchemy.engine.Engine`, as SQLAlchemy's.
    :param query_cls: as SQLAlchemy's (default its ``ShardedQuery``, with ``set_shard()``).
    :param shard_set: the shards and the strategy placing keys on them.
    :param default_role: inside each shard of a ``shard_set``, ``"replica"`` (default)
        routes plain reads to the shard's replicas, ``"primary"`` keeps everything on its
        primary unless a statement says ``use_replica=True`` (as in RoutingSession).
    :param causal_token: a causal token (one opaque string, as :attr:`causal_token`
        returns): inside each shard, reads go only to replicas that have replayed that
        shard's position in it, else to the shard's primary.
    :param id_chooser: deprecated by SQLAlchemy 2.0 (use ``identity_chooser``); warns.
    :param query_chooser: deprecated by SQLAlchemy 1.4 (use ``execute_chooser``); warns.

    Other keyword arguments are :class:`~sqlalchemy.orm.Session`'s. Build it with
    :func:`sharded_sessionmaker`, or ``sessionmaker(class_=ss.ShardedSession, ...)``.

    .. versionadded:: 0.1

    .. versionchanged:: 0.3
        Accepts horizontal_shard's arguments instead of ``shard_set``; ``causal_token``.
    """

    def __init__(
        self,
        shard_chooser: Any = None,
        identity_chooser: Any = None,
        execute_chooser: Any = None,
        shards: Mapping[str, Any] | None = None,
        query_cls: Any = horizontal_shard.ShardedQuery,
        *,
        shard_set: ShardSet | None = None,
        default_role: Role = "replica",
        causal_token: str | None = None,
        id_chooser: Any = None,
        query_chooser: Any = None,
        **kw: Any,
    ) -> None:
        sa_arguments = {
            "shard_chooser": shard_chooser,
            "identity_chooser": identity_chooser,
            "execute_chooser": execute_chooser,
            "shards": shards,
            "id_chooser": id_chooser,
            "query_chooser": query_chooser,
        }
        given = sorted(name for name, value in sa_arguments.items() if value is not None)
        if shard_set is None and given:
            if causal_token is not None:
                raise ConfigurationError(
                    "causal_token= needs a ShardedSession built with shard_set= (a "
                    "user-chooser session's shards are plain engines, with no replicas)"
                )
            #: True when built with SQLAlchemy's choosers rather than a ShardSet.
            self.has_user_choosers = True
            self._twophase = False
            super().__init__(
                shard_chooser,
                identity_chooser,
                execute_chooser,
                dict(shards) if shards is not None else None,
                query_cls,
                id_chooser=id_chooser,
                query_chooser=query_chooser,
                **kw,
            )
            #: What the current transaction has written, and the state of its commit.
            self.shard_writes = ShardWrites(
                None, {id(e): str(k) for k, e in (shards or {}).items()}
            )
            # Same results as horizontal_shard's executor; fan-out SELECTs run concurrently.
            event.remove(self, "do_orm_execute", horizontal_shard.execute_and_instances)
            event.listen(self, "do_orm_execute", execute_with_user_choosers, retval=True)
            return
        if given:
            raise ConfigurationError(
                f"ShardedSession got shard_set= and {', '.join(given)}: give either a ShardSet "
                "(the choosers are derived from it) or horizontal_shard's choosers and shards"
            )
        if not isinstance(shard_set, ShardSet):
            raise ConfigurationError(
                "ShardedSession needs shard_set=ShardSet(...), or horizontal_shard's "
                f"shard_chooser/identity_chooser/execute_chooser and shards; got "
                f"shard_set={type(shard_set).__name__}"
            )
        if default_role not in ("primary", "replica"):
            raise ConfigurationError(
                f"default_role must be 'primary' or 'replica', got {default_role!r}"
            )
        self.has_user_choosers = False
        self.shard_set = shard_set
        self.default_role: Role = default_role
        # The token given (validated now: a bad one raises here), every scope of it.
        self._given = CausalContext(causal_token)
        self._causal_token = causal_token
        self.shard_writes = ShardWrites(shard_set)
        self._routers: dict[ShardId, Router] = {}
        # The shard of the latest statement routed (a failure there is that shard's).
        self._last_shard: ShardId | None = None
        # Inside execute(): statements it runs on the shards are part of the caller's.
        self._executing = False
        # While the ORM's bulk persistence writes one shard's rows: that shard (its bind
        # lookups name a mapper only).
        self._bulk_shard: ShardId | None = None
        super().__init__(
            shard_chooser=self._choose_shard,
            identity_chooser=self._choose_identity_shards,
            execute_chooser=self._choose_execute_shards,
            shards={s: shard_set.replica_set(s).primary.engine for s in shard_set.shard_ids},
            query_cls=query_cls,
            **kw,
        )
        # Replace horizontal_shard's sequential executor with ours (single shard, fan-out).
        event.remove(self, "do_orm_execute", horizontal_shard.execute_and_instances)
        event.listen(self, "do_orm_execute", execute_statement, retval=True)

    # -- two-phase commit -------------------------------------------------------------------

    @property
    def twophase(self) -> bool:
        """Always False for SQLAlchemy with a ShardSet: transactions begin as plain ones,
        and when the ShardSet allows 2PC, ``before_commit`` prepares the shards written
        (only when there are several) under names it chooses, then commits them (see
        ``_two_phase``). A user-chooser session keeps Session's ``twophase`` argument."""
        return self._twophase if self.has_user_choosers else False

    @twophase.setter
    def twophase(self, value: bool) -> None:
        if self.has_user_choosers:
            self._twophase = value
        elif value:
            raise ConfigurationError(
                "ShardedSession decides two-phase commit itself; use "
                "ShardSet(cross_shard_writes='two_phase')"
            )

    @property
    def written_shards(self) -> list[ShardId]:
        """Shards the current transaction has written to, in order."""
        return self.shard_writes.shards

    # -- causal token -----------------------------------------------------------------------

    @property
    def causal_token(self) -> str | None:
        """The newest causal token this session honours, as one opaque string: the one it
        was given, advanced by each shard's WAL position after this session's committed
        writes there (each shard's position under its id). Hand it to the next session
        (``ShardedSession(causal_token=...)``) or a :func:`~sqlalchemy_scale.causal_context`."""
        if self.has_user_choosers:
            return None
        positions = dict(self._given.positions)
        for router in self._routers.values():
            token = router.causal_token
            if token is not None:  # its own shard's position (capped if one was forged)
                positions.update(parse_token(token))
        return format_token(positions)

    # -- choosers (horizontal_shard's extension points) -------------------------------------

    def rule_for_mapper(self, mapper: Mapper[Any]) -> ShardRule:
        rule = self.shard_set.rule_for(mapper.local_table)  # type: ignore[arg-type]
        if rule is None:
            rule = rule_for_mapper(mapper)
        if rule is None:
            raise ConfigurationError(
                f"{mapper.class_.__name__} is not placed on the shards: give it "
                "__shard_key__ = '<column>', or __shard__ = 'all' or '<shard id>'"
            )
        return rule

    def shard_for_instance(self, mapper: Mapper[Any], instance: Any) -> ShardId:
        """The shard an instance belongs to, from its shard key (or its table's rule)."""
        fixed = self.shard_set.fixed_shard(self.rule_for_mapper(mapper))
        if fixed is not None:
            return fixed
        attr = key_attr(mapper)
        return self.shard_set.shard_for(
            getattr(instance, attr, None),
            model=mapper.class_.__name__,
            column=attr,
            key_column=key_column(mapper),
        )

    def _choose_shard(
        self,
        mapper: Mapper[Any] | None,
        instance: Any,
        clause: ClauseElement | None = None,
        **kw: Any,
    ) -> ShardId:
        if instance is not None and mapper is not None:
            return choose_shards(
                self.shard_set.shard_ids, instance=self.shard_for_instance(mapper, instance)
            ).shards[0]
        if clause is not None:
            shard_ids = shards_for_statement(clause, self.shard_set, None)
            if len(shard_ids) == 1:
                return shard_ids[0]
        elif mapper is not None:
            fixed = self.shard_set.fixed_shard(self.rule_for_mapper(mapper))
            if fixed is not None:
                return fixed
        raise CrossShardQueryError(
            "cannot choose one shard here; pass bind_arguments={'shard_id': ...} "
            "(e.g. session.connection(bind_arguments={'shard_id': 's0'}))"
        )

    def _choose_identity_shards(
        self,
        mapper: Mapper[Any],
        primary_key: Any,
        *,
        lazy_loaded_from: InstanceState[Any] | None,
        execution_options: Mapping[str, Any] | None = None,
        bind_arguments: Mapping[str, Any] | None = None,
        **kw: Any,
    ) -> list[ShardId]:
        if lazy_loaded_from is not None and lazy_loaded_from.identity_token is not None:
            return [str(lazy_loaded_from.identity_token)]
        options = execution_options or {}
        if "shard_id" in options:
            return [options["shard_id"]]
        fixed = self.shard_set.fixed_shard(self.rule_for_mapper(mapper))
        if fixed is not None:
            return [fixed]
        column = key_column(mapper)
        if "shard_key" in options:
            return read_owners(self.shard_set, mapper, options["shard_key"])
        pk = primary_key if isinstance(primary_key, tuple | list) else (primary_key,)
        for pk_column, value in zip(mapper.primary_key, pk, strict=False):
            if pk_column is column and value is not None:
                return read_owners(self.shard_set, mapper, value)
        return list(self.shard_set.shard_ids)

    def _choose_execute_shards(self, orm_context: ORMExecuteState) -> list[ShardId]:
        return self.prove_statement(orm_context).shards

    def prove_statement(self, orm_context: ORMExecuteState) -> Proof:
        """Which shards an ORM execution's statement needs, proven (see
        :func:`~sqlalchemy_scale.sharding._proof.prove`); raises CrossShardQueryError
        before anything runs when the answer over those shards is not exact."""
        options = orm_context.execution_options
        raw = orm_context.parameters
        params = raw if isinstance(raw, Mapping) else None
        # executemany: the columns every parameter set gives (a global INSERT's defaults)
        given: set[str] = set()
        if isinstance(raw, list | tuple) and raw and all(isinstance(p, Mapping) for p in raw):
            given = set.intersection(*(set(p) for p in raw))
        if "shard_key" in options:
            return prove(
                orm_context.statement,
                self.shard_set,
                params,
                shard_key=options["shard_key"],
                given=given,
            )
        return prove(orm_context.statement, self.shard_set, params, given=given)

    # -- explicit routing ---------------------------------------------------------------------

    def get(self, entity: Any, ident: Any, *, shard_key: Any = _UNKNOWN, **kw: Any) -> Any:
        """:meth:`Session.get`, plus ``shard_key=v`` to look in the owning shard only.

        A key no shard owns (a range gap, a directory miss) finds nothing: None, as one
        database would answer."""
        if shard_key is not _UNKNOWN and self.has_user_choosers:
            raise ConfigurationError(
                "get(..., shard_key=...) needs a ShardedSession built with shard_set=; with "
                "user choosers pass identity_token=<shard id>"
            )
        if shard_key is not _UNKNOWN and kw.get("identity_token") is None:
            mapper = inspect(entity)
            owners = read_owners(self.shard_set, mapper, shard_key)
            if not owners:
                return None
            kw["identity_token"] = owners[0]
        return super().get(entity, ident, **kw)

    def use_primary(self) -> use_primary:
        """Pin this session's statements to each shard's primary: ``with session.use_primary():``
        (also a decorator of functions and coroutine functions; ``ss.use_primary()`` pins
        every session). The same object as :meth:`RoutingSession.use_primary
        <sqlalchemy_scale.RoutingSession.use_primary>`: every shard's router is pinned."""
        if self.has_user_choosers:
            raise ConfigurationError(
                "use_primary() needs a ShardedSession built with shard_set= (a user-chooser "
                "session's shards are plain engines, with no replicas to route away from)"
            )
        return use_primary(self)

    # -- routing inside a shard -------------------------------------------------------------

    def get_bind(
        self,
        mapper: Any = None,
        *,
        shard_id: ShardId | None = None,
        instance: Any = None,
        clause: ClauseElement | None = None,
        bind: Engine | Connection | None = None,
        **kw: Any,
    ) -> Engine | Connection:
        """The engine for a statement: first the shard (``shard_id``, or the chooser),
        then the node inside it.

        The shard precedence (applied by
        :func:`~sqlalchemy_scale.sharding._precedence.choose_shards`); the first rule that
        applies decides:

        1. explicit shard id: ``set_shard_id(...)``, ``Query.set_shard()``,
           ``execution_options(shard_id=...)`` or ``bind_arguments={"shard_id": ...}``;
        2. ``execution_options(shard_key=v)`` (and ``session.get(..., shard_key=v)``):
           the shard owning ``v``;
        3. instance: an object being flushed (or the rows of an INSERT) goes to its shard
           key's shard;
        4. statement: WHERE pruning (``==``/``IN`` on the shard key) and the tables'
           placement (global, pinned) narrow the shards;
        5. fan-out: every shard, concurrently, merged into one answer, or refused
           before anything runs when the merge would not be exact.

        Two placements that disagree (a shard id and a ``shard_key=`` owned elsewhere, a
        ``shard_key=`` and the rows' own keys or a WHERE naming other shards' keys) raise
        :class:`~sqlalchemy_scale.ShardKeyError` before anything runs; an explicit shard
        id wins over the WHERE's narrowing ("look only there").

        Inside the shard, the shard's :class:`~sqlalchemy_scale.Router` decides, with the
        precedence list of :meth:`Router.decide <sqlalchemy_scale.Router.decide>`, as in a
        RoutingSession: each shard has its own router, so "the transaction has written",
        the transaction's replica and the causal position (the shard's part of the
        session's token and of the :func:`~sqlalchemy_scale.causal_context`) are per shard.

        A write to a second shard raises :class:`CrossShardWriteError` when the
        ShardSet's ``cross_shard_writes`` is ``"refuse"``.
        """
        if bind is not None:
            if not self.has_user_choosers and (self._executing or self.in_transaction()):
                self._note_bound_write(bind.engine, clause)
            return bind
        if self.has_user_choosers:  # horizontal_shard's own rule
            return super().get_bind(mapper, shard_id=shard_id, instance=instance, clause=clause)
        if shard_id is None and self._bulk_shard is not None:
            shard_id = self._bulk_shard
        if shard_id is None:
            shard_id = self._choose_shard_and_assign(mapper, instance, clause=clause)
        assert shard_id is not None
        router = self.router(shard_id)
        flushing = is_flushing(self)
        if clause is None and not flushing:
            # No statement (a bind lookup, connection()): the shard's primary, with no effect
            # on routing state; connection() notes the write itself.
            return router.replica_set.primary.engine
        decision = router.decide(clause, flushing=flushing, call_options=kw.get(CALL_OPTIONS))
        if not (self._executing or flushing or self.in_transaction()):
            # Asked outside any transaction and not to run a statement of ours (a user's
            # get_bind(clause=...)): where it would go, leaving the next transaction alone
            # (no write noted, so no cross-shard refusal and no primary reads follow from it).
            return router.peek(decision).engine
        writes = self.shard_writes
        if writes.preparing and is_late_write(decision[2]):
            # SQLAlchemy flushes again after every before_commit listener; by then the
            # shards may be committed, and rows flushed now would be rolled back at close.
            raise CrossShardWriteError(
                f"a write to shard {shard_id!r} was made while commit() was already "
                f"committing shard(s) {writes.shards}; it was refused, nothing of it was "
                "sent. Flush it before commit() (a before_commit listener that adds objects "
                "must call session.flush() itself)"
            )
        if decision[3] and not router.has_written:
            # Refused before anything is recorded: a retried write meets the same check.
            writes.note(shard_id, router.replica_set.primary.engine)
        self._last_shard = shard_id
        engine = router.record(decision, clause, self).engine
        if log.isEnabledFor(logging.DEBUG):
            log.debug("[%s] %s", shard_id, render_url(engine.engine))
        return engine

    def _note_bound_write(self, engine: Engine, clause: ClauseElement | None) -> None:
        """A statement sent through an explicit bind: if the bind is a shard's primary and the
        statement writes, it is a write to that shard (the cross-shard rule first, nothing
        sent if it refuses; then the rest of the transaction reads that shard's primary)."""
        for shard_id in self.shard_set.shard_ids:
            if self.shard_set.replica_set(shard_id).primary.engine is engine:
                if bound_statement_writes(clause, is_flushing(self)):
                    router = self.router(shard_id)
                    if not router.has_written:
                        self.shard_writes.note(shard_id, engine)
                    router.has_written = True
                return

    def connection(self, bind_arguments: Any = None, execution_options: Any = None) -> Connection:
        """The transaction's connection to one shard (``bind_arguments={"shard_id": ...}``).

        Asked for without a statement, a connection to a shard's primary may be written
        through, so it counts as a write to that shard: the cross-shard write rules apply
        before it is returned (:class:`~sqlalchemy_scale.CrossShardWriteError` when another
        shard was written and two-phase commit is off; nothing was sent), and the shard takes
        part in the two-phase commit.
        """
        if self.has_user_choosers:
            return super().connection(
                bind_arguments=bind_arguments, execution_options=execution_options
            )
        arguments = dict(bind_arguments or {})
        replicating = arguments.pop(GLOBAL_COPY, False)
        conn = super().connection(
            bind_arguments=arguments or None, execution_options=execution_options
        )
        if replicating or arguments.get("clause") is not None:
            return conn
        for shard_id in self.shard_set.shard_ids:
            engine = self.shard_set.replica_set(shard_id).primary.engine
            if conn.engine is engine:
                self.shard_writes.note(shard_id, engine)
                self.router(shard_id).record_connection(engine)  # the rest reads the primary
                break
        return conn

    @contextlib.contextmanager
    def bulk_writes_on(self, shard_id: ShardId) -> Iterator[None]:
        """While an ORM bulk INSERT/UPDATE runs one shard's rows (see :mod:`._bulk`):
        SQLAlchemy's bulk persistence, which refuses horizontal_shard's per-instance
        connections, asks for its connection by mapper alone, and gets ``shard_id``'s
        primary (the connection the statement's own bind lookup already opened there)."""
        self._bulk_shard = shard_id
        try:
            with without_connection_callable(self):
                yield
        finally:
            self._bulk_shard = None

    def router(self, shard_id: ShardId) -> Router:
        """The :class:`~sqlalchemy_scale.Router` of this session's statements inside shard
        ``shard_id`` (it follows the :func:`~sqlalchemy_scale.causal_context` in force, by
        the shard's scope)."""
        router = self._routers.get(shard_id)
        if router is None:
            router = self._routers[shard_id] = Router(
                self.shard_set.replica_set(shard_id),
                default_role=self.default_role,
                causal_token=self._causal_token,
                owner=self,
            )
        return router

    def end_transaction(self) -> None:
        """Forget the transaction's routing state: nothing written, no replica, in any shard
        (called when the session's outermost transaction ends)."""
        self.shard_writes.end()
        for router in self._routers.values():
            router.end_transaction()

    # -- execution: a replica that fails the first read is retried on another node ----------

    def execute(self, statement: Any, params: Any = None, **kw: Any) -> Any:
        return self._retried(super().execute, statement, params, kw)

    def scalars(self, statement: Any, params: Any = None, **kw: Any) -> Any:
        return self._retried(super().scalars, statement, params, kw)

    def scalar(self, statement: Any, params: Any = None, **kw: Any) -> Any:
        return self._retried(super().scalar, statement, params, kw)

    def _retried(
        self, method: Callable[..., Any], statement: Any, params: Any, kw: dict[str, Any]
    ) -> Any:
        if self.has_user_choosers or self._executing:
            # Statements run by our own executor for the caller's (one per shard) are retried,
            # if at all, as the caller's whole statement: once.
            return method(statement, params, **kw)
        # Only a statement that begins the transaction may be retried: the session began it
        # by itself, so rolling it back loses nothing (nothing else ran in it).
        first = not self.in_transaction()
        self._executing = True
        try:
            try:
                return method(statement, params, **kw)
            except (DBAPIError, OSError) as exc:  # OSError: asyncpg's refused connect
                self._after_failure(exc, first=first)  # raises unless it may run once more
            return method(statement, params, **kw)
        finally:
            self._executing = False

    def _after_failure(self, exc: DBAPIError | OSError, *, first: bool) -> None:
        """Return to retry the statement once; raise otherwise.

        Only a *shard's replica that failed as a node* (lost or refused connection) is
        handled, by that shard's :class:`~sqlalchemy_scale.Router` as in a RoutingSession:
        it is taken out of rotation, and the read is retried on another node of the shard
        if it began the transaction, nothing was written and nothing is pending. Otherwise
        :class:`~sqlalchemy_scale.NodeUnavailableError` names the shard and the node. Any
        other error is re-raised untouched.
        """
        shard_id = getattr(exc, "shard_id", None) or self._last_shard  # a fan-out names it
        router = self._routers.get(shard_id) if shard_id is not None else None
        node = router.failed_replica(exc) if router is not None else None
        if router is None or node is None or shard_id is None:
            raise exc
        drop_kept_connection(self, node, exc)  # the rollback below sends nothing on it
        clean = (
            first
            and not (self.new or self.dirty or self.deleted)
            and not any(r.has_written for r in self._routers.values())
        )
        try:
            router.check_retry(node, exc, clean=clean)
        except NodeUnavailableError as unavailable:
            raise NodeUnavailableError(
                f"shard {shard_id!r}: {unavailable}",
                node=unavailable.node,
                orig=unavailable.orig,
                shard=shard_id,
            ) from exc
        if self.in_transaction():
            self.rollback()
        else:
            self.end_transaction()  # nothing began: only the routing state to reset


# -- flush-time rules --------------------------------------------------------------------------


@event.listens_for(ShardedSession, "before_flush")
def _before_flush(session: Session, flush_context: Any, instances: Any) -> None:
    if not isinstance(session, ShardedSession) or session.has_user_choosers:
        return
    # Place every new object before any SQL is sent: a bad key raises with nothing written.
    for obj in session.new:
        state = inspect(obj)
        if state.identity_token is None:
            state.identity_token = session.shard_for_instance(state.mapper, obj)
    for obj in session.dirty:
        state = inspect(obj)
        if state.key is None or not session.is_modified(obj):
            continue
        kind, _ = session.rule_for_mapper(state.mapper)
        if kind != "key":
            continue
        owner = session.shard_for_instance(state.mapper, obj)
        if owner != state.key[2]:
            raise CrossShardWriteError(
                f"{state.mapper.class_.__name__}.{key_attr(state.mapper)} was changed so that "
                f"the row would belong to shard {owner!r}, but it is stored on {state.key[2]!r}; "
                "changing a shard key moves the row: delete it and add a new object "
                "(or use DirectorySharding.move)"
            )


_global_tables.install(ShardedSession)
_commit.install(ShardedSession)


@event.listens_for(ShardedSession, "after_transaction_end")
def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    if (
        transaction.parent is None
        and isinstance(session, ShardedSession)
        and not session.has_user_choosers
    ):
        session.end_transaction()


def sharded_sessionmaker(
    shard_set: ShardSet,
    *,
    default_role: Role = "replica",
    causal_token: str | None = None,
    **kw: Any,
) -> sessionmaker[ShardedSession]:
    """A :class:`~sqlalchemy.orm.sessionmaker` of :class:`ShardedSession` over ``shard_set``.

    ``causal_token`` is given to every session it makes (see :class:`ShardedSession`).

    .. versionadded:: 0.1

    .. versionchanged:: 0.3 ``causal_token``.
    """
    return sessionmaker(
        class_=ShardedSession,
        shard_set=shard_set,
        default_role=default_role,
        causal_token=causal_token,
        **kw,
    )
