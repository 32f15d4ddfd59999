"""Flask integration: causal tokens across requests and per-method sessions, for
Flask-SQLAlchemy apps (``db.session`` keeps working) and for plain Flask.

With Flask-SQLAlchemy 3.1 the app changes the line that builds ``SQLAlchemy`` and adds
the extension; models, ``db.session`` and ``__bind_key__`` stay as they are::

    db = SQLAlchemy(model_class=Base, session_options=ss_flask.session_options())
    app.config["SQLALCHEMY_SCALE_REPLICAS"] = [REPLICA_URL_1, REPLICA_URL_2]
    db.init_app(app)
    Scale(app, db=db)

The primary is ``db.engine``; replicas come from ``SQLALCHEMY_SCALE_REPLICAS`` (a list of
URLs) and :class:`~sqlalchemy_scale.ReplicaSet` options from ``SQLALCHEMY_SCALE_OPTIONS``
(a dict: ``policy``, ``max_lag_seconds``, ``pool``, ...); ``SQLALCHEMY_SCALE_COOKIE_NAME``,
``SQLALCHEMY_SCALE_HEADER_NAME`` and ``SQLALCHEMY_SCALE_SECRET_KEY`` (else ``SECRET_KEY``)
configure the token's carriers. Models with a ``__bind_key__`` run on their
``SQLALCHEMY_BINDS`` engine, exactly as Flask-SQLAlchemy sends them.

Plain Flask: ``scale = Scale(app, replica_set=replicas)`` and ``scale.session`` is a
routing session for the current request, closed when the request ends.

The pieces are Rails' three: the request hooks registered by :meth:`Scale.init_app` are the
middleware (they read the token from the cookie or header, run the request inside
:func:`~sqlalchemy_scale.causal_context` and send the newest token back after a write);
:func:`~sqlalchemy_scale.web.role_for_method` is the resolver (GET, HEAD, OPTIONS read from
replicas; other methods from the primary); :class:`~sqlalchemy_scale.web.TokenCarrier`
is where the token lives. A user who posts a form then sees the result on the redirect.

When *not* to use it: replicas for a bind key other than the default are refused (the
token is one primary's WAL position; tokens per bind are not carried yet), and a streamed
response that commits after its headers went out cannot send that commit's token.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Final

import sqlalchemy as sa
from flask import Flask, Response, current_app, g, has_request_context, request
from flask_sqlalchemy import SQLAlchemy
from flask_sqlalchemy.session import Session as FlaskSQLAlchemySession
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import sessionmaker

from .consistency import CausalContext, causal_context
from .errors import ConfigurationError
from .routing import RoutingSession, routing_sessionmaker
from .topology import ReplicaSet, Role
from .web import RoleResolver, TokenCarrier, make_carrier, resolve_role, role_for_method

__all__ = ["RoutingFlaskSession", "Scale", "session_options"]

log = logging.getLogger("sqlalchemy_scale.web")

#: ``app.extensions`` key of the per-app state.
EXTENSION: Final = "sqlalchemy_scale"
REPLICAS_KEY: Final = "SQLALCHEMY_SCALE_REPLICAS"
OPTIONS_KEY: Final = "SQLALCHEMY_SCALE_OPTIONS"
SECRET_KEY: Final = "SQLALCHEMY_SCALE_SECRET_KEY"
COOKIE_NAME_KEY: Final = "SQLALCHEMY_SCALE_COOKIE_NAME"
HEADER_NAME_KEY: Final = "SQLALCHEMY_SCALE_HEADER_NAME"


@dataclass
class _AppState:
    """What :class:`Scale` keeps per application (``app.extensions["sqlalchemy_scale"]``)."""

    carrier: TokenCarrier
    resolver: RoleResolver
    replica_set: ReplicaSet
    owns_replica_set: bool
    sessionmaker: sessionmaker[Any] | None = None
    db: SQLAlchemy | None = None


@dataclass
class _RequestState:
    """The request's causal context and plain-Flask session (``g._sqlalchemy_scale``)."""

    token: str | None
    role: Role
    context: CausalContext
    stack: ExitStack
    session: RoutingSession | None = field(default=None)


