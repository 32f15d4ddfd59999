"""The contract with SQLAlchemy's internals: every function of ``sqlalchemy_scale._sa``,
exercised on real SQLAlchemy objects, one test per function.

An upgrade of SQLAlchemy that renames or reshapes a private attribute we rely on fails
the test named after the function that reads it (``test_sa_contract[select_head]``),
instead of misrouting a statement somewhere else. Functions that need results or
transactions run on the real primary.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    delete,
    event,
    func,
    insert,
    literal_column,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection, CursorResult
from sqlalchemy.ext.horizontal_shard import set_shard_id
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    ORMExecuteState,
    Session,
    mapped_column,
)
from sqlalchemy.util.concurrency import greenlet_spawn

from sqlalchemy_scale import _sa
from sqlalchemy_scale.local import LocalCluster

metadata = MetaData()
t = Table("t", metadata, Column("id", Integer, primary_key=True), Column("v", Integer))
u = Table("u", metadata, Column("id", Integer, ForeignKey("t.id")), Column("w", BigInteger))


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "sa_contract_items"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(20))


@pytest.fixture(scope="module")
def engine(scale_cluster: LocalCluster, driver: str) -> Iterator[Engine]:
    """The real primary, with this module's table."""
    engine = create_engine(scale_cluster.primary.url(driver))
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all([Item(id=1, name="a"), Item(id=2, name="b")])
        session.commit()
    yield engine
    Base.metadata.drop_all(engine)
    engine.dispose()


def _orm_state(engine: Engine, statement: Any) -> dict[str, Any]:
    """Run ``statement`` in a Session and read, inside do_orm_execute, what _sa reads there."""
    seen: dict[str, Any] = {}
    with Session(engine) as session:

        def listen(orm_context: ORMExecuteState) -> None:
            seen["options"] = _sa.non_compile_orm_options(orm_context)
            seen["compile_state_cls"] = _sa.compile_state_cls(orm_context)
            seen["autoflush"] = _sa.load_options_autoflush(orm_context)
            seen["token"] = _sa.identity_token_option(orm_context.load_options)
            seen["with_token"] = _sa.with_identity_token(
                orm_context, orm_context.execution_options, "s9"
            )

        event.listen(session, "do_orm_execute", listen)
        session.execute(statement).all()
    return seen


def check_select_head(engine: Engine) -> None:
    assert _sa.select_head(select(t)) == (None, [t])
    for_update, columns = _sa.select_head(select(func.nextval("s"), t.c.id).with_for_update())
    assert for_update is not None and len(columns) == 2 and columns[1] is t.c.id
    with pytest.raises(AttributeError):
        _sa.select_head(insert(t))


def check_statement_options(engine: Engine) -> None:
    statement = select(t).execution_options(use_replica=True)
    assert _sa.statement_options(statement) == statement.get_execution_options()
    assert _sa.statement_options(insert(t)) == {}
    with pytest.raises(AttributeError):
        _sa.statement_options(None)


def check_select_head_of(engine: Engine) -> None:
    union = select(t).union_all(select(t)).with_for_update()
    for_update, columns = _sa.select_head_of(union)
    assert for_update is not None and columns == ()
    assert _sa.select_head_of(insert(t)) == (None, ())
    assert _sa.select_head_of(select(t))[1] == [t]


def check_select_clauses(engine: Engine) -> None:
    stmt = (
        select(t.c.v, func.count())
        .distinct()
        .group_by(t.c.v)
        .having(func.count() > 1)
        .order_by(t.c.v)
        .limit(5)
        .offset(2)
        .prefix_with("/* p */")
    )
    parts = _sa.select_clauses(stmt)
    assert set(parts) == {
        "columns",
        "distinct",
        "distinct_on",
        "extensions",
        "group_by",
        "having",
        "order_by",
        "limit",
        "offset",
        "fetch",
        "for_update",
    }
    assert parts["distinct"] and not parts["distinct_on"] and not parts["for_update"]
    assert len(parts["columns"]) == 2 and len(parts["group_by"]) == 1
    assert len(parts["having"]) == 1 and len(parts["order_by"]) == 1
    assert parts["limit"] is not None and parts["offset"] is not None and parts["fetch"] is None
    assert len(parts["extensions"]) == 1
    on = _sa.select_clauses(_sa.select_distinct_on(select(t), t.c.v))  # DISTINCT ON
    assert on["distinct_on"]


def check_limit_offset(engine: Engine) -> None:
    assert _sa.limit_offset(select(t).limit(5).offset(2)) == (5, 2)
    assert _sa.limit_offset(select(t)) == (None, None)


def check_deannotate(engine: Engine) -> None:
    annotated = Item.id.expression  # the ORM's annotated copy of the column
    assert annotated is not Item.__table__.c.id
    assert _sa.deannotate(annotated) is Item.__table__.c.id


