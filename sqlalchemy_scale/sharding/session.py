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
  (:func:`~sqlalchemy_scale.sharding._pinning.prove`: co-located joins,
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
  under RoutingSession, so the rules are the same, not a copy;
* a transaction that writes to two shards follows the ShardSet's
  ``cross_shard_writes``: ``"refuse"`` raises :class:`~sqlalchemy_scale.CrossShardWriteError`
  before the second shard is written, ``"two_phase"`` commits with two-phase commit,
  ``"best_effort"`` commits shard by shard and raises
  :class:`~sqlalchemy_scale.PartialCommitError` naming what committed when one fails;
* global tables (``__shard__ = "all"``) are written to every shard and read
  from the ShardSet's home shard; ``__shard__ = "<shard id>"`` pins a table.

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

import functools
import logging
from collections.abc import Mapping
from typing import Any, Final

from sqlalchemy import event, inspect
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.engine.result import IteratorResult, Result, SimpleResultMetaData
from sqlalchemy.ext import horizontal_shard
from sqlalchemy.orm import Mapper, ORMExecuteState, Session, SessionTransaction, sessionmaker
from sqlalchemy.orm.state import InstanceState
from sqlalchemy.sql.elements import ClauseElement, TextClause
from sqlalchemy.sql.selectable import TextualSelect

from .._sa import (
    dml_values,
    identity_token_option,
    is_flushing,
    non_compile_orm_options,
    on_conflict_set_keys,
    transaction_connection,
    update_set_keys,
)
from ..errors import (
    CommitOutcomeUnknown,
    ConfigurationError,
    CrossShardQueryError,
    CrossShardWriteError,
    NodeUnavailableError,
    ShardKeyError,
    render_url,
)
from ..router import ROUTING_OPTIONS, Router, use_primary
from ..routing import CALL_OPTIONS
from ..topology import Role
from . import _best_effort as best_effort
from . import _two_phase as two_phase
from ._pinning import Proof, prove, shards_for_statement
from ._shard_set import ShardRule, ShardSet, rule_for_mapper
from ._stored_key import stored_key
from ._user_choosers import commit_shard_by_shard, execute_with_user_choosers
from .fanout import execute_exists, execute_fanout
from .shapes import refuse
from .strategies import ShardId

__all__ = ["ShardedSession", "set_shard_id", "sharded_sessionmaker"]

log = logging.getLogger("sqlalchemy_scale.sharding")

set_shard_id = horizontal_shard.set_shard_id

_UNKNOWN: Any = object()

# bind_arguments key: the connection copies a global table's rows (not a write the
# cross-shard rules count; see _copy_to_other_shards).
_GLOBAL_COPY: Final = "_sqlalchemy_scale_global_copy"

# decide_role() reasons refused once commit() has begun committing the shards.
_LATE_WRITES: Final = frozenset({"flush", "write", "ddl"})


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
    :param id_chooser: deprecated by SQLAlchemy 2.0 (use ``identity_chooser``); warns.
    :param query_chooser: deprecated by SQLAlchemy 1.4 (use ``execute_chooser``); warns.

    Other keyword arguments are :class:`~sqlalchemy.orm.Session`'s. Build it with
    :func:`sharded_sessionmaker`, or ``sessionmaker(class_=ss.ShardedSession, ...)``.

    .. versionadded:: 0.1

    .. versionchanged:: 0.3
        Accepts horizontal_shard's arguments instead of ``shard_set``.
    """

    # The transaction whose shard-by-shard commit raised PartialCommitError, if any.
    _partial_commit: SessionTransaction | None

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
            self._shard_names = {id(e): str(k) for k, e in (shards or {}).items()}
            self._partial_commit = None
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
        self._written: dict[ShardId, Engine] = {}
        self._routers: dict[ShardId, Router] = {}
        self._preparing = False
        self._partial_commit = None
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
        event.listen(self, "do_orm_execute", _execute, retval=True)

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
        return [s for s in self.shard_set.shard_ids if s in self._written]

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
        attr = _key_attr(mapper)
        return self.shard_set.shard_for(
            getattr(instance, attr, None),
            model=mapper.class_.__name__,
            column=attr,
            key_column=_key_column(mapper),
        )

    def _choose_shard(
        self,
        mapper: Mapper[Any] | None,
        instance: Any,
        clause: ClauseElement | None = None,
        **kw: Any,
    ) -> ShardId:
        if instance is not None and mapper is not None:
            return self.shard_for_instance(mapper, instance)
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
        key_column = _key_column(mapper)
        if "shard_key" in options:
            return _read_owners(self.shard_set, mapper, options["shard_key"])
        pk = primary_key if isinstance(primary_key, tuple | list) else (primary_key,)
        for column, value in zip(mapper.primary_key, pk, strict=False):
            if column is key_column and value is not None:
                return _read_owners(self.shard_set, mapper, value)
        return list(self.shard_set.shard_ids)

    def _choose_execute_shards(self, orm_context: ORMExecuteState) -> list[ShardId]:
        return self._prove(orm_context).shards

    def _prove(self, orm_context: ORMExecuteState) -> Proof:
        """Which shards an ORM execution's statement needs, proven (see
        :func:`~sqlalchemy_scale.sharding._pinning.prove`); raises CrossShardQueryError
        before anything runs when the answer over those shards is not exact."""
        options = orm_context.execution_options
        params = orm_context.parameters if isinstance(orm_context.parameters, Mapping) else None
        if "shard_key" in options:
            return prove(
                orm_context.statement, self.shard_set, params, shard_key=options["shard_key"]
            )
        return prove(orm_context.statement, self.shard_set, params)

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
            owners = _read_owners(self.shard_set, mapper, shard_key)
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

        The shard precedence; the first rule that applies decides:

        1. explicit shard id: ``set_shard_id(...)``, ``Query.set_shard()``,
           ``execution_options(shard_id=...)`` or ``bind_arguments={"shard_id": ...}``;
        2. ``execution_options(shard_key=v)`` (and ``session.get(..., shard_key=v)``):
           the shard owning ``v``;
        3. instance: an object being flushed goes to its shard key's shard;
        4. WHERE pruning: ``==``/``IN`` on the shard key narrow the shards;
        5. fan-out: every shard, concurrently, merged into one answer, or refused
           before anything runs when the merge would not be exact.

        Inside the shard, the shard's :class:`~sqlalchemy_scale.Router` decides, with the
        precedence list of :meth:`Router.decide <sqlalchemy_scale.Router.decide>`, as in a
        RoutingSession: each shard has its own router, so "the transaction has written"
        and the transaction's replica are tracked per shard. An application's causal
        token does not steer reads inside a shard (it is a WAL position of one server).

        A write to a second shard raises :class:`CrossShardWriteError` when the
        ShardSet's ``cross_shard_writes`` is ``"refuse"``.
        """
        if bind is not None:
            return bind
        if self.has_user_choosers:  # horizontal_shard's own rule
            return super().get_bind(mapper, shard_id=shard_id, instance=instance, clause=clause)
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
        if self._preparing and decision[2] in _LATE_WRITES:
            # SQLAlchemy flushes again after every before_commit listener; by then the
            # shards may be committed, and rows flushed now would be rolled back at close.
            raise CrossShardWriteError(
                f"a write to shard {shard_id!r} was made while commit() was already "
                f"committing shard(s) {self.written_shards}; it was refused, nothing of it was "
                "sent. Flush it before commit() (a before_commit listener that adds objects "
                "must call session.flush() itself)"
            )
        if decision[3] and not router.has_written:
            # Refused before anything is recorded: a retried write meets the same check.
            self._note_write(shard_id, router.replica_set.primary.engine)
        engine = router.record(decision, clause, self).engine
        if log.isEnabledFor(logging.DEBUG):
            log.debug("[%s] %s", shard_id, render_url(engine.engine))
        return engine

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
        replicating = arguments.pop(_GLOBAL_COPY, False)
        conn = super().connection(
            bind_arguments=arguments or None, execution_options=execution_options
        )
        if replicating or arguments.get("clause") is not None:
            return conn
        for shard_id in self.shard_set.shard_ids:
            engine = self.shard_set.replica_set(shard_id).primary.engine
            if conn.engine is engine:
                self._note_write(shard_id, engine)
                self.router(shard_id).record_connection(engine)  # the rest reads the primary
                break
        return conn

    def router(self, shard_id: ShardId) -> Router:
        """The :class:`~sqlalchemy_scale.Router` of this session's statements inside shard
        ``shard_id``."""
        router = self._routers.get(shard_id)
        if router is None:
            router = self._routers[shard_id] = Router(
                self.shard_set.replica_set(shard_id),
                default_role=self.default_role,
                owner=self,
                follows_causal_context=False,
            )
        return router

    def _note_write(self, shard_id: ShardId, engine: Engine) -> None:
        if shard_id in self._written:
            return
        if self._written and self.shard_set.cross_shard_writes == "refuse":
            raise CrossShardWriteError(
                f"this transaction already wrote to shard(s) {self.written_shards} and now writes "
                f"to {shard_id!r}; nothing was committed. Use "
                "ShardSet(cross_shard_writes='two_phase') (PostgreSQL two-phase commit, needs "
                "max_prepared_transactions > 0) or write each shard in its own transaction"
            )
        self._written[shard_id] = engine

    def _end_transaction(self) -> None:
        self._written = {}
        self._preparing = False
        for router in self._routers.values():
            router.end_transaction()


