"""A real Flask-SQLAlchemy app with two binds, each routed over its own replicas.

The default bind is the topology's primary with its two replicas; the ``users`` bind
(``__bind_key__ = "users"``) is shard server 0 with its streaming replica. Replay is paused
on every one of those replicas where a test says so. Routes answer with
``inet_server_port()`` and ``pg_is_in_recovery()`` asked through ``db.session`` on each bind
(a ``users`` table row carries them), so where a statement ran is the server's word.

The server-free checks at the end build apps whose URLs are never connected to.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask, redirect, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import func, select
from sqlalchemy.orm import Mapped, mapped_column

import sqlalchemy_scale as ss
from sqlalchemy_scale.consistency import parse_lsn, parse_token
from sqlalchemy_scale.flask import Scale, _replicas_by_bind, session_options
from sqlalchemy_scale.local import LocalCluster, PgNode
from sqlalchemy_scale.testing import wait_until

_names = itertools.count(1)

db = SQLAlchemy(session_options=session_options(expire_on_commit=False))


class BindNote(db.Model):  # type: ignore[name-defined,misc]
    """On the default bind (the primary and its replicas)."""

    __tablename__ = "flask_bind_notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str]


class Account(db.Model):  # type: ignore[name-defined,misc]
    """On the ``users`` bind (shard server 0 and its replica)."""

    __tablename__ = "flask_bind_accounts"
    __bind_key__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]


class SlowAccount(db.Model):  # type: ignore[name-defined,misc]
    """On the ``users`` bind; a deferred trigger makes its COMMIT sleep (see SLOW_SCHEMA)."""

    __tablename__ = "flask_bind_slow"
    __bind_key__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]


SLOW_SCHEMA = """
DROP TABLE IF EXISTS flask_bind_slow;
CREATE TABLE flask_bind_slow (id serial PRIMARY KEY, name text NOT NULL);
CREATE OR REPLACE FUNCTION flask_bind_slow_check() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_sleep(10); RETURN NULL; END $$;
CREATE CONSTRAINT TRIGGER flask_bind_slow_check AFTER INSERT ON flask_bind_slow
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION flask_bind_slow_check();
"""


# Where a read ran, asked on each bind: from the model (its mapper), so the statement goes to
# the model's bind (a bare select() names no table and goes to the default bind).
WHERE_DEFAULT = select(func.inet_server_port(), func.pg_is_in_recovery()).select_from(BindNote)
WHERE_USERS = select(func.inet_server_port(), func.pg_is_in_recovery()).select_from(Account)


@pytest.fixture(scope="module")
def tables(scale_cluster: LocalCluster) -> Iterator[None]:
    """flask_bind_notes on the primary, flask_bind_accounts on shard0, each with one row (so
    the WHERE_* queries return one), replayed by every replica before the tests."""
    scale_cluster.primary.execute(
        "DROP TABLE IF EXISTS flask_bind_notes; "
        "CREATE TABLE flask_bind_notes (id serial PRIMARY KEY, body text NOT NULL); "
        "INSERT INTO flask_bind_notes (body) VALUES ('first')"
    )
    scale_cluster.shards[0].execute(
        "DROP TABLE IF EXISTS flask_bind_accounts; "
        "CREATE TABLE flask_bind_accounts (id serial PRIMARY KEY, name text NOT NULL); "
        "INSERT INTO flask_bind_accounts (name) VALUES ('first'); " + SLOW_SCHEMA
    )
    for replica in (*scale_cluster.replicas, *scale_cluster.shard_replicas[0]):
        replica.wait_for_replay()
    yield
    scale_cluster.primary.execute("DROP TABLE IF EXISTS flask_bind_notes")
    scale_cluster.shards[0].execute(
        "DROP TABLE IF EXISTS flask_bind_accounts, flask_bind_slow; "
        "DROP FUNCTION IF EXISTS flask_bind_slow_check()"
    )


def where(session: Any, stmt: Any) -> dict[str, Any]:
    port, in_recovery = session.execute(stmt.limit(1)).one()
    return {"port": port, "replica": in_recovery}


def make_app(cluster: LocalCluster, driver: str, **config: Any) -> tuple[Flask, Scale]:
    """The app under test: two binds, each with replicas, models and db.session as usual."""
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=cluster.primary.url(driver),
        SQLALCHEMY_BINDS={"users": cluster.shards[0].url(driver)},
        SQLALCHEMY_SCALE_REPLICAS={
            None: [r.url(driver) for r in cluster.replicas],
            "users": [r.url(driver) for r in cluster.shard_replicas[0]],
        },
        **{"SQLALCHEMY_SCALE_OPTIONS": {"monitor_interval": 0.05}, **config},
    )
    db.init_app(app)
    scale = Scale(app, db=db)

    @app.post("/accounts")
    def create_account() -> Any:
        account = Account(name=request.form["name"])
        db.session.add(account)
        db.session.commit()
        return redirect(f"/accounts/{account.id}")

    @app.post("/notes")
    def create_note() -> Any:
        note = BindNote(body=request.form["body"])
        db.session.add(note)
        db.session.commit()
        return redirect(f"/notes/{note.id}")

    @app.post("/both")
    def create_both() -> Any:
        account = Account(name=request.form["name"])
        note = BindNote(body=request.form["name"])
        db.session.add_all([account, note])
        db.session.commit()
        return redirect(f"/both/{account.id}/{note.id}")

    @app.get("/accounts/<int:account_id>")
    def show_account(account_id: int) -> dict[str, Any]:
        found = db.session.get(Account, account_id) is not None
        return {
            "found": found,
            "users": where(db.session, WHERE_USERS),
            "default": where(db.session, WHERE_DEFAULT),
        }

    @app.get("/notes/<int:note_id>")
    def show_note(note_id: int) -> dict[str, Any]:
        found = db.session.get(BindNote, note_id) is not None
        return {"found": found, "default": where(db.session, WHERE_DEFAULT)}

    @app.get("/both/<int:account_id>/<int:note_id>")
    def show_both(account_id: int, note_id: int) -> dict[str, Any]:
        return {
            "account": db.session.get(Account, account_id) is not None,
            "note": db.session.get(BindNote, note_id) is not None,
            "users": where(db.session, WHERE_USERS),
            "default": where(db.session, WHERE_DEFAULT),
        }

    @app.route("/where", methods=["GET", "POST"])
    def whereabouts() -> dict[str, Any]:
        # A SELECT naming no model goes to the default bind unless bind_arguments name one.
        port, in_recovery = db.session.execute(
            select(func.inet_server_port(), func.pg_is_in_recovery()),
            bind_arguments={"mapper": Account},
        ).one()
        return {
            "users": where(db.session, WHERE_USERS),
            "default": where(db.session, WHERE_DEFAULT),
            "named": {"port": port, "replica": in_recovery},
        }

    @app.get("/visit/<how>")
    def visit(how: str) -> dict[str, Any]:
        # A GET that writes (or locks) on the users bind, then reads both binds in the same
        # transaction; nothing is committed.
        if how == "flush":
            db.session.add(Account(name="visitor"))
            db.session.flush()
        else:
            db.session.execute(select(Account.id).limit(1).with_for_update())
        answer = {
            "users": where(db.session, WHERE_USERS),
            "default": where(db.session, WHERE_DEFAULT),
        }
        db.session.rollback()
        return answer

    return app, scale


@pytest.fixture
def app(scale_cluster: LocalCluster, driver: str, tables: None) -> Iterator[Flask]:
    """The two-bind app with default settings (no SECRET_KEY: tokens unsigned)."""
    app, scale = make_app(scale_cluster, driver)
    yield app
    scale.dispose(app)


@pytest.fixture
def all_paused(scale_cluster: LocalCluster, paused: Callable[[PgNode], None]) -> LocalCluster:
    """Replay paused on the primary's replicas and on shard0's replica (resumed after)."""
    for replica in (*scale_cluster.replicas, *scale_cluster.shard_replicas[0]):
        paused(replica)
    return scale_cluster


def on_replica(answer: dict[str, Any], replicas: list[PgNode]) -> bool:
    return answer["replica"] is True and answer["port"] in {r.port for r in replicas}


def on_primary(answer: dict[str, Any], primary: PgNode) -> bool:
    return answer == {"port": primary.port, "replica": False}


@pytest.mark.parametrize("carrier", ["cookie", "header"])
def test_a_write_to_a_bind_key_model_is_read_in_the_next_request(
    app: Flask, all_paused: LocalCluster, carrier: str
) -> None:
    """With replay paused everywhere, an account posted on the users bind is found by the next
    GET (token from the cookie or the header), read on the users bind's primary, while that
    GET's reads of the default bind still go to the default bind's replicas."""
    cluster = all_paused
    client = app.test_client(use_cookies=carrier == "cookie")
    stale, answers = 0, []
    for _ in range(5):
        posted = client.post("/accounts", data={"name": f"user {next(_names)}"})
        assert posted.status_code == 302, posted.text
        token = posted.headers["X-Scale-Token"]
        assert set(parse_token(token)) == {"users"}  # only the users bind was written
        headers = {"X-Scale-Token": token} if carrier == "header" else {}
        answer = client.get(posted.headers["Location"], headers=headers).json
        stale += not answer["found"]
        answers.append(answer)
    stranger = app.test_client().get(posted.headers["Location"]).json  # no token at all
    print(f"\nflask binds ({carrier}): 5 accounts posted and read on the next GET, stale: {stale}")
    assert stale == 0
    assert all(on_primary(a["users"], cluster.shards[0]) for a in answers)
    assert all(on_replica(a["default"], cluster.replicas) for a in answers)
    assert not stranger["found"] and on_replica(stranger["users"], cluster.shard_replicas[0])


def test_a_commit_that_wrote_to_two_binds_carries_both_positions(
    app: Flask, all_paused: LocalCluster
) -> None:
    """One commit writing an account (users bind) and a note (default bind) answers with one
    token covering both primaries; the next GET finds both, each read on its primary."""
    cluster = all_paused
    client = app.test_client()
    posted = client.post("/both", data={"name": f"both {next(_names)}"})
    token = posted.headers["X-Scale-Token"]
    positions = parse_token(token)
    answer = client.get(posted.headers["Location"]).json
    ((default_lsn,),) = cluster.primary.execute("SELECT pg_current_wal_insert_lsn()::text")
    ((users_lsn,),) = cluster.shards[0].execute("SELECT pg_current_wal_insert_lsn()::text")
    assert set(positions) == {None, "users"}
    # Each position is its own primary's (at or before its current insert position).
    assert positions[None] <= parse_lsn(default_lsn)
    assert positions["users"] <= parse_lsn(users_lsn)
    assert answer["account"] and answer["note"]
    assert on_primary(answer["users"], cluster.shards[0])
    assert on_primary(answer["default"], cluster.primary)


def test_a_write_to_the_default_bind_leaves_the_users_bind_on_its_replica(
    app: Flask, all_paused: LocalCluster
) -> None:
    """After a write on the default bind only, the next GET reads that bind from its primary
    and the users bind from shard0's replica (the token has no position for it)."""
    cluster = all_paused
    client = app.test_client()
    posted = client.post("/notes", data={"body": f"note {next(_names)}"})
    token = posted.headers["X-Scale-Token"]
    note_id = int(posted.headers["Location"].split("/")[-1])
    # Account 1 was replayed by shard0's replica before replay was paused.
    answer = client.get(f"/both/1/{note_id}").json
    assert set(parse_token(token)) == {None} and parse_token(token)[None] > 0
    assert answer["note"] and answer["account"]
    assert on_primary(answer["default"], cluster.primary)
    assert on_replica(answer["users"], cluster.shard_replicas[0])


