"""A real Flask-SQLAlchemy app (and a plain Flask one) on the real topology.

Replicas have replay paused where a test says so; each route answers with
``inet_server_port()`` and ``pg_is_in_recovery()`` asked through ``db.session``, so where a
request's statements ran is the server's word.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask, abort, redirect, request, url_for
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import func, select
from sqlalchemy.orm import Mapped, mapped_column

import sqlalchemy_scale as ss
from sqlalchemy_scale.flask import RoutingFlaskSession, Scale, session_options
from sqlalchemy_scale.local import LocalCluster

WHERE = select(func.inet_server_port(), func.pg_is_in_recovery())
_bodies = itertools.count(1)
METHODS = ["GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE"]

db = SQLAlchemy(session_options=session_options(expire_on_commit=False))


class FlaskNote(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "flask_notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str]


class ArchivedNote(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "flask_archive"
    __bind_key__ = "archive"

    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str]


@pytest.fixture(scope="module")
def tables(scale_cluster: LocalCluster) -> Iterator[None]:
    """flask_notes on the primary (replicated) and flask_archive on shard0, the 'archive' bind."""
    scale_cluster.primary.execute(
        "DROP TABLE IF EXISTS flask_notes; "
        "CREATE TABLE flask_notes (id serial PRIMARY KEY, body text NOT NULL)"
    )
    scale_cluster.shards[0].execute(
        "DROP TABLE IF EXISTS flask_archive; "
        "CREATE TABLE flask_archive (id serial PRIMARY KEY, body text NOT NULL)"
    )
    for replica in scale_cluster.replicas:
        replica.wait_for_replay()
    yield
    scale_cluster.primary.execute("DROP TABLE IF EXISTS flask_notes")
    scale_cluster.shards[0].execute("DROP TABLE IF EXISTS flask_archive")


def where(row: Any) -> dict[str, Any]:
    return {"port": row[0], "replica": row[1]}


def make_app(cluster: LocalCluster, driver: str, **config: Any) -> tuple[Flask, Scale]:
    """The Flask-SQLAlchemy app under test: db.session and db.Model as any app has them."""
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=cluster.primary.url(driver),
        SQLALCHEMY_BINDS={"archive": cluster.shards[0].url(driver)},
        SQLALCHEMY_SCALE_REPLICAS=[r.url(driver) for r in cluster.replicas],
        SQLALCHEMY_SCALE_OPTIONS={"monitor_interval": 0.05},
        **config,
    )
    db.init_app(app)
    scale = Scale(app, db=db)

    @app.post("/notes")
    def create() -> Any:
        note = FlaskNote(body=request.form["body"])
        db.session.add(note)
        db.session.commit()
        return redirect(url_for("show", note_id=note.id))

    @app.get("/notes/<int:note_id>")
    def show(note_id: int) -> dict[str, Any]:
        note = db.session.get(FlaskNote, note_id)
        return {"found": note is not None, **where(db.session.execute(WHERE).one())}

    @app.route("/where", methods=METHODS)
    def whereabouts() -> Any:
        stmt = WHERE.execution_options(use_replica=True) if "use_replica" in request.args else WHERE
        row = db.session.execute(stmt).one()
        # In a header too, so that HEAD (which has no body) tells where it ran.
        return where(row), {"X-Served-By": f"{row[0]} {row[1]}"}

    @app.post("/uncommitted")
    def uncommitted() -> dict[str, Any]:
        db.session.add(FlaskNote(body=request.form["body"]))
        db.session.flush()
        return where(db.session.execute(WHERE).one())

    @app.post("/conflict")
    def conflict() -> Any:
        db.session.add(FlaskNote(body=request.form["body"]))
        db.session.commit()
        abort(409)

    @app.post("/archive")
    def archive() -> dict[str, Any]:
        note = ArchivedNote(body=request.form["body"])
        db.session.add(note)
        db.session.commit()
        return {"id": note.id}

    @app.get("/archive/<int:note_id>")
    def show_archived(note_id: int) -> dict[str, Any]:
        row = db.session.execute(
            select(ArchivedNote.body, func.inet_server_port()).where(ArchivedNote.id == note_id)
        ).one_or_none()
        return {"found": row is not None, "port": row[1] if row else None}

    return app, scale


@pytest.fixture
def app(scale_cluster: LocalCluster, driver: str, tables: None) -> Iterator[Flask]:
    """The app with default settings (no SECRET_KEY: tokens unsigned)."""
    app, scale = make_app(scale_cluster, driver)
    yield app
    scale.dispose(app)


def post_note(client: Any) -> Any:
    """Post the form and follow the redirect to the note's page, as a browser would."""
    response = client.post("/notes", data={"body": f"note {next(_bodies)}"}, follow_redirects=True)
    assert response.status_code == 200, response.text
    return response


