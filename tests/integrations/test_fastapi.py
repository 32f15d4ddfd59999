"""A real FastAPI + SQLModel app on the real topology: tokens across requests, roles by method.

Each route answers with ``inet_server_port()`` and ``pg_is_in_recovery()`` asked through
its own session, so where a request's statements ran is the server's word. Every route
exists twice, sync (``/sync/...``, FastAPI's thread pool) and async (``/async/...``, an
``AsyncSession`` over asyncpg or psycopg 3 async).

Routes are declared inside ``make_app`` with ``Annotated`` aliases local to it, which
FastAPI resolves only from evaluated annotations: no ``from __future__ import annotations``.
"""

import itertools
import logging
from collections.abc import Iterator
from typing import Annotated, Any

import pytest
from fastapi import Depends, FastAPI, HTTPException, Response
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import sessionmaker
from sqlmodel import Field, SQLModel

import sqlalchemy_scale as ss
from sqlalchemy_scale.fastapi import CausalTokenMiddleware, session_dependency
from sqlalchemy_scale.local import LocalCluster
from sqlalchemy_scale.sqlmodel import AsyncRoutingSQLModelSession, RoutingSQLModelSession

WHERE = select(func.inet_server_port(), func.pg_is_in_recovery())
MODES = ("sync", "async")
METHODS = ["GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE"]
_bodies = itertools.count(1)


class WebNote(SQLModel, table=True):
    __tablename__ = "web_notes"

    id: int | None = Field(default=None, primary_key=True)
    body: str


@pytest.fixture(scope="module")
def notes_table(scale_cluster: LocalCluster) -> Iterator[None]:
    """The web_notes table on the primary, replicated to every replica."""
    scale_cluster.primary.execute(
        "DROP TABLE IF EXISTS web_notes; "
        "CREATE TABLE web_notes (id serial PRIMARY KEY, body text NOT NULL)"
    )
    for replica in scale_cluster.replicas:
        replica.wait_for_replay()
    yield
    scale_cluster.primary.execute("DROP TABLE IF EXISTS web_notes")


def make_app(replicas: ss.ReplicaSet, async_replicas: ss.ReplicaSet, **middleware: Any) -> FastAPI:
    """The app under test: the same routes over a sync and an async routing SQLModel session."""
    app = FastAPI()
    app.add_middleware(CausalTokenMiddleware, **middleware)
    Session = sessionmaker(class_=RoutingSQLModelSession, replica_set=replicas)
    AsyncSession = async_sessionmaker(
        class_=AsyncRoutingSQLModelSession, replica_set=async_replicas, expire_on_commit=False
    )
    SyncDep = Annotated[RoutingSQLModelSession, Depends(session_dependency(Session))]
    AsyncDep = Annotated[AsyncRoutingSQLModelSession, Depends(session_dependency(AsyncSession))]

    def where(row: Any) -> dict[str, Any]:
        return {"port": row[0], "replica": row[1]}

    def served_by(response: Response, row: Any) -> dict[str, Any]:
        # In a header too, so that HEAD (which has no body) tells where it ran.
        response.headers["X-Served-By"] = f"{row[0]} {row[1]}"
        return where(row)

    @app.post("/sync/notes")
    def sync_create(body: str, session: SyncDep) -> dict[str, Any]:
        note = WebNote(body=body)
        session.add(note)
        session.commit()
        return {"id": note.id}

    @app.get("/sync/notes/{note_id}")
    def sync_read(note_id: int, session: SyncDep) -> dict[str, Any]:
        note = session.get(WebNote, note_id)
        return {"found": note is not None, **where(session.exec(WHERE).one())}

    @app.api_route("/sync/where", methods=METHODS)
    def sync_where(response: Response, session: SyncDep, use_replica: bool = False) -> Any:
        stmt = WHERE.execution_options(use_replica=True) if use_replica else WHERE
        return served_by(response, session.exec(stmt).one())

    @app.post("/sync/uncommitted")
    def sync_uncommitted(body: str, session: SyncDep) -> dict[str, Any]:
        session.add(WebNote(body=body))
        session.flush()
        return where(session.exec(WHERE).one())

    @app.post("/sync/conflict")
    def sync_conflict(body: str, session: SyncDep) -> None:
        session.add(WebNote(body=body))
        session.commit()
        raise HTTPException(409, "committed, then refused")

    @app.post("/async/notes")
    async def async_create(body: str, session: AsyncDep) -> dict[str, Any]:
        note = WebNote(body=body)
        session.add(note)
        await session.commit()
        return {"id": note.id}

    @app.get("/async/notes/{note_id}")
    async def async_read(note_id: int, session: AsyncDep) -> dict[str, Any]:
        note = await session.get(WebNote, note_id)
        return {"found": note is not None, **where((await session.exec(WHERE)).one())}

    @app.api_route("/async/where", methods=METHODS)
    async def async_where(response: Response, session: AsyncDep, use_replica: bool = False) -> Any:
        stmt = WHERE.execution_options(use_replica=True) if use_replica else WHERE
        return served_by(response, (await session.exec(stmt)).one())

    @app.post("/async/uncommitted")
    async def async_uncommitted(body: str, session: AsyncDep) -> dict[str, Any]:
        session.add(WebNote(body=body))
        await session.flush()
        return where((await session.exec(WHERE)).one())

    @app.post("/async/conflict")
    async def async_conflict(body: str, session: AsyncDep) -> None:
        session.add(WebNote(body=body))
        await session.commit()
        raise HTTPException(409, "committed, then refused")

    return app


