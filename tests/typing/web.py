"""Type-checked (not run) use of the web integrations: ``nox -s typing`` runs mypy --strict."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, FastAPI
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import sessionmaker
from sqlmodel import select

import sqlalchemy_scale as ss
from sqlalchemy_scale import flask as ss_flask
from sqlalchemy_scale.fastapi import CausalTokenMiddleware, session_dependency
from sqlalchemy_scale.sqlmodel import AsyncRoutingSQLModelSession, RoutingSQLModelSession


def fastapi_app(replicas: ss.ReplicaSet) -> FastAPI:
    app = FastAPI()
    carrier = ss.TokenCarrier(cookie_name="tok", header_name="X-Tok", secret_key="k")
    app.add_middleware(CausalTokenMiddleware, carrier=carrier)
    Session = sessionmaker(class_=RoutingSQLModelSession, replica_set=replicas)
    Async = async_sessionmaker(class_=AsyncRoutingSQLModelSession, replica_set=replicas)
    Plain = async_sessionmaker(
        class_=AsyncSession, sync_session_class=ss.RoutingSession, replica_set=replicas
    )
    DbSession = Annotated[RoutingSQLModelSession, Depends(session_dependency(Session))]
    session_dependency(Async, resolver=ss.role_for_method)
    session_dependency(Plain, resolver=lambda method: "primary")

    @app.get("/")
    def index(session: DbSession) -> int:
        return session.exec(select(1)).one()

    return app


def flask_app(replicas: ss.ReplicaSet) -> Flask:
    db = SQLAlchemy(session_options=ss_flask.session_options(expire_on_commit=False))
    app = Flask(__name__)
    db.init_app(app)
    scale = ss_flask.Scale(db=db, cookie_name="tok")
    scale.init_app(app)
    plain = ss_flask.Scale(Flask("plain"), replica_set=replicas)
    session: ss.RoutingSession = plain.session
    assert session.default_role in ("primary", "replica")
    return app