def replica_ports(cluster: LocalCluster) -> set[int]:
    return {r.port for r in cluster.replicas}


def test_a_posted_form_is_seen_on_the_redirect(app: Flask, paused_replicas: LocalCluster) -> None:
    """With replay paused on every replica, each posted note is on the page the redirect shows."""
    client = app.test_client()
    stale = 0
    for _ in range(10):
        answer = post_note(client).json
        stale += not answer["found"]
        assert answer["port"] == paused_replicas.primary.port
    note_url = post_note(client).request.path
    stranger = app.test_client()  # no cookie: a paused replica answers, without the note
    without = stranger.get(note_url).json
    print(f"\nflask: 11 forms posted and read on the redirect, stale: {stale}")
    assert stale == 0
    assert without["port"] in replica_ports(paused_replicas) and not without["found"]


def test_the_token_travels_in_a_cookie_and_a_header(
    app: Flask, scale_cluster: LocalCluster
) -> None:
    """A write answers with the HttpOnly SameSite=Lax cookie and the header, a read with neither,
    and the cookie is Secure over https."""
    client = app.test_client()
    wrote = client.post("/notes", data={"body": "x"})
    read = client.get("/where")
    token = wrote.headers["X-Scale-Token"]
    assert wrote.headers["Set-Cookie"] == f"scale_token={token}; Path=/; HttpOnly; SameSite=Lax"
    assert "Set-Cookie" not in read.headers and "X-Scale-Token" not in read.headers
    secure = app.test_client().post("/notes", data={"body": "x"}, base_url="https://localhost")
    assert secure.headers["Set-Cookie"].endswith("; Secure")


def test_an_error_response_after_a_commit_still_carries_the_token(
    app: Flask, paused_replicas: LocalCluster
) -> None:
    """A view that commits and then aborts with 409 answers with the new token, so the
    client's next read sees what was committed."""
    body = f"conflict {next(_bodies)}"
    client = app.test_client()
    refused = client.post("/conflict", data={"body": body})
    assert refused.status_code == 409
    ((note_id,),) = paused_replicas.primary.execute(
        "SELECT id FROM flask_notes WHERE body = %s", [body]
    )
    answer = client.get(f"/notes/{note_id}").json
    assert refused.headers["X-Scale-Token"] and "scale_token=" in refused.headers["Set-Cookie"]
    assert answer["found"] and answer["port"] == paused_replicas.primary.port


def test_carrier_names_come_from_app_config(
    scale_cluster: LocalCluster, driver: str, tables: None, paused_replicas: LocalCluster
) -> None:
    """SQLALCHEMY_SCALE_COOKIE_NAME and _HEADER_NAME rename both carriers, read and written."""
    app, scale = make_app(
        scale_cluster,
        driver,
        SQLALCHEMY_SCALE_COOKIE_NAME="db_pos",
        SQLALCHEMY_SCALE_HEADER_NAME="X-Db-Pos",
    )
    try:
        client = app.test_client(use_cookies=False)
        wrote = client.post("/notes", data={"body": "renamed"})
        token = wrote.headers["X-Db-Pos"]
        by_cookie = client.get(wrote.headers["Location"], headers={"Cookie": f"db_pos={token}"})
        by_header = client.get(wrote.headers["Location"], headers={"X-Db-Pos": token})
        old_name = client.get(wrote.headers["Location"], headers={"X-Scale-Token": token})
    finally:
        scale.dispose(app)
    assert wrote.headers["Set-Cookie"].startswith(f"db_pos={token};")
    assert "X-Scale-Token" not in wrote.headers
    assert by_cookie.json["found"] and by_header.json["found"]
    assert not old_name.json["found"]  # the default name is no longer read