def _key_attr(mapper: Mapper[Any]) -> str:
    attr = getattr(mapper.class_, "__shard_key__", None)
    if attr is None:
        raise ConfigurationError(f"{mapper.class_.__name__} has no __shard_key__")
    return str(attr)


# -- statement execution ---------------------------------------------------------------------


def _key_column(mapper: Mapper[Any]) -> Any:
    return mapper.get_property(_key_attr(mapper)).columns[0]


def _call_options(orm_context: ORMExecuteState) -> dict[str, Any]:
    options = orm_context.execution_options
    return {k: options[k] for k in ROUTING_OPTIONS if k in options}


def _explicit_shard(orm_context: ORMExecuteState) -> ShardId | None:
    for option in non_compile_orm_options(orm_context):
        if isinstance(option, horizontal_shard.set_shard_id):
            return str(option.shard_id)
    active: Any = None
    if orm_context.is_select:
        active = orm_context.load_options
    elif orm_context.is_update or orm_context.is_delete:
        active = orm_context.update_delete_options
    if active is not None and identity_token_option(active) is not None:
        return str(identity_token_option(active))
    options = orm_context.execution_options
    for name in ("_sa_shard_id", "shard_id"):
        if options.get(name) is not None:
            return str(options[name])
    if orm_context.bind_arguments.get("shard_id") is not None:
        return str(orm_context.bind_arguments["shard_id"])
    return None