@pytest.fixture
def app(replicas: ss.ReplicaSet, async_replicas: ss.ReplicaSet, notes_table: None) -> FastAPI:
    """The app with the default token carrier (cookie ``scale_token``, header ``X-Scale-Token``)."""
    return make_app(replicas, async_replicas)


def create_note(client: TestClient, mode: str, **kw: Any) -> tuple[int, Any]:
    """POST a note; return its id and the response."""
    response = client.post(f"/{mode}/notes", params={"body": f"note {next(_bodies)}"}, **kw)
    assert response.status_code == 200, response.text
    return response.json()["id"], response


def replica_ports(cluster: LocalCluster) -> set[int]:
    return {r.port for r in cluster.replicas}


@pytest.mark.parametrize("mode", MODES)
def test_a_client_reads_its_write_in_the_next_request(
    app: FastAPI, paused_replicas: LocalCluster, mode: str
) -> None:
    """With replay paused on every replica, each note posted is found by the client's next GET."""
    stale = 0
    with TestClient(app) as client:
        for _ in range(10):
            note_id, _response = create_note(client, mode)
            answer = client.get(f"/{mode}/notes/{note_id}").json()
            stale += not answer["found"]
            assert answer["port"] == paused_replicas.primary.port
        with TestClient(app) as stranger:  # no token: a paused replica answers, without it
            answer = stranger.get(f"/{mode}/notes/{note_id}").json()
    print(f"\n{mode}: 10 writes read back in the next request, stale: {stale}")
    assert stale == 0
    assert answer["port"] in replica_ports(paused_replicas) and not answer["found"]


@pytest.mark.parametrize("mode", MODES)
def test_the_token_comes_back_in_a_cookie_and_a_header_only_after_a_write(
    app: FastAPI, scale_cluster: LocalCluster, mode: str
) -> None:
    """A write answers with Set-Cookie (HttpOnly, SameSite=Lax, no Secure over http) and the
    header holding the same token; a read answers with neither."""
    with TestClient(app) as client:
        _note_id, response = create_note(client, mode)
        read = client.get(f"/{mode}/where")
    cookie = response.headers["set-cookie"]
    token = response.headers["x-scale-token"]
    assert cookie.startswith(f"scale_token={token};")
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" not in cookie
    assert ss.newer_token(token, "0/0") == token  # a real WAL position
    assert "set-cookie" not in read.headers and "x-scale-token" not in read.headers


@pytest.mark.parametrize("mode", MODES)
def test_an_error_response_after_a_commit_still_carries_the_token(
    app: FastAPI, paused_replicas: LocalCluster, mode: str
) -> None:
    """A route that commits and then raises HTTPException answers with the new token, so the
    client's next read sees what was committed."""
    body = f"conflict {next(_bodies)}"
    with TestClient(app) as client:
        refused = client.post(f"/{mode}/conflict", params={"body": body})
        assert refused.status_code == 409
        ((note_id,),) = paused_replicas.primary.execute(
            "SELECT id FROM web_notes WHERE body = %s", [body]
        )
        answer = client.get(f"/{mode}/notes/{note_id}").json()
    assert refused.headers["x-scale-token"] and "scale_token=" in refused.headers["set-cookie"]
    assert answer["found"] and answer["port"] == paused_replicas.primary.port