def test_an_api_client_without_cookies_reads_its_writes_through_the_header(
    app: Flask, paused_replicas: LocalCluster
) -> None:
    """A client that keeps no cookies but returns X-Scale-Token never reads stale."""
    client = app.test_client(use_cookies=False)
    stale = 0
    for _ in range(5):
        wrote = client.post("/notes", data={"body": f"api {next(_bodies)}"})
        assert wrote.status_code == 302
        answer = client.get(
            wrote.headers["Location"], headers={"X-Scale-Token": wrote.headers["X-Scale-Token"]}
        ).json
        stale += not answer["found"]
    without = client.get(wrote.headers["Location"]).json
    assert stale == 0
    assert without["port"] in replica_ports(paused_replicas) and not without["found"]


def test_forged_and_malformed_tokens_are_ignored(
    scale_cluster: LocalCluster,
    driver: str,
    tables: None,
    paused_replicas: LocalCluster,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With SECRET_KEY set tokens are signed: a forged or malformed header beside the real
    cookie still reads the write, alone it is as if absent; no error page, a log line each."""
    app, scale = make_app(scale_cluster, driver, SECRET_KEY="flask secret")
    try:
        client = app.test_client()
        first = client.post("/notes", data={"body": "signed"})
        assert "." in first.headers["X-Scale-Token"]
        note_url = first.headers["Location"]
        bad_values = ["FFFFFFFF/FFFFFFFF", "FFFFFFFF/FFFFFFFF.AAAAAAAAAAAAAAAAAAAAAA", "junk"]
        answers, alone = [], []
        with caplog.at_level(logging.WARNING, logger="sqlalchemy_scale.web"):
            for value in bad_values:
                answers.append(client.get(note_url, headers={"X-Scale-Token": value}))
                cookieless = app.test_client(use_cookies=False)
                alone.append(cookieless.get("/where", headers={"X-Scale-Token": value}))
    finally:
        scale.dispose(app)
    assert [a.status_code for a in answers + alone] == [200] * 6
    assert all(a.json["found"] for a in answers)
    assert all(a.json["replica"] for a in alone)  # the forged position was not honoured
    assert caplog.text.count("ignored the causal token in the header") == 6


def test_statements_land_where_the_method_says(app: Flask, scale_cluster: LocalCluster) -> None:
    """GET, HEAD and OPTIONS read from a replica; POST, PUT, PATCH and DELETE from the
    primary, unless the statement says use_replica=True."""
    client = app.test_client()
    answers = {
        method: client.open("/where", method=method).headers["X-Served-By"] for method in METHODS
    }
    opted_in = client.post("/where?use_replica=1").json
    for method in ("GET", "HEAD", "OPTIONS"):
        port, in_recovery = answers[method].split()
        assert int(port) in replica_ports(scale_cluster) and in_recovery == "True", method
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        assert answers[method] == f"{scale_cluster.primary.port} False", method
    assert opted_in["replica"] and opted_in["port"] in replica_ports(scale_cluster)


def test_bind_key_models_keep_their_engine(app: Flask, scale_cluster: LocalCluster) -> None:
    """A __bind_key__ model is written and read on its SQLALCHEMY_BINDS server, in a GET too."""
    client = app.test_client()
    note_id = client.post("/archive", data={"body": "old"}).json["id"]
    answer = client.get(f"/archive/{note_id}").json
    assert answer == {"found": True, "port": scale_cluster.shards[0].port}
    assert scale_cluster.shards[0].execute(
        "SELECT body FROM flask_archive WHERE id = %s", [note_id]
    ) == [("old",)]


def test_nothing_is_committed_or_left_open_by_the_extension(
    app: Flask, scale_cluster: LocalCluster
) -> None:
    """A view that flushes without committing leaves no row, no token and no open transaction."""
    body = f"uncommitted {next(_bodies)}"
    response = app.test_client().post("/uncommitted", data={"body": body})
    assert response.status_code == 200 and not response.json["replica"]
    assert "Set-Cookie" not in response.headers
    assert scale_cluster.primary.execute(
        "SELECT count(*) FROM flask_notes WHERE body = %s", [body]
    ) == [(0,)]
    assert scale_cluster.primary.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
        "AND state LIKE 'idle in transaction%%' AND pid <> pg_backend_pid()"
    ) == [(0,)]


@pytest.mark.parametrize("given", ["replica_set", "sessionmaker"])
def test_plain_flask_with_a_replica_set(
    replicas: ss.ReplicaSet, paused_replicas: LocalCluster, tables: None, given: str
) -> None:
    """Without Flask-SQLAlchemy, scale.session routes by method and a posted form is seen on
    the redirect; the session is closed when the request ends."""
    app = Flask(__name__)
    if given == "replica_set":
        scale = Scale(app, replica_set=replicas)
    else:
        scale = Scale(app, sessionmaker=ss.routing_sessionmaker(replicas, expire_on_commit=False))
    opened: list[ss.RoutingSession] = []

    @app.post("/notes")
    def create() -> Any:
        session = scale.session
        opened.append(session)
        note = FlaskNote(body=request.form["body"])
        session.add(note)
        session.commit()
        return redirect(f"/notes/{note.id}")

    @app.get("/notes/<int:note_id>")
    def show(note_id: int) -> dict[str, Any]:
        session = scale.session
        opened.append(session)
        found = session.get(FlaskNote, note_id) is not None
        return {
            "id": note_id,
            "found": found,
            "default": session.default_role,
            **where(session.execute(WHERE).one()),
        }

    client = app.test_client()
    answers = [
        client.post("/notes", data={"body": "plain"}, follow_redirects=True).json for _ in range(5)
    ]
    assert all(a["found"] and a["port"] == paused_replicas.primary.port for a in answers)
    assert {a["default"] for a in answers} == {"replica"}
    assert [s.default_role for s in opened[:2]] == ["primary", "replica"]
    assert all(not s.in_transaction() for s in opened)  # closed at the end of each request
    without = app.test_client().get(f"/notes/{answers[-1]['id']}").json  # no cookie
    assert without["port"] in replica_ports(paused_replicas) and not without["found"]


def test_misconfiguration_is_refused_at_init_app(scale_cluster: LocalCluster, driver: str) -> None:
    """No db or replica set, a db.session that does not route, replicas for a bind key that
    SQLALCHEMY_BINDS lacks, and a missing db.init_app each raise ConfigurationError saying
    what to change."""
    with pytest.raises(ss.ConfigurationError, match="needs db="):
        Scale(Flask(__name__))
    plain_db = SQLAlchemy()
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = scale_cluster.primary.url(driver)
    with pytest.raises(ss.ConfigurationError, match=r"db\.init_app"):
        Scale(app, db=plain_db)
    plain_db.init_app(app)
    with pytest.raises(ss.ConfigurationError, match="session_options"):
        Scale(app, db=plain_db)
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=scale_cluster.primary.url(driver),
        SQLALCHEMY_BINDS={"archive": scale_cluster.shards[0].url(driver)},
        SQLALCHEMY_SCALE_REPLICAS={"archives": [scale_cluster.replicas[0].url(driver)]},
    )
    db.init_app(app)
    with pytest.raises(ss.ConfigurationError, match=r"bind key\(s\) 'archives'"):
        Scale(app, db=db)
    with pytest.raises(ss.ConfigurationError, match="RoutingFlaskSession"):
        session_options(class_=ss.RoutingSession)
    assert session_options()["class_"] is RoutingFlaskSession


def test_a_session_shared_by_requests_follows_each_method(
    app: Flask, scale_cluster: LocalCluster
) -> None:
    """Requests made inside one app context share db.session; each request still gets its
    method's default role."""
    client = app.test_client()
    with app.app_context():
        served = [client.open("/where", method=m).json for m in ("GET", "POST", "GET")]
        assert db.session.registry.has()  # one session was shared by the three requests
    assert served[0]["port"] in replica_ports(scale_cluster)
    assert served[1] == {"port": scale_cluster.primary.port, "replica": False}
    assert served[2]["port"] in replica_ports(scale_cluster)