def _state(app: Flask) -> _AppState:
    state = app.extensions.get(EXTENSION)
    if not isinstance(state, _AppState):
        raise ConfigurationError(
            f"Flask app {app.name!r} has no sqlalchemy-scale extension: call "
            "Scale(app, db=db) or Scale(...).init_app(app) first"
        )
    return state


class RoutingFlaskSession(FlaskSQLAlchemySession, RoutingSession):
    """Flask-SQLAlchemy's ``db.session`` class, routing the default bind over replicas.

    Statements on the default bind follow :meth:`RoutingSession.get_bind
    <sqlalchemy_scale.RoutingSession.get_bind>`'s rules over the app's
    :class:`~sqlalchemy_scale.ReplicaSet` (primary ``db.engine``); statements on a model or
    table with a ``__bind_key__`` go to that bind's engine, as Flask-SQLAlchemy sends them.
    Inside a request the default role follows the HTTP method. Pass it with
    :func:`session_options`.

    .. versionadded:: 0.2
    """

    def __init__(self, db: SQLAlchemy, **kwargs: Any) -> None:
        state = _state(current_app)
        if has_request_context():
            kwargs.setdefault("default_role", _request_role(state))
        kwargs.setdefault("replica_set", state.replica_set)
        super().__init__(db, **kwargs)

    def get_bind(
        self,
        mapper: Any = None,
        clause: Any = None,
        bind: Engine | Connection | None = None,
        **kw: Any,
    ) -> Engine | Connection:
        if bind is None and _bind_key(mapper, clause) is not None:
            # Another bind: its engine, chosen by Flask-SQLAlchemy's own rules.
            return FlaskSQLAlchemySession.get_bind(self, mapper, clause, bind, **kw)
        return RoutingSession.get_bind(self, mapper, clause=clause, bind=bind, **kw)


def session_options(**options: Any) -> dict[str, Any]:
    """``SQLAlchemy(session_options=...)`` that makes ``db.session`` a
    :class:`RoutingFlaskSession`; other keyword arguments are passed along.

    .. versionadded:: 0.2
    """
    if "class_" in options and not issubclass(options["class_"], RoutingFlaskSession):
        raise ConfigurationError(
            f"session_options(class_={options['class_'].__name__}): the class must be a "
            "subclass of sqlalchemy_scale.flask.RoutingFlaskSession"
        )
    return {"class_": RoutingFlaskSession, **options}


def _bind_key(mapper: Any, clause: Any) -> str | None:
    """The Flask-SQLAlchemy bind key a statement names, or None for the default bind: the
    mapper's table first, then a table or DML statement's table, as its Session.get_bind."""
    tables = []
    if mapper is not None:
        tables.append(getattr(sa.inspect(mapper), "local_table", None))
    if isinstance(clause, sa.Table):
        tables.append(clause)
    elif isinstance(clause, sa.UpdateBase):
        tables.append(clause.table)
    for table in tables:
        if isinstance(table, sa.Table) and "bind_key" in table.metadata.info:
            key = table.metadata.info["bind_key"]
            if key is not None:
                return str(key)
    return None