@pytest.mark.parametrize("how", ["flush", "for update"])
def test_the_transaction_has_written_is_tracked_per_bind(
    app: Flask, scale_cluster: LocalCluster, how: str
) -> None:
    """In a GET whose transaction wrote to (or locked rows of) the users bind, later reads of
    the users bind go to its primary and reads of the default bind to a replica."""
    answer = app.test_client().get(f"/visit/{how}").json
    assert on_primary(answer["users"], scale_cluster.shards[0])
    assert on_replica(answer["default"], scale_cluster.replicas)


def test_statements_on_each_bind_land_where_the_method_says(
    app: Flask, scale_cluster: LocalCluster
) -> None:
    """Without tokens, a GET reads each bind from that bind's replica, and a POST reads each
    bind from that bind's primary (a bind named by bind_arguments={"mapper": ...} too)."""
    client = app.test_client()
    got = client.get("/where").json
    posted = client.post("/where").json
    assert on_replica(got["users"], scale_cluster.shard_replicas[0])
    assert on_replica(got["named"], scale_cluster.shard_replicas[0])
    assert on_replica(got["default"], scale_cluster.replicas)
    assert on_primary(posted["users"], scale_cluster.shards[0])
    assert on_primary(posted["named"], scale_cluster.shards[0])
    assert on_primary(posted["default"], scale_cluster.primary)