def _bind_arguments(orm_context: ORMExecuteState, shard_id: ShardId) -> dict[str, Any]:
    bind_arguments = dict(orm_context.bind_arguments)
    bind_arguments["shard_id"] = shard_id
    routing = _call_options(orm_context)
    if routing:
        bind_arguments[CALL_OPTIONS] = routing
    return bind_arguments


def _run_on_shard(orm_context: ORMExecuteState, shard_id: ShardId) -> Result[Any]:
    orm_context.update_execution_options(identity_token=shard_id)
    return orm_context.invoke_statement(bind_arguments=_bind_arguments(orm_context, shard_id))


def _execute(orm_context: ORMExecuteState) -> Result[Any] | None:
    session = orm_context.session
    if not isinstance(session, ShardedSession):
        return None
    if orm_context.is_update or orm_context.is_insert:
        _refuse_shard_key_change(session, orm_context)
    shard_id = _explicit_shard(orm_context)
    if shard_id is not None:
        return _run_on_shard(orm_context, shard_id)
    statement = orm_context.statement
    if isinstance(statement, TextClause | TextualSelect):
        refuse(
            "not_a_select",
            "a text() statement names no table the planner can place",
            remedy="run it on one shard with execution_options(shard_id=...) or "
            "bind_arguments={'shard_id': ...}",
        )
    if orm_context.is_insert:
        shard_ids = _insert_shards(session, orm_context)
        if len(shard_ids) > 1:
            proof = session._prove(orm_context)  # noqa: SLF001 (this module's class)
        else:  # its subqueries must read only the rows' shard
            proof = prove(statement, session.shard_set, None, rows_on=shard_ids)
    else:
        proof = session._prove(orm_context)  # noqa: SLF001 (this module's class): raises before anything runs
    if proof.count_of is not None:
        return _count_merged_rows(orm_context, proof.count_of)
    shard_ids = proof.shards
    if len(shard_ids) == 1:
        return _run_on_shard(orm_context, shard_ids[0])
    if orm_context.is_select:
        run = execute_exists if proof.exists else execute_fanout
        return run(
            orm_context,
            shard_ids,
            session.shard_set,
            functools.partial(_bind_arguments, orm_context),
            functions=proof.functions,
        )
    if statement.is_select:
        raise CrossShardQueryError(
            f"a {type(statement).__name__} across shards cannot be merged; pass "
            "execution_options(shard_id=...) or shard_key=..."
        )
    if session.shard_set.cross_shard_writes == "refuse":
        # Refuse before any shard runs it: a shard that ran it would commit with the next commit().
        raise CrossShardWriteError(
            f"a {type(statement).__name__} on shards {shard_ids} needs a transaction on several "
            "shards; nothing was run. Use ShardSet(cross_shard_writes='two_phase'), or pin it to "
            "one shard with shard_key=... or execution_options(shard_id=...)"
        )
    # INSERT (global tables), UPDATE or DELETE on several shards: each shard in the session's
    # transaction, so the cross-shard commit rules apply; one after the other, as
    # horizontal_shard does.
    results = [_run_on_shard(orm_context, s) for s in shard_ids]
    if proof.global_write:
        # Every shard holds a copy of a global table: report one copy's rows and rowcount.
        for other in results[1:]:
            other.close()
        return results[0]
    merged = results[0].merge(*results[1:])
    merged.rowcount = sum(getattr(r, "rowcount", 0) or 0 for r in results)
    return merged