def check_type_affinity(engine: Engine) -> None:
    assert _sa.type_affinity(t.c.id.type) is _sa.type_affinity(u.c.w.type)
    assert _sa.type_affinity(Item.__table__.c.name.type) is not _sa.type_affinity(t.c.id.type)


def check_is_orm_statement(engine: Engine) -> None:
    assert _sa.is_orm_statement(select(Item))
    assert not _sa.is_orm_statement(select(t))


def check_extra_froms(engine: Engine) -> None:
    stmt = delete(t).where(t.c.id == u.c.id)
    assert _sa.extra_froms(stmt) == ()  # implicit FROMs are the compiler's, not stored
    if hasattr(stmt, "using"):  # DELETE ... USING, SQLAlchemy 2.1
        assert _sa.extra_froms(stmt.using(u)) == (u,)
    assert _sa.extra_froms(update(t).values(v=1)) == ()


def check_dml_froms(engine: Engine) -> None:
    from sqlalchemy.dialects import postgresql

    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    stmt = update(t).where(t.c.id == u.c.id).values(v=1)
    assert _sa.dml_froms(stmt.compile(dialect=dialect)) == (u,)
    orm = delete(Item).where(Item.id == u.c.id)
    assert _sa.dml_froms(orm.compile(dialect=dialect)) == (u,)
    assert _sa.dml_froms(update(t).values(v=1).compile(dialect=dialect)) == ()


def check_dml_values(engine: Engine) -> None:
    values = _sa.dml_values(update(t).values(v=1))
    assert values is not None and [getattr(k, "key", k) for k in values] == ["v"]
    assert _sa.dml_values(update(t)) is None


def check_on_conflict_clause(engine: Engine) -> None:
    stmt = pg_insert(t).values(id=1, v=1)
    upsert = stmt.on_conflict_do_update(index_elements=["id"], set_={"v": stmt.excluded.v})
    assert _sa.on_conflict_clause(upsert) is not None
    assert _sa.on_conflict_clause(stmt) is None


def check_is_label_reference(engine: Engine) -> None:
    label = t.c.v.label("total")
    stmt = select(label).order_by(label)
    assert _sa.is_label_reference(_order_term(stmt))
    assert not _sa.is_label_reference(t.c.v)


def check_is_textual_label_reference(engine: Engine) -> None:
    stmt = select(t.c.v.label("total")).order_by("total")
    assert _sa.is_textual_label_reference(_order_term(stmt))
    assert not _sa.is_textual_label_reference(literal_column("total"))


def _order_term(stmt: Any) -> Any:
    return _sa.select_clauses(stmt)["order_by"][0]


def check_non_compile_orm_options(engine: Engine) -> None:
    seen = _orm_state(engine, select(Item).options(set_shard_id("s1")))
    assert [type(o) for o in seen["options"]] == [set_shard_id]


def check_identity_token_option(engine: Engine) -> None:
    assert _orm_state(engine, select(Item))["token"] is None


def check_with_identity_token(engine: Engine) -> None:
    options = _orm_state(engine, select(Item))["with_token"]
    assert options["_sa_orm_load_options"]._identity_token == "s9"


def check_compile_state_cls(engine: Engine) -> None:
    assert _orm_state(engine, select(Item))["compile_state_cls"] is not None


def check_load_options_autoflush(engine: Engine) -> None:
    assert _orm_state(engine, select(Item))["autoflush"] is True
    assert _orm_state(engine, select(Item).execution_options(autoflush=False))["autoflush"] is False


def check_autoflush(engine: Engine) -> None:
    with Session(engine) as session:
        session.add(Item(id=3, name="c"))
        _sa.autoflush(session)
        assert not session.new
        session.rollback()


def check_is_flushing(engine: Engine) -> None:
    with Session(engine) as session:
        seen: list[bool] = []
        event.listen(session, "before_flush", lambda s, *a: seen.append(_sa.is_flushing(s)))
        assert not _sa.is_flushing(session)
        session.add(Item(id=4, name="d"))
        session.flush()
        assert seen == [True] and not _sa.is_flushing(session)
        session.rollback()


def check_transaction_connection(engine: Engine) -> None:
    with Session(engine) as session:
        conn = session.connection()
        transaction = session.get_transaction()
        assert transaction is not None
        assert _sa.transaction_connection(transaction, engine) is conn
        other = create_engine(engine.url)
        assert _sa.transaction_connection(transaction, other) is None
        other.dispose()