def test_forged_and_malformed_tokens_give_no_errors(
    scale_cluster: LocalCluster,
    driver: str,
    tables: None,
    all_paused: LocalCluster,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Malformed tokens and forged (far-future) positions for either bind give no error page:
    beside the real cookie the write is still read; alone, a malformed value is as if absent
    (both binds read from their replicas), and a forged position is refused (logged) and
    ignored from then on."""
    cluster = all_paused
    app, scale = make_app(cluster, driver)
    malformed = ["users=junk", "users=0/1&users=0/2", "nobind=0/1&&", "=&users"]
    forged = ["users=FFFFFFFF/FFFFFFF0", "=FFFFFFFF/FFFFFFF1&users=FFFFFFFF/FFFFFFF1"]
    try:
        client = app.test_client()
        posted = client.post("/accounts", data={"name": f"forged {next(_names)}"})
        account_url = posted.headers["Location"]
        beside, alone, again = [], [], []
        with caplog.at_level(logging.WARNING, logger="sqlalchemy_scale"):
            for value in malformed + forged:
                beside.append(client.get(account_url, headers={"X-Scale-Token": value}))
                cookieless = app.test_client(use_cookies=False)
                alone.append(cookieless.get(account_url, headers={"X-Scale-Token": value}))
                # Asked again, a refused position is ignored as if absent.
                again.append(cookieless.get(account_url, headers={"X-Scale-Token": value}))
    finally:
        scale.dispose(app)
    responses = beside + alone + again
    assert [r.status_code for r in responses] == [200] * len(responses)
    assert all(r.json["found"] for r in beside)  # the cookie's valid token still applies
    as_if_absent = alone[: len(malformed)] + again
    for answer in (r.json for r in as_if_absent):
        assert not answer["found"]  # a paused replica, without the new account
        assert on_replica(answer["users"], cluster.shard_replicas[0])
        assert on_replica(answer["default"], cluster.replicas)
    assert caplog.text.count("ignored the causal token in the header") == 3 * len(malformed)
    assert caplog.text.count("ahead of the WAL position") == 3  # each forged position, once


def test_signed_tokens_covering_two_binds_round_trip(
    scale_cluster: LocalCluster, driver: str, tables: None, all_paused: LocalCluster
) -> None:
    """With SECRET_KEY set, a token covering both binds goes out signed and is honoured for
    both on the next request; the same token unsigned is ignored."""
    app, scale = make_app(all_paused, driver, SECRET_KEY="two binds")
    try:
        client = app.test_client(use_cookies=False)
        posted = client.post("/both", data={"name": f"signed {next(_names)}"})
        value = posted.headers["X-Scale-Token"]
        token, _, signature = value.partition(".")
        signed = client.get(posted.headers["Location"], headers={"X-Scale-Token": value}).json
        unsigned = client.get(posted.headers["Location"], headers={"X-Scale-Token": token}).json
    finally:
        scale.dispose(app)
    assert signature and set(parse_token(token)) == {None, "users"}
    assert signed["account"] and signed["note"]
    assert not unsigned["account"] and not unsigned["note"]


def test_a_connection_lost_in_the_second_binds_commit_is_outcome_unknown(
    app: Flask, scale_cluster: LocalCluster
) -> None:
    """A commit that wrote to both binds, whose users-bind connection is lost inside COMMIT,
    raises CommitOutcomeUnknown naming that bind's primary (not a bare OperationalError), and
    the users row is not there. (SQLAlchemy commits a session's connections in no fixed
    order: the default bind's row may or may not have committed before.)"""
    shard = scale_cluster.shards[0]

    def sleeping() -> list[Any]:
        return shard.execute("SELECT pid FROM pg_stat_activity WHERE wait_event = 'PgSleep'")

    def terminate() -> None:
        if wait_until(lambda: bool(sleeping()), timeout=10):
            for (pid,) in sleeping():
                shard.execute(f"SELECT pg_terminate_backend({pid})")

    name = f"slow {next(_names)}"
    killer = threading.Thread(target=terminate, daemon=True)
    with app.app_context():
        db.session.add(BindNote(body=name))
        db.session.flush()
        db.session.add(SlowAccount(name=name))
        db.session.flush()
        killer.start()
        with pytest.raises(ss.CommitOutcomeUnknown) as caught:
            db.session.commit()
        # Closed (by the app context), not rolled back: if the default bind committed first,
        # SQLAlchemy warns when asked to roll back its committed transaction.
    killer.join(15)
    assert "[users]" in str(caught.value) and caught.value.node == "primary"
    assert scale_cluster.password not in str(caught.value)
    assert shard.execute("SELECT count(*) FROM flask_bind_slow WHERE name = %s", [name]) == [(0,)]


def test_a_lost_replica_of_the_users_bind_is_retried_on_its_primary(
    scale_cluster: LocalCluster,
    driver: str,
    tables: None,
    scale_restart: Callable[[PgNode], None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With shard0's replica stopped (and no monitor to notice first), a GET whose first
    statement reads the users bind fails on that replica and is retried once on the users
    bind's primary: the page is served, and the default bind still reads from its replicas."""
    app, scale = make_app(scale_cluster, driver, SQLALCHEMY_SCALE_OPTIONS={"monitor": False})
    victim = scale_cluster.shard_replicas[0][0]
    scale_restart(victim)
    try:
        victim.stop()
        with caplog.at_level(logging.WARNING, logger="sqlalchemy_scale"):
            response = app.test_client().get("/accounts/1")
    finally:
        scale.dispose(app)
    assert response.status_code == 200, response.text
    answer = response.json
    assert answer["found"] and on_primary(answer["users"], scale_cluster.shards[0])
    assert on_replica(answer["default"], scale_cluster.replicas)
    assert "retrying it once on another node" in caplog.text
    assert "[users]" in caplog.text  # the users bind's replica set is named


# -- configuration (no server: these URLs are never connected to) ----------------------------

_NOWHERE = "postgresql+psycopg2://app@127.0.0.1:9/app"


def config_app(**config: Any) -> tuple[Flask, SQLAlchemy]:
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=_NOWHERE,
        SQLALCHEMY_SCALE_OPTIONS={"monitor": False},
        **config,
    )
    this_db = SQLAlchemy(session_options=session_options())
    this_db.init_app(app)
    return app, this_db


def test_a_replicas_bind_key_missing_from_binds_is_refused() -> None:
    """A bind key in SQLALCHEMY_SCALE_REPLICAS that SQLALCHEMY_BINDS lacks raises at
    init_app, naming the key and the binds there are."""
    app, this_db = config_app(
        SQLALCHEMY_BINDS={"users": _NOWHERE.replace("/app", "/users")},
        SQLALCHEMY_SCALE_REPLICAS={None: [_NOWHERE], "orders": [_NOWHERE]},
    )
    with pytest.raises(ss.ConfigurationError, match=r"bind key\(s\) 'orders'.*\['users'\]"):
        Scale(app, db=this_db)
    assert "sqlalchemy_scale" not in app.extensions


@pytest.mark.parametrize(
    ("replicas", "match"),
    [
        ({"users": "postgresql://x@127.0.0.1:9/u"}, r"\['users'\] must be a list"),
        ({None: 5}, r"\[None\] must be a list"),
        ("postgresql://x@127.0.0.1:9/u", r"REPLICAS must be a list"),
    ],
)
def test_replicas_that_are_not_lists_of_urls_are_refused(replicas: Any, match: str) -> None:
    """A bind's replicas given as one URL string (or anything but a list) raise at init_app,
    naming the bind key."""
    app, this_db = config_app(
        SQLALCHEMY_BINDS={"users": _NOWHERE}, SQLALCHEMY_SCALE_REPLICAS=replicas
    )
    with pytest.raises(ss.ConfigurationError, match=match):
        Scale(app, db=this_db)


def test_a_causal_scope_in_the_options_is_refused() -> None:
    """SQLALCHEMY_SCALE_OPTIONS apply to every bind's ReplicaSet, whose causal scope is its
    bind key: a causal_scope there raises at init_app rather than be silently replaced."""
    app, this_db = config_app(SQLALCHEMY_SCALE_REPLICAS=[_NOWHERE])
    app.config["SQLALCHEMY_SCALE_OPTIONS"] = {"monitor": False, "causal_scope": "x"}
    with pytest.raises(ss.ConfigurationError, match="causal_scope"):
        Scale(app, db=this_db)


def test_an_app_without_a_default_bind_is_refused() -> None:
    """db.session routes over the default bind's primary: an app with only SQLALCHEMY_BINDS
    is refused at init_app, saying to set SQLALCHEMY_DATABASE_URI."""
    app = Flask(__name__)
    app.config.update(SQLALCHEMY_BINDS={"users": _NOWHERE})
    this_db = SQLAlchemy(session_options=session_options())
    this_db.init_app(app)
    with pytest.raises(ss.ConfigurationError, match="SQLALCHEMY_DATABASE_URI"):
        Scale(app, db=this_db)


def test_each_bind_with_replicas_gets_its_own_replica_set() -> None:
    """A list configures the default bind; a mapping gives each bind with replicas a
    ReplicaSet whose primary is Flask-SQLAlchemy's engine for it and whose causal scope is
    its bind key; binds without replicas get none."""
    engines = {None: object(), "users": object(), "logs": object()}
    assert _replicas_by_bind(["r1"], engines) == {None: ["r1"]}  # type: ignore[arg-type]
    assert _replicas_by_bind({"users": ["r2"], "logs": []}, engines) == {  # type: ignore[arg-type]
        None: [],
        "users": ["r2"],
    }
    app, this_db = config_app(
        SQLALCHEMY_BINDS={"users": _NOWHERE.replace("/app", "/users"), "logs": _NOWHERE},
        SQLALCHEMY_SCALE_REPLICAS={None: [_NOWHERE], "users": [_NOWHERE, _NOWHERE]},
    )
    scale = Scale(app, db=this_db)
    try:
        state = app.extensions["sqlalchemy_scale"]
        with app.app_context():
            app_engines = this_db.engines
        users = state.bind_replica_sets["users"]
        assert state.replica_set.primary.engine is app_engines[None]
        assert state.replica_set.causal_scope is None
        assert users.primary.engine is app_engines["users"]
        assert users.causal_scope == "users" and len(users.replicas) == 2
        assert set(state.bind_replica_sets) == {"users"}
    finally:
        scale.dispose(app)
