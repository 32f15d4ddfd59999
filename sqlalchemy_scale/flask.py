"""Flask integration: causal tokens across requests and per-method sessions, for
Flask-SQLAlchemy apps (``db.session`` keeps working) and for plain Flask.

With Flask-SQLAlchemy 3.1 the app changes the line that builds ``SQLAlchemy`` and adds
the extension; models, ``db.session`` and ``__bind_key__`` stay as they are::

    db = SQLAlchemy(model_class=Base, session_options=ss_flask.session_options())
    app.config["SQLALCHEMY_SCALE_REPLICAS"] = [REPLICA_URL_1, REPLICA_URL_2]
    db.init_app(app)
    Scale(app, db=db)

The primary is ``db.engine``; replicas come from ``SQLALCHEMY_SCALE_REPLICAS`` and
:class:`~sqlalchemy_scale.ReplicaSet` options from ``SQLALCHEMY_SCALE_OPTIONS`` (a dict:
``policy``, ``max_lag_seconds``, ``pool``, ...; for every bind's set);
``SQLALCHEMY_SCALE_COOKIE_NAME``, ``SQLALCHEMY_SCALE_HEADER_NAME`` and
``SQLALCHEMY_SCALE_SECRET_KEY`` (else ``SECRET_KEY``) configure the token's carriers.

``SQLALCHEMY_SCALE_REPLICAS`` is a list of URLs (the default bind's replicas) or a mapping
by bind key, ``{None: [...], "users": [...]}``, for apps with ``SQLALCHEMY_BINDS``: each
bind with replicas gets a :class:`~sqlalchemy_scale.ReplicaSet` of its own (primary:
Flask-SQLAlchemy's engine for the bind, ``causal_scope``: the bind key) and a
:class:`~sqlalchemy_scale.Router` of its own in ``db.session``. The session picks a
statement's bind as Flask-SQLAlchemy does (``__bind_key__``, table metadata), then routes it
inside that bind: "the transaction has written" and the transaction's replica are per bind,
and a commit that wrote to two binds records both primaries' positions in the one token.
Binds without replicas run on their ``SQLALCHEMY_BINDS`` engine, exactly as
Flask-SQLAlchemy sends them.

Plain Flask: ``scale = Scale(app, replica_set=replicas)`` and ``scale.session`` is a
routing session for the current request, closed when the request ends.

The pieces are Rails' three: the request hooks registered by :meth:`Scale.init_app` are the
middleware (they read the token from the cookie or header, run the request inside
:func:`~sqlalchemy_scale.causal_context` and send the newest token back after a write);
:func:`~sqlalchemy_scale.web.role_for_method` is the resolver (GET, HEAD, OPTIONS read from
replicas; other methods from the primary); :class:`~sqlalchemy_scale.web.TokenCarrier`
is where the token lives. A user who posts a form then sees the result on the redirect.

When *not* to use it: a streamed response that commits after its headers went out cannot
send that commit's token. A transaction that writes to two binds commits them one after
the other, as Flask-SQLAlchemy always has (no two-phase commit): the second may fail after
the first committed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

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

if TYPE_CHECKING:
    from .routing import _SessionRouter

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
    #: Flask-SQLAlchemy: the replica sets of binds other than the default, by bind key.
    bind_replica_sets: dict[str, ReplicaSet] = field(default_factory=dict)


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
    """Flask-SQLAlchemy's ``db.session`` class, routing each bind over its replicas.

    A statement's bind is chosen by Flask-SQLAlchemy's own rules (the model's
    ``__bind_key__``, the table's metadata); inside a bind with replicas it follows
    :meth:`RoutingSession.get_bind <sqlalchemy_scale.RoutingSession.get_bind>`'s rules over
    that bind's :class:`~sqlalchemy_scale.ReplicaSet`, with a
    :class:`~sqlalchemy_scale.Router` per bind (so "the transaction has written" holds per
    bind). A bind without replicas gets its ``SQLALCHEMY_BINDS`` engine, as
    Flask-SQLAlchemy sends it. Inside a request the default role follows the HTTP method.
    Pass it with :func:`session_options`.

    .. versionadded:: 0.2
    .. versionchanged:: 0.4
        Binds other than the default are routed over their replicas too.
    """

    _picks_binds = True

    def __init__(self, db: SQLAlchemy, **kwargs: Any) -> None:
        state = _state(current_app)
        if has_request_context():
            kwargs.setdefault("default_role", _request_role(state))
        kwargs.setdefault("replica_set", state.replica_set)
        super().__init__(db, **kwargs)
        for replica_set in state.bind_replica_sets.values():
            self._add_replica_set(replica_set)

    def get_bind(
        self,
        mapper: Any = None,
        clause: Any = None,
        bind: Engine | Connection | None = None,
        **kw: Any,
    ) -> Engine | Connection:
        return RoutingSession.get_bind(self, mapper, clause=clause, bind=bind, **kw)

    def _route_for(self, mapper: Any, clause: Any) -> _SessionRouter | Engine | Connection:
        # The bind by Flask-SQLAlchemy's own rules (its engine; a bind key missing from
        # SQLALCHEMY_BINDS raises there), then that bind's route if it has replicas.
        engine = FlaskSQLAlchemySession.get_bind(self, mapper, clause)
        router = self._router_for(engine) if isinstance(engine, Engine) else None
        return engine if router is None else router


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


class Scale:
    """The Flask extension: causal tokens between requests and routing sessions per request.

    :param app: the Flask app, or None to call :meth:`init_app` later (app factories).
    :param db: a Flask-SQLAlchemy ``SQLAlchemy`` built with :func:`session_options`; its
        ``db.engine`` is the primary and ``SQLALCHEMY_SCALE_REPLICAS`` lists the replicas
        (or maps bind keys of ``SQLALCHEMY_BINDS`` to theirs).
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
    route, replicas configured for a bind key that is not in ``SQLALCHEMY_BINDS``) raises
    :class:`~sqlalchemy_scale.ConfigurationError` in :meth:`init_app`, before any engine
    connects.

    .. versionadded:: 0.2
    .. versionchanged:: 0.4
        ``SQLALCHEMY_SCALE_REPLICAS`` may map bind keys to their replicas.
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
            built = self._replica_sets_for(app, self.db)
            default = built.pop(None)
            state = _AppState(
                carrier,
                self.resolver,
                default,
                True,
                db=self.db,
                bind_replica_sets={str(key): rs for key, rs in built.items()},
            )
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
    def _replica_sets_for(app: Flask, db: SQLAlchemy) -> dict[str | None, ReplicaSet]:
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
            by_bind = _replicas_by_bind(app.config.get(REPLICAS_KEY, ()), engines)
            set_options = dict(app.config.get(OPTIONS_KEY, {}))
            if "causal_scope" in set_options:
                raise ConfigurationError(
                    f"Scale: {OPTIONS_KEY} sets causal_scope; each bind's ReplicaSet takes its "
                    "bind key as its causal scope (None for the default bind)"
                )
            name = str(set_options.pop("name", app.name))
            built: dict[str | None, ReplicaSet] = {}
            try:
                for key, urls in by_bind.items():
                    replica_set = ReplicaSet(
                        primary=engines[key],
                        replicas=urls,
                        name=name if key is None else f"{name}[{key}]",
                        causal_scope=key,
                        **set_options,
                    )
                    built[key] = replica_set
                    if not urls:  # no replicas for the default bind, by configuration
                        replica_set.quiet_fallback()
            except BaseException:
                for replica_set in built.values():
                    replica_set.dispose()
                raise
            return built

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
        mode, every bind's; ``db.engines`` stay Flask-SQLAlchemy's)."""
        state = _state(app)
        if state.owns_replica_set:
            state.replica_set.dispose()
            for replica_set in state.bind_replica_sets.values():
                replica_set.dispose()


def _replicas_by_bind(
    config: Any, engines: Mapping[str | None, Engine]
) -> dict[str | None, list[Any]]:
    """``SQLALCHEMY_SCALE_REPLICAS`` read against Flask-SQLAlchemy's engines: the replica
    URLs of each bind that has some, the default bind (None) always (maybe none).

    A list is the default bind's replicas; a mapping is keyed by bind key (None for the
    default bind). Raises :class:`~sqlalchemy_scale.ConfigurationError` naming a bind key
    that is not in ``SQLALCHEMY_BINDS``, a value that is not a list of URLs, and an app
    without a default bind; nothing connects.
    """
    if None not in engines:
        raise ConfigurationError(
            "Scale: the app has no default bind; set SQLALCHEMY_DATABASE_URI (its engine is "
            "the primary that db.session routes over)"
        )
    given = dict(config) if isinstance(config, Mapping) else {None: config}
    unknown = sorted(repr(key) for key in given if key not in engines)
    if unknown:
        binds = sorted(str(key) for key in engines if key is not None)
        raise ConfigurationError(
            f"Scale: {REPLICAS_KEY} names bind key(s) {', '.join(unknown)}, which "
            f"SQLALCHEMY_BINDS does not have (its bind keys: {binds}); replicas belong to a "
            "bind that Flask-SQLAlchemy knows"
        )
    by_bind: dict[str | None, list[Any]] = {None: []}
    for key, urls in given.items():
        where = "" if not isinstance(config, Mapping) else f"[{key!r}]"
        if isinstance(urls, str | bytes) or not isinstance(urls, Sequence):
            raise ConfigurationError(
                f"Scale: {REPLICAS_KEY}{where} must be a list of replica URLs, got "
                f"{type(urls).__name__}"
            )
        if urls or key is None:
            by_bind[key] = list(urls)
    return by_bind


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