def check_committing_connections(engine: Engine) -> None:
    with Session(engine) as session:
        conn = session.connection()
        transaction = session.get_transaction()
        assert transaction is not None
        assert _sa.committing_connections(transaction) == [conn]
        with engine.connect() as outside:
            outside.begin()
            joined = Session(bind=outside)  # joined: its commit never commits `outside`
            joined.connection()
            joined_transaction = joined.get_transaction()
            assert joined_transaction is not None
            assert _sa.committing_connections(joined_transaction) == []
            joined.close()


def check_exclude_from_commit(engine: Engine) -> None:
    with Session(engine) as session:
        conn = session.connection()
        transaction = session.get_transaction()
        assert transaction is not None
        committed: list[Connection] = []
        event.listen(conn, "commit", committed.append)
        _sa.exclude_from_commit(transaction, conn)
        assert _sa.committing_connections(transaction) == []
        session.commit()  # sends no COMMIT on conn: the caller ends its transaction
        assert committed == []


def check_mapped_registries(engine: Engine) -> None:
    assert Base.registry in _sa.mapped_registries()


def check_rewind(engine: Engine) -> None:
    with engine.connect() as conn:
        table = Item.__table__
        result: CursorResult[Any] = conn.execute(select(table.c.id).order_by(table.c.id))
        rows = list(result.all())  # as the fan-out fetches them
        replay = _sa.rewind(result, list(reversed(rows)))
        assert [r[0] for r in replay.all()] == [2, 1]


def check_orm_rows(engine: Engine) -> None:
    with Session(engine) as session:
        result = session.execute(select(Item).order_by(Item.id))
        rows = _sa.orm_rows(result)  # single-entity rows: the objects themselves
        assert [item.id for item in rows] == [1, 2]


def check_merged_result_like(engine: Engine) -> None:
    with Session(engine) as session:
        template = session.execute(select(Item).order_by(Item.id))
        rows = _sa.orm_rows(template)
        merged = _sa.merged_result_like(template, reversed(rows))
        assert [item.id for item in merged.scalars()] == [2, 1]


def check_row_getter(engine: Engine) -> None:
    table = Item.__table__
    with engine.connect() as conn:
        result = conn.execute(select(table.c.id, table.c.name.label("n")).order_by(table.c.id))
        getter = _sa.row_getter(result, "n")
        assert getter is not None and getter(result.first()) == "a"
        assert _sa.row_getter(result, "missing") is None


def check_keep_prepared(engine: Engine) -> None:
    with engine.connect() as conn:
        transaction = conn.begin_twophase()
        _sa.keep_prepared(transaction)
        assert transaction._is_prepared is False
        transaction.rollback()


def check_proxied_events_flag(engine: Engine) -> None:
    # An OptionEngine subclass with the flag: it follows the proxied engine's flag (also
    # when a listener is added there later), and a listener on the view itself sets it.
    proxied = create_engine(engine.url)
    view_class = type(
        "View", (type(proxied.execution_options()),), {"_has_events": _sa.proxied_events_flag()}
    )
    view = view_class(proxied, {})
    assert view._has_events is False
    event.listen(proxied, "before_cursor_execute", lambda *args: None)
    assert view._has_events is True
    other = type(
        "View", (type(proxied.execution_options()),), {"_has_events": _sa.proxied_events_flag()}
    )(create_engine(engine.url), {})
    seen: list[str] = []
    event.listen(other, "before_cursor_execute", lambda *args: seen.append("view"))
    assert other._has_events is True
    with other.connect() as conn:  # the view's own listener runs on its connections
        conn.exec_driver_sql("SELECT 1")
    assert seen == ["view"]
    other.dispose()
    proxied.dispose()


def _bulk_context(engine: Engine, statement: Any, params: Any) -> dict[str, Any]:
    """Run ``statement`` with ``params`` in a Session (rolled back) and read, inside
    do_orm_execute, what _sa reads there about ORM bulk statements."""
    seen: dict[str, Any] = {}
    with Session(engine) as session:

        def listen(orm_context: ORMExecuteState) -> None:
            seen["bulk"] = _sa.bulk_strategy(orm_context)
            seen["statement"] = orm_context.statement

        event.listen(session, "do_orm_execute", listen)
        session.execute(statement, params)
        session.rollback()
    return seen


def check_bulk_strategy(engine: Engine) -> None:
    assert _bulk_context(engine, insert(Item), [{"id": 10, "name": "x"}])["bulk"] is True
    assert _bulk_context(engine, insert(Item), {"id": 10, "name": "x"})["bulk"] is True
    assert _bulk_context(engine, update(Item), [{"id": 1, "name": "x"}])["bulk"] is True
    assert _bulk_context(engine, insert(Item).values(id=10, name="x"), None)["bulk"] is False
    assert (
        _bulk_context(engine, update(Item).where(Item.id == 1).values(name="x"), None)["bulk"]
        is False
    )
    assert _bulk_context(engine, select(Item), None)["bulk"] is False