def test_the_cookie_is_secure_over_https(app: FastAPI, scale_cluster: LocalCluster) -> None:
    """Over https the token cookie is also Secure."""
    with TestClient(app, base_url="https://testserver") as client:
        _note_id, response = create_note(client, "sync")
    assert "; Secure" in response.headers["set-cookie"]


@pytest.mark.parametrize("mode", MODES)
def test_an_api_client_without_cookies_reads_its_writes_through_the_header(
    app: FastAPI, paused_replicas: LocalCluster, mode: str
) -> None:
    """A client that keeps no cookies but returns the X-Scale-Token header never reads stale."""
    stale = 0
    with TestClient(app) as client:
        for _ in range(5):
            client.cookies.clear()
            note_id, response = create_note(client, mode)
            client.cookies.clear()
            token = response.headers["x-scale-token"]
            answer = client.get(f"/{mode}/notes/{note_id}", headers={"X-Scale-Token": token}).json()
            stale += not answer["found"]
        client.cookies.clear()
        without = client.get(f"/{mode}/notes/{note_id}").json()
    assert stale == 0
    assert without["port"] in replica_ports(paused_replicas) and not without["found"]


BAD_VALUES = (
    "garbage",
    "0/1; Path=/admin",
    "G/0",
    "1/2/3",
    "0/" + "F" * 500,
    "0/16B3748.c2lnbmF0dXJl",  # signed-looking while the app signs nothing
    "\u00e9/1",
)


