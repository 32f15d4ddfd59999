"""FastAPI (and Starlette) integration: causal tokens across requests and per-method sessions.

Two pieces, used together::

    app.add_middleware(CausalTokenMiddleware)            # HTTP plumbing: the token
    get_session = session_dependency(Session)            # sessions: role by HTTP method

    @app.post("/notes")
    def create(note: Note, session: Annotated[Session, Depends(get_session)]) -> Note: ...

:class:`CausalTokenMiddleware` is a pure ASGI middleware (no ``BaseHTTPMiddleware``, so
streaming and background tasks are untouched): it reads the token from the cookie or the
header (:class:`~sqlalchemy_scale.web.TokenCarrier`), runs the request inside
:func:`~sqlalchemy_scale.causal_context`, and when the request committed a write through a
routing session it sends the newest token back in both carriers. Sync routes and
dependencies run in FastAPI's thread pool with a copy of the request's context, so they
share the request's :class:`~sqlalchemy_scale.CausalContext`.

:func:`session_dependency` yields one routing session per request whose default role
follows the HTTP method (:func:`~sqlalchemy_scale.web.role_for_method`).

When *not* to use it: a streaming response that commits *after* its headers went out
cannot hand that commit's token back (the headers are already sent); commit before
streaming. An unhandled exception after a commit becomes Starlette's 500 page outside this
middleware, without the token (an ``HTTPException`` response carries it). WebSocket
connections pass through without a causal context.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from sqlalchemy import orm
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .consistency import causal_context, current_causal_context
from .errors import ConfigurationError
from .routing import RoutingSession
from .web import (
    DEFAULT_COOKIE_NAME,
    DEFAULT_HEADER_NAME,
    READ_METHODS,
    RoleResolver,
    TokenCarrier,
    make_carrier,
    resolve_role,
    role_for_method,
)

__all__ = [
    "DEFAULT_COOKIE_NAME",
    "DEFAULT_HEADER_NAME",
    "READ_METHODS",
    "CausalTokenMiddleware",
    "RoleResolver",
    "TokenCarrier",
    "role_for_method",
    "session_dependency",
]

log = logging.getLogger("sqlalchemy_scale.web")


class CausalTokenMiddleware:
    """Carry the causal token between a client's requests (pure ASGI; FastAPI and Starlette).

    :param app: the ASGI application (``app.add_middleware(CausalTokenMiddleware)`` passes it).
    :param cookie_name: the cookie's name (``scale_token``).
    :param header_name: the header's name (``X-Scale-Token``).
    :param secret_key: sign tokens so that forged ones are ignored (see
        :class:`~sqlalchemy_scale.web.TokenCarrier`).
    :param carrier: a ready :class:`~sqlalchemy_scale.web.TokenCarrier` instead of the three
        keywords above.

    Each HTTP request runs inside ``ss.causal_context(token)`` with the newest valid token
    from the cookie or the header. When the request committed a write (the context's token
    advanced), the response carries the new token in ``Set-Cookie`` (``HttpOnly``,
    ``SameSite=Lax``, ``Secure`` over https) and in the header. An invalid value is logged
    and ignored; it never fails the request.

    .. versionadded:: 0.2
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        cookie_name: str | None = None,
        header_name: str | None = None,
        secret_key: str | bytes | None = None,
        carrier: TokenCarrier | None = None,
    ) -> None:
        self.app = app
        self.carrier = make_carrier(
            carrier,
            cookie_name=cookie_name,
            header_name=header_name,
            secret_key=secret_key,
            where="CausalTokenMiddleware",
        )
        self._header = self.carrier.header_name.lower().encode("latin-1")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cookies: list[str] = []
        headers: list[str] = []
        for name, value in scope.get("headers", ()):
            if name == b"cookie":
                cookies += self.carrier.read_cookie_header(value.decode("latin-1"))
            elif name == self._header:
                headers.append(value.decode("latin-1"))
        token = self.carrier.read(cookies=cookies, headers=headers)
        secure = scope.get("scheme") == "https"
        with causal_context(token) as context:

            async def send_with_token(message: Message) -> None:
                if message["type"] == "http.response.start" and context.token != token:
                    assert context.token is not None  # a context's token only advances
                    extra = [
                        (name.lower().encode("latin-1"), value.encode("latin-1"))
                        for name, value in self.carrier.response_headers(
                            context.token, secure=secure
                        )
                    ]
                    message = {**message, "headers": [*message.get("headers", ()), *extra]}
                await send(message)

            await self.app(scope, receive, send_with_token)