class Scale:
    """The Flask extension: causal tokens between requests and routing sessions per request.

    :param app: the Flask app, or None to call :meth:`init_app` later (app factories).
    :param db: a Flask-SQLAlchemy ``SQLAlchemy`` built with :func:`session_options`; its
        ``db.engine`` is the primary and ``SQLALCHEMY_SCALE_REPLICAS`` lists the replicas.
    :param replica_set: for plain Flask (no ``db``): the
        :class:`~sqlalchemy_scale.ReplicaSet` behind :attr:`session`.
    :param sessionmaker: for plain Flask: the sessionmaker of routing sessions behind
        :attr:`session` (default ``ss.routing_sessionmaker(replica_set)``).
    :param resolver: a request's default role from its method
        (:func:`~sqlalchemy_scale.web.role_for_method`).
    :param cookie_name: the token cookie's name; by default ``SQLALCHEMY_SCALE_COOKIE_NAME``
        or ``scale_token``.
    :param header_name: the token header's name; by default ``SQLALCHEMY_SCALE_HEADER_NAME``
        or ``X-Scale-Token``.
    :param secret_key: signs tokens so that forged ones are ignored; by default
        ``SQLALCHEMY_SCALE_SECRET_KEY`` or else the app's ``SECRET_KEY`` when set.
    :param carrier: a ready :class:`~sqlalchemy_scale.web.TokenCarrier` instead of the
        three keywords above.

    Misconfiguration (no ``db`` and no ``replica_set``, a ``db`` whose session class does not
    route, replicas configured for a bind key) raises
    :class:`~sqlalchemy_scale.ConfigurationError` in :meth:`init_app`.

    .. versionadded:: 0.2
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        db: SQLAlchemy | None = None,
        replica_set: ReplicaSet | None = None,
        sessionmaker: sessionmaker[Any] | None = None,
        resolver: RoleResolver = role_for_method,
        cookie_name: str | None = None,
        header_name: str | None = None,
        secret_key: str | bytes | None = None,
        carrier: TokenCarrier | None = None,
    ) -> None:
        if db is not None and (replica_set is not None or sessionmaker is not None):
            raise ConfigurationError(
                "Scale: give db= (replicas from SQLALCHEMY_SCALE_REPLICAS) or "
                "replica_set=/sessionmaker= (plain Flask), not both"
            )
        if db is None and replica_set is None and sessionmaker is None:
            raise ConfigurationError(
                "Scale needs db=SQLAlchemy(...) or replica_set=ReplicaSet(...)"
            )
        if sessionmaker is not None and not issubclass(sessionmaker.class_, RoutingSession):
            raise ConfigurationError(
                f"Scale: the sessionmaker makes {sessionmaker.class_.__name__}, not a "
                "RoutingSession; use ss.routing_sessionmaker(replica_set)"
            )
        self.db = db
        self.replica_set = replica_set
        self.sessionmaker = sessionmaker
        self.resolver = resolver
        self._carrier_options: dict[str, Any] = {
            "carrier": carrier,
            "cookie_name": cookie_name,
            "header_name": header_name,
            "secret_key": secret_key,
        }
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Register the request hooks and build the app's replica set (Flask-SQLAlchemy:
        call ``db.init_app(app)`` first)."""
        if EXTENSION in app.extensions:
            raise ConfigurationError(
                f"Flask app {app.name!r} already has a sqlalchemy-scale extension"
            )
        options = dict(self._carrier_options)
        if options["carrier"] is None:
            # Keywords win over app config, as for Flask-SQLAlchemy's own settings.
            if options["secret_key"] is None:
                options["secret_key"] = app.config.get(SECRET_KEY) or app.config.get("SECRET_KEY")
            options["cookie_name"] = options["cookie_name"] or app.config.get(COOKIE_NAME_KEY)
            options["header_name"] = options["header_name"] or app.config.get(HEADER_NAME_KEY)
        carrier = make_carrier(where="Scale", **options)
        if self.db is not None:
            built = self._replica_set_for(app, self.db)
            state = _AppState(carrier, self.resolver, built, True, db=self.db)
        else:
            maker = self.sessionmaker
            replica_set = self.replica_set
            if replica_set is None:
                assert maker is not None
                given = maker.kw.get("replica_set")
                if not isinstance(given, ReplicaSet):
                    raise ConfigurationError(
                        "Scale: the sessionmaker has no replica_set=ReplicaSet(...)"
                    )
                replica_set = given
            if maker is None:
                maker = routing_sessionmaker(replica_set)
            state = _AppState(carrier, self.resolver, replica_set, False, sessionmaker=maker)
        app.extensions[EXTENSION] = state
        app.before_request(_before_request)
        app.after_request(_after_request)
        app.teardown_request(_teardown_request)

    @staticmethod
    def _replica_set_for(app: Flask, db: SQLAlchemy) -> ReplicaSet:
        with app.app_context():
            try:
                engines = db.engines
            except RuntimeError as exc:
                raise ConfigurationError(
                    f"Scale: call db.init_app(app) before Scale(app, db=db) ({exc})"
                ) from None
            session_class = db.session.session_factory.class_
            if not issubclass(session_class, RoutingFlaskSession):
                raise ConfigurationError(
                    f"Scale: db.session makes {session_class.__name__}, which does not route; "
                    "build the extension with SQLAlchemy(session_options="
                    "sqlalchemy_scale.flask.session_options())"
                )
            replicas = app.config.get(REPLICAS_KEY, ())
            if isinstance(replicas, Mapping):
                extra = sorted(str(k) for k, urls in replicas.items() if k is not None and urls)
                if extra:
                    raise ConfigurationError(
                        f"Scale: {REPLICAS_KEY} names bind keys {extra}; only the default "
                        "bind is routed over replicas in this version (a causal token is "
                        "one primary's WAL position). Those binds keep running on their "
                        "SQLALCHEMY_BINDS engine; list the default bind's replicas as a list"
                    )
                replicas = replicas.get(None, ())
            if isinstance(replicas, str) or not isinstance(replicas, Sequence):
                raise ConfigurationError(
                    f"Scale: {REPLICAS_KEY} must be a list of replica URLs, got "
                    f"{type(replicas).__name__}"
                )
            set_options = dict(app.config.get(OPTIONS_KEY, {}))
            set_options.setdefault("name", app.name)
            return ReplicaSet(primary=engines[None], replicas=list(replicas), **set_options)

    @property
    def session(self) -> RoutingSession:
        """Plain Flask: the current request's routing session (closed when the request
        ends); its default role follows the HTTP method."""
        state = _state(current_app)
        if state.sessionmaker is None:
            raise ConfigurationError(
                "Scale.session is for plain Flask; with Flask-SQLAlchemy use db.session"
            )
        request_state = _request_state()
        if request_state.session is None:
            request_state.session = state.sessionmaker(default_role=request_state.role)
        return request_state.session

    def dispose(self, app: Flask) -> None:
        """Dispose of the replica engines the extension built for ``app`` (Flask-SQLAlchemy
        mode; ``db.engine`` stays Flask-SQLAlchemy's)."""
        state = _state(app)
        if state.owns_replica_set:
            state.replica_set.dispose()