@pytest.mark.parametrize("mode", MODES)
def test_malformed_tokens_are_ignored_without_an_error_or_a_stale_read(
    app: FastAPI, paused_replicas: LocalCluster, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A malformed header beside a valid cookie (and the reverse) still reads the write;
    alone, it is as if absent; never an error page, always a log line."""
    stale = errors = 0
    with TestClient(app) as client:
        note_id, response = create_note(client, mode)
        token = response.headers["x-scale-token"]
        for bad in BAD_VALUES:
            value = bad.encode()  # raw bytes, as a client may send them
            with caplog.at_level(logging.WARNING, logger="sqlalchemy_scale.web"):
                caplog.clear()
                beside_cookie = client.get(
                    f"/{mode}/notes/{note_id}", headers={"X-Scale-Token": value}
                )
                assert "ignored the causal token in the header" in caplog.text
            client.cookies.clear()
            beside_header = client.get(
                f"/{mode}/notes/{note_id}",
                headers={"X-Scale-Token": token, "Cookie": b"scale_token=" + value},
            )
            alone = client.get(f"/{mode}/notes/{note_id}", headers={"X-Scale-Token": value})
            client.cookies.set("scale_token", token)
            for answer in (beside_cookie, beside_header, alone):
                errors += answer.status_code != 200
            stale += (not beside_cookie.json()["found"]) + (not beside_header.json()["found"])
    assert (errors, stale) == (0, 0)
    assert alone.json()["port"] in replica_ports(paused_replicas)  # as if there were no token


@pytest.mark.parametrize("mode", MODES)
def test_forged_tokens_are_ignored_when_tokens_are_signed(
    replicas: ss.ReplicaSet,
    async_replicas: ss.ReplicaSet,
    notes_table: None,
    paused_replicas: LocalCluster,
    mode: str,
) -> None:
    """With a secret_key, a forged far-future token is ignored (a replica answers, no error)
    and a forged header beside the real cookie does not hide the real token."""
    app = make_app(replicas, async_replicas, secret_key="test secret")
    forged = ("FFFFFFFF/FFFFFFFF", "FFFFFFFF/FFFFFFFF.AAAAAAAAAAAAAAAAAAAAAA", "0/1.\u00e9")
    with TestClient(app) as client:
        note_id, response = create_note(client, mode)
        token = response.headers["x-scale-token"]
        assert "." in token  # signed
        answers = [
            client.get(f"/{mode}/notes/{note_id}", headers={"X-Scale-Token": value.encode()})
            for value in forged
        ]
        client.cookies.clear()
        alone = [
            client.get(f"/{mode}/where", headers={"X-Scale-Token": value.encode()})
            for value in forged
        ]
    assert [a.status_code for a in answers + alone] == [200] * 6
    assert all(a.json()["found"] for a in answers)
    assert all(a.json()["replica"] for a in alone)  # the forged position was not honoured


@pytest.mark.parametrize("mode", MODES)
def test_statements_land_where_the_method_says(
    app: FastAPI, scale_cluster: LocalCluster, mode: str
) -> None:
    """GET, HEAD and OPTIONS read from a replica; POST, PUT, PATCH and DELETE from the
    primary, unless the statement says use_replica=True."""
    with TestClient(app) as client:
        answers = {
            method: client.request(method, f"/{mode}/where").headers["X-Served-By"]
            for method in METHODS
        }
        opted_in = client.post(f"/{mode}/where", params={"use_replica": True}).json()
    for method in ("GET", "HEAD", "OPTIONS"):
        port, in_recovery = answers[method].split()
        assert int(port) in replica_ports(scale_cluster) and in_recovery == "True", method
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        assert answers[method] == f"{scale_cluster.primary.port} False", method
    assert opted_in["replica"] and opted_in["port"] in replica_ports(scale_cluster)


@pytest.mark.parametrize("mode", MODES)
def test_the_dependency_commits_nothing_and_closes_the_session(
    app: FastAPI, replicas: ss.ReplicaSet, scale_cluster: LocalCluster, mode: str
) -> None:
    """A route that flushes without committing leaves no row, no token and no connection
    checked out."""
    body = f"uncommitted {next(_bodies)}"
    with TestClient(app) as client:
        response = client.post(f"/{mode}/uncommitted", params={"body": body})
    assert response.status_code == 200 and not response.json()["replica"]
    assert "set-cookie" not in response.headers
    open_transactions = (
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
        "AND state LIKE 'idle in transaction%%' AND pid <> pg_backend_pid()"
    )
    assert scale_cluster.primary.execute(open_transactions) == [(0,)]
    rows = scale_cluster.primary.execute("SELECT count(*) FROM web_notes WHERE body = %s", [body])
    assert rows == [(0,)]
    if mode == "sync":
        assert [node.checked_out() for node in replicas] == [0] * len(replicas.nodes)


def test_session_dependency_refuses_a_non_routing_sessionmaker(
    replicas: ss.ReplicaSet,
) -> None:
    """A plain sessionmaker (or async_sessionmaker over a plain Session) is refused at once."""
    with pytest.raises(ss.ConfigurationError, match="not a RoutingSession"):
        session_dependency(sessionmaker(replicas.primary.engine))
    with pytest.raises(ss.ConfigurationError, match="sync_session_class is Session"):
        session_dependency(async_sessionmaker())
    with pytest.raises(ss.ConfigurationError, match="got str"):
        session_dependency("Session")  # type: ignore[arg-type]


def test_the_middleware_works_in_a_plain_starlette_app(
    replicas: ss.ReplicaSet, notes_table: None, paused_replicas: LocalCluster
) -> None:
    """In a Starlette app (no FastAPI), a note written in one request is read in the next."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    Session = ss.routing_sessionmaker(replicas, expire_on_commit=False)

    def create(request: Request) -> JSONResponse:
        with Session() as session:
            note = WebNote(body="starlette")
            session.add(note)
            session.commit()
            return JSONResponse({"id": note.id})

    def read(request: Request) -> JSONResponse:
        with Session() as session:
            found = session.get(WebNote, int(request.path_params["id"])) is not None
            return JSONResponse({"found": found, **where_row(session.execute(WHERE).one())})

    app = Starlette(
        routes=[Route("/notes", create, methods=["POST"]), Route("/notes/{id}", read)],
        middleware=[Middleware(CausalTokenMiddleware, cookie_name="tok", header_name="X-Tok")],
    )
    with TestClient(app) as client:
        created = client.post("/notes")
        answer = client.get(f"/notes/{created.json()['id']}").json()
    assert created.headers["x-tok"] and created.headers["set-cookie"].startswith("tok=")
    assert answer == {"found": True, "port": paused_replicas.primary.port, "replica": False}


def where_row(row: Any) -> dict[str, Any]:
    return {"port": row[0], "replica": row[1]}