SessionMaker = orm.sessionmaker[Any] | async_sessionmaker[Any]


def session_dependency(
    sessionmaker: SessionMaker, *, resolver: RoleResolver = role_for_method
) -> Callable[..., Any]:
    """A FastAPI dependency that yields one routing session per request.

    :param sessionmaker: a :class:`~sqlalchemy.orm.sessionmaker` of
        :class:`~sqlalchemy_scale.RoutingSession` (or a subclass, such as
        :class:`~sqlalchemy_scale.sqlmodel.RoutingSQLModelSession`), or an
        :class:`~sqlalchemy.ext.asyncio.async_sessionmaker` whose ``sync_session_class``
        is one. A sync maker gives a sync dependency (run in FastAPI's thread pool), an
        async maker an ``async`` one.
    :param resolver: the request's default role from its method; by default GET, HEAD
        and OPTIONS read from replicas and other methods from the primary (a statement
        may still say ``execution_options(use_replica=True)``).

    The dependency commits nothing (the route does) and always closes the session, which
    rolls back whatever the route left uncommitted. Anything else raises
    :class:`~sqlalchemy_scale.ConfigurationError` here, not at the first request.

    .. versionadded:: 0.2
    """
    if isinstance(sessionmaker, async_sessionmaker):
        return _async_dependency(sessionmaker, resolver)
    if not isinstance(sessionmaker, orm.sessionmaker):
        raise ConfigurationError(
            "session_dependency() needs a sessionmaker or async_sessionmaker of routing "
            f"sessions, got {type(sessionmaker).__name__}"
        )
    if not issubclass(sessionmaker.class_, RoutingSession):
        raise ConfigurationError(
            f"session_dependency(): the sessionmaker makes {sessionmaker.class_.__name__}, "
            "not a RoutingSession; build it with ss.routing_sessionmaker(replica_set) or "
            "sessionmaker(class_=ss.RoutingSession, replica_set=...)"
        )
    maker = sessionmaker

    def get_session(request: Request) -> Iterator[orm.Session]:
        _warn_without_context()
        with maker() as session:
            session.default_role = resolve_role(resolver, request.method)
            yield session

    return get_session


def _async_dependency(
    maker: async_sessionmaker[Any], resolver: RoleResolver
) -> Callable[..., AsyncIterator[AsyncSession]]:
    sync_class = maker.kw.get("sync_session_class") or getattr(
        maker.class_, "sync_session_class", None
    )
    if not (isinstance(sync_class, type) and issubclass(sync_class, RoutingSession)):
        name = getattr(sync_class, "__name__", repr(sync_class))
        raise ConfigurationError(
            f"session_dependency(): the async_sessionmaker's sync_session_class is {name}, "
            "not a RoutingSession; build it with async_sessionmaker(class_=AsyncSession, "
            "sync_session_class=ss.RoutingSession, replica_set=...)"
        )

    async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
        _warn_without_context()
        async with maker() as session:
            session.sync_session.default_role = resolve_role(resolver, request.method)
            yield session

    return get_session


_warned = False


def _warn_without_context() -> None:
    global _warned
    if not _warned and current_causal_context() is None:
        _warned = True
        log.warning(
            "a routing session was opened outside any causal_context: add "
            "CausalTokenMiddleware to the app, or a client will not read its own writes "
            "in its next request"
        )