def _count_merged_rows(orm_context: ORMExecuteState, inner: Any) -> Result[Any]:
    """``Query.count()`` of a statement that needs merging: the number of its merged rows."""
    statement: Any = orm_context.statement
    options = {k: v for k, v in orm_context.execution_options.items() if not k.startswith("_sa")}
    rows = orm_context.session.execute(
        inner,
        orm_context.parameters,
        execution_options=options,
    ).all()
    keys = [str(k) for k in statement.selected_columns.keys()]  # noqa: SIM118
    return IteratorResult(SimpleResultMetaData(keys), iter([(len(rows),)]))


def _read_owners(shard_set: ShardSet, mapper: Mapper[Any], value: Any) -> list[ShardId]:
    """The shard that may hold rows with shard key ``value``, or none when no shard owns it
    (a read of such a key finds nothing; a bad value still raises)."""
    attr = _key_attr(mapper)
    key_column = _key_column(mapper)
    place = functools.partial(
        shard_set.shard_for, model=mapper.class_.__name__, column=attr, key_column=key_column
    )
    if value is None:
        return []
    try:
        stored_key(value, key_column)
    except (ValueError, TypeError, ArithmeticError):
        return [place(value)]  # raises ShardKeyError naming the bad value
    try:
        return [place(value)]
    except ShardKeyError:
        return []


def _refuse_shard_key_change(session: ShardedSession, orm_context: ORMExecuteState) -> None:
    """Raise when an UPDATE (or INSERT ... ON CONFLICT DO UPDATE) sets a shard key: the row
    would stay on the shard of its old key, where reads by the new key never look."""
    stmt: Any = orm_context.statement
    table: Any = getattr(stmt, "table", None)
    rule = session.shard_set.rule_for(table) if table is not None else None
    if rule is None or rule[0] != "key":
        return
    column = table.c[rule[1]]
    mapper = orm_context.bind_mapper
    names = {column.name, column.key}
    if mapper is not None:
        names.add(_key_attr(mapper))
    sets: list[Any] = []
    if orm_context.is_update:
        sets += update_set_keys(stmt)
        params = orm_context.parameters
        rows = [params] if isinstance(params, Mapping) else list(params or [])
        if not sets and not column.primary_key:  # SET taken from the parameters
            sets += [k for row in rows for k in row]
    sets += on_conflict_set_keys(stmt)
    for key in sets:
        if {getattr(key, "key", key), getattr(key, "name", key)} & names:
            model = mapper.class_.__name__ if mapper is not None else table.name
            raise ShardKeyError(
                f"{type(stmt).__name__} of {model} sets its shard key {column.name!r}: the rows "
                "would stay on the shard of their old key; nothing was run. Changing a shard key "
                "moves a row: delete it and insert it again (or use DirectorySharding.move)",
                model=model,
                column=column.name,
                value=None,
            )