def check_compilable_alone(engine: Engine) -> None:
    statement = _bulk_context(engine, insert(Item), [{"id": 10, "name": "x"}])["statement"]
    with pytest.raises(KeyError):  # SQLAlchemy compiles it only inside its bulk persistence
        statement.compile(dialect=engine.dialect)
    sql = str(_sa.compilable_alone(statement).compile(dialect=engine.dialect))
    assert sql.startswith("INSERT INTO sa_contract_items")
    plain = insert(Item).values(id=1, name="a")
    assert _sa.compilable_alone(plain) is plain


def check_dml_multi_values(engine: Engine) -> None:
    rows = _sa.dml_multi_values(insert(t).values([{"id": 1, "v": 2}, {"id": 2, "v": 3}]))
    assert [{getattr(k, "key", k): v for k, v in row.items()} for row in rows] == [
        {"id": 1, "v": 2},
        {"id": 2, "v": 3},
    ]
    assert _sa.dml_multi_values(insert(t).values([(1, 2)])) == [{t.c.id: 1, t.c.v: 2}]
    assert _sa.dml_multi_values(insert(t).values(id=1)) == []
    assert _sa.dml_multi_values(update(t).values(v=1)) == []


def check_returning_identity_token(engine: Engine) -> None:
    with Session(engine) as session:
        options = _sa.returning_identity_token({"autoflush": False}, "s9")
        item = session.scalars(
            insert(Item).returning(Item), [{"id": 12, "name": "z"}], execution_options=options
        ).one()
        assert sqlalchemy.inspect(item).identity_token == "s9"
        session.rollback()


def check_without_connection_callable(engine: Engine) -> None:
    from sqlalchemy.ext.horizontal_shard import ShardedSession

    session = ShardedSession(
        shards={"a": engine},
        shard_chooser=lambda mapper, instance, **kw: "a",
        identity_chooser=lambda *args, **kw: ["a"],
        execute_chooser=lambda orm_context: ["a"],
    )
    with session:
        with pytest.raises(NotImplementedError, match="connection_callable"):
            session.execute(insert(Item), [{"id": 13, "name": "w"}])
        with _sa.without_connection_callable(session):
            session.execute(insert(Item), [{"id": 13, "name": "w"}])
        assert session.connection_callable is not None  # the class's method again
        assert session.scalar(select(Item.name).where(Item.id == 13)) == "w"
        session.rollback()


# -- where SQLAlchemy 2.0 and 2.1 differ (tests/test_compat.py covers them further) ---------


def check_SQLALCHEMY_VERSION(engine: Engine) -> None:
    major, minor = (int(part) for part in sqlalchemy.__version__.split(".")[:2])
    assert (major, minor) == _sa.SQLALCHEMY_VERSION


def check_await_(engine: Engine) -> None:
    async def seven() -> int:
        return 7

    async def main() -> int:
        return int(await greenlet_spawn(lambda: _sa.await_(seven())))

    assert asyncio.run(main()) == 7


def check_on_conflict_set_keys(engine: Engine) -> None:
    t = Item.__table__
    stmt = (
        pg_insert(t).values(id=1).on_conflict_do_update(index_elements=["id"], set_={"name": "b"})
    )
    assert [getattr(k, "key", k) for k in _sa.on_conflict_set_keys(stmt)] == ["name"]
    assert _sa.on_conflict_set_keys(pg_insert(t).values(id=1)) == []


def check_update_set_keys(engine: Engine) -> None:
    t = Item.__table__
    assert [getattr(k, "key", k) for k in _sa.update_set_keys(update(t).values(name="a"))] == [
        "name"
    ]
    ordered = update(t).ordered_values((t.c.name, "a"))
    assert [getattr(k, "key", k) for k in _sa.update_set_keys(ordered)] == ["name"]
    assert _sa.update_set_keys(update(t)) == []


def check_select_syntax_extensions(engine: Engine) -> None:
    assert _sa.select_syntax_extensions(select(Item.__table__)) == (None, None, None, None)


def check_select_distinct_on(engine: Engine) -> None:
    t = Item.__table__
    sql = str(_sa.select_distinct_on(select(t), t.c.name).compile(dialect=engine.dialect))
    assert "DISTINCT ON" in sql


CHECKS: dict[str, Callable[[Engine], None]] = {
    name: globals()[f"check_{name}"] for name in _sa.__all__ if f"check_{name}" in globals()
}


def test_every_function_has_a_check() -> None:
    """Each function _sa exports is exercised below; a new one without a check fails here."""
    assert sorted(CHECKS) == sorted(_sa.__all__)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_sa_contract(engine: Engine, name: str) -> None:
    """The private SQLAlchemy attribute behind _sa.<name> still means what we read it as."""
    CHECKS[name](engine)