# -- request hooks: HTTP plumbing only --------------------------------------------------------

_G_KEY: Final = "_sqlalchemy_scale"


def _request_state() -> _RequestState:
    state = g.get(_G_KEY)
    if not isinstance(state, _RequestState):
        raise ConfigurationError(
            "no sqlalchemy-scale request state: Scale.session is only available inside a "
            "request of an app set up with Scale"
        )
    return state


def _request_role(state: _AppState) -> Role:
    request_state = g.get(_G_KEY)
    if isinstance(request_state, _RequestState):
        return request_state.role
    return resolve_role(state.resolver, request.method)


def _before_request() -> None:
    state = _state(current_app)
    carrier = state.carrier
    token = carrier.read(
        cookies=carrier.read_cookie_header(request.headers.get("Cookie")),
        headers=request.headers.getlist(carrier.header_name),
    )
    role = resolve_role(state.resolver, request.method)
    stack = ExitStack()
    context = stack.enter_context(causal_context(token))
    setattr(g, _G_KEY, _RequestState(token, role, context, stack))
    if state.db is not None and state.db.session.registry.has():
        # A session already open in this app context (one shared by several requests,
        # as in a test holding app_context()): it follows this request's method.
        session = state.db.session()
        if isinstance(session, RoutingSession):
            session.default_role = role


def _after_request(response: Response) -> Response:
    request_state = g.get(_G_KEY)
    if isinstance(request_state, _RequestState):
        token = request_state.context.token
        if token is not None and token != request_state.token:
            for name, value in _state(current_app).carrier.response_headers(
                token, secure=request.is_secure
            ):
                response.headers.add(name, value)
    return response


def _teardown_request(exc: BaseException | None) -> None:
    request_state = g.pop(_G_KEY, None)
    if isinstance(request_state, _RequestState):
        try:
            if request_state.session is not None:
                request_state.session.close()
        finally:
            request_state.stack.close()