def _insert_shards(session: ShardedSession, orm_context: ORMExecuteState) -> list[ShardId]:
    """Where an INSERT statement goes: its rows' shard (all rows must share one), every
    shard for a global table, or the table's pinned shard."""
    stmt: Any = orm_context.statement
    table = stmt.table
    rule = session.shard_set.rule_for(table)
    if rule is None or rule[0] != "key":
        return session._choose_execute_shards(orm_context)  # noqa: SLF001 (this module's class)
    column = rule[1]
    params = orm_context.parameters
    rows: list[Mapping[str, Any]] = (
        [params] if isinstance(params, Mapping) and params else list(params or [])  # type: ignore[arg-type]
    )
    if not rows:  # insert(...).values(...): the values are in the statement
        values = {
            str(getattr(key, "key", key)): getattr(value, "effective_value", value)
            for key, value in (dml_values(stmt) or {}).items()
        }
        rows = [values]
    shards = set()
    for row in rows:
        mapper = orm_context.bind_mapper
        name = mapper.class_.__name__ if mapper is not None else table.name
        attr = _key_attr(mapper) if mapper is not None else str(column)
        shards.add(
            session.shard_set.shard_for(
                row.get(attr, row.get(str(column))),
                model=name,
                column=attr,
                key_column=table.c[column],
            )
        )
    if len(shards) != 1:
        raise CrossShardQueryError(
            f"a bulk INSERT into {table.name} with rows for shards {sorted(shards)}: add the "
            "objects with session.add_all(), or insert each shard's rows separately"
        )
    return list(shards)


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
                f"{state.mapper.class_.__name__}.{_key_attr(state.mapper)} was changed so that "
                f"the row would belong to shard {owner!r}, but it is stored on {state.key[2]!r}; "
                "changing a shard key moves the row: delete it and add a new object "
                "(or use DirectorySharding.move)"
            )


@event.listens_for(ShardedSession, "after_flush")
def _replicate_global_rows(session: Session, flush_context: Any) -> None:
    if not isinstance(session, ShardedSession) or session.has_user_choosers:
        return
    written = [(obj, False) for obj in session.new] + [
        (obj, False) for obj in session.dirty if session.is_modified(obj)
    ]
    written += [(obj, True) for obj in session.deleted]
    for obj, deleted in written:
        state = inspect(obj)
        if session.rule_for_mapper(state.mapper)[0] != "all":
            continue
        _copy_to_other_shards(session, state, deleted=deleted)


def _copy_to_other_shards(
    session: ShardedSession, state: InstanceState[Any], *, deleted: bool
) -> None:
    mapper = state.mapper
    table: Any = mapper.local_table
    home = state.identity_token or session.shard_set.home_shard
    values: dict[str, Any] = {}
    for prop in mapper.column_attrs:
        for column in prop.columns:
            if getattr(column, "table", None) is table and prop.key in state.dict:
                values[column.name] = state.dict[prop.key]
    pk = [c.name for c in table.primary_key.columns]
    for shard_id in session.shard_set.shard_ids:
        if shard_id == home:
            continue
        conn = session.connection(
            bind_arguments={"shard_id": shard_id, "mapper": mapper, _GLOBAL_COPY: True}
        )
        if deleted:
            criteria = [table.c[name] == values[name] for name in pk]
            conn.execute(table.delete().where(*criteria))
            continue
        stmt = pg_insert(table).values(values)
        updates = {name: stmt.excluded[name] for name in values if name not in pk}
        stmt = (
            stmt.on_conflict_do_update(index_elements=pk, set_=updates)
            if updates
            else stmt.on_conflict_do_nothing(index_elements=pk)
        )
        conn.execute(stmt)


# -- commit -----------------------------------------------------------------------------------


@event.listens_for(ShardedSession, "before_commit")
def _before_commit(session: Session) -> None:
    if not isinstance(session, ShardedSession):
        return
    transaction = session.get_transaction()
    if transaction is None or transaction.nested or transaction.parent is not None:
        return
    # (Underscored names below are this module's own class's.)
    if session._partial_commit is transaction:  # noqa: SLF001
        raise CrossShardWriteError(
            "this transaction's best-effort commit already stopped at a shard "
            "(PartialCommitError); roll it back before using the session again"
        )
    if session.has_user_choosers:
        if not session.twophase:
            session.flush()
            names = session._shard_names  # noqa: SLF001
            session._partial_commit = transaction  # noqa: SLF001
            commit_shard_by_shard(transaction, names, list(names.values()))
            session._partial_commit = None  # noqa: SLF001
        return
    session.flush()  # the last flush may write to another shard: decide after it
    # From here writes are refused (get_bind): SQLAlchemy flushes again after this listener.
    session._preparing = True  # noqa: SLF001
    written = session._written  # noqa: SLF001
    if len(written) < 2:
        return
    mode = session.shard_set.cross_shard_writes
    if mode == "best_effort":
        connections = [
            (s, transaction_connection(transaction, written[s])) for s in session.written_shards
        ]
        session._partial_commit = transaction  # noqa: SLF001
        best_effort.commit_shards([(s, c) for s, c in connections if c is not None])
        session._partial_commit = None  # noqa: SLF001
        return
    if mode != "two_phase":  # get_bind refuses earlier; this is the safety net
        raise CrossShardWriteError(
            f"the transaction wrote to shards {session.written_shards}; nothing was committed"
        )
    _commit_two_phase(session, transaction)


def _commit_two_phase(session: ShardedSession, transaction: SessionTransaction) -> None:
    """PREPARE every written shard under one txid, record the decision, COMMIT PREPARED each
    (the protocol of :mod:`~sqlalchemy_scale.sharding._two_phase`).

    The session's connections stay plain transactions: ``PREPARE TRANSACTION`` ends each
    on its server (and the driver is told so), so the COMMIT (or ROLLBACK) SQLAlchemy asks
    of them afterwards sends nothing, and phase two runs on separate autocommit
    connections. (The drivers' own two-phase API fixes the gid when the transaction
    begins, before the transaction that names it exists.)
    """
    shard_set = session.shard_set
    txid = two_phase.new_txid()
    parts: list[two_phase.Part] = []
    for shard_id in session.written_shards:
        connection = transaction_connection(transaction, session._written[shard_id])  # noqa: SLF001
        if connection is None:
            continue
        engine = shard_set.replica_set(shard_id).primary.engine
        part = two_phase.Part(shard_id, engine, two_phase.gid_for(txid, shard_id))
        try:
            two_phase.prepare(connection, part.gid)
        except BaseException:
            # Nothing is decided: roll back what was prepared (and this part, in case its
            # PREPARE ran before the error); the session rolls back the rest.
            two_phase.rollback_parts([*parts, part])
            raise
        parts.append(part)
        two_phase.step(f"prepared:{shard_id}")
    log.debug("prepared two-phase commit %s on shards %s", txid, session.written_shards)
    two_phase.step("prepared")
    _decide_and_commit(shard_set, txid, parts)


def _decide_and_commit(shard_set: ShardSet, txid: str, parts: list[two_phase.Part]) -> None:
    coordinator = shard_set.replica_set(shard_set.home_shard).primary.engine
    names = [part.shard_id for part in parts]
    try:
        two_phase.record_commit(coordinator, shard_set.home_shard, txid, names)
    except two_phase.DecidedAbort:
        two_phase.rollback_parts(parts)
        raise two_phase.aborted_error(txid, names) from None
    except NodeUnavailableError:
        two_phase.rollback_parts(parts)  # nothing recorded, and only we would record 'commit'
        raise
    # Any other error (CommitOutcomeUnknown, an interrupt) leaves the parts prepared: recovery
    # commits them if the 'commit' record exists and rolls them back if it does not.
    two_phase.step("decided")
    try:
        two_phase.commit_parts(parts)
    except CommitOutcomeUnknown as exc:
        log.error("two-phase commit: %s", exc)
        raise
    two_phase.forget_commit(coordinator, txid)


@event.listens_for(ShardedSession, "after_transaction_end")
def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    if (
        transaction.parent is None
        and isinstance(session, ShardedSession)
        and not session.has_user_choosers
    ):
        session._end_transaction()  # noqa: SLF001 (this module's class)


def sharded_sessionmaker(
    shard_set: ShardSet, *, default_role: Role = "replica", **kw: Any
) -> sessionmaker[ShardedSession]:
    """A :class:`~sqlalchemy.orm.sessionmaker` of :class:`ShardedSession` over ``shard_set``.

    .. versionadded:: 0.1
    """
    return sessionmaker(class_=ShardedSession, shard_set=shard_set, default_role=default_role, **kw)
