"""What the web integrations share, with no framework imported: the causal token's carrier
(cookie and header) and the resolver that picks a request's default role.

The integrations keep Rails' three pieces apart:

- the *middleware* (:mod:`sqlalchemy_scale.fastapi`, :mod:`sqlalchemy_scale.flask`) only
  translates HTTP: it reads the carriers, opens :func:`~sqlalchemy_scale.causal_context` for
  the request and writes the newest token back; it decides nothing;
- the *resolver* (:func:`role_for_method`, or any :class:`RoleResolver`) says whether a
  request's sessions read from replicas or from the primary by default;
- the *context* (:class:`TokenCarrier`) says where the token lives between requests: a
  cookie for browsers, a header for API clients, both written, either read.

A value that is not a token (malformed, or with a bad signature when a ``secret_key`` is
set) is ignored as if absent and logged: a client cannot turn a bad cookie into an error
page. Ignoring it is safe because a missing token only sends that client's reads where a
new visitor's would go; the carriers never make a read *less* fresh than a valid token asks.

When *not* to rely on it: a client that drops both the cookie and the header (a second
browser, a script that ignores ``Set-Cookie``) has no token, and may read from a replica
that has not replayed its own last write yet.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
from collections.abc import Iterable
from typing import Final, Protocol

from .consistency import newer_token, parse_token
from .errors import ConfigurationError
from .topology import Role

__all__ = [
    "DEFAULT_COOKIE_NAME",
    "DEFAULT_HEADER_NAME",
    "READ_METHODS",
    "RoleResolver",
    "TokenCarrier",
    "resolve_role",
    "role_for_method",
]

log = logging.getLogger("sqlalchemy_scale.web")

DEFAULT_COOKIE_NAME: Final = "scale_token"
DEFAULT_HEADER_NAME: Final = "X-Scale-Token"

#: Methods that read (RFC 9110 "safe" methods): their sessions read from replicas by default.
READ_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})

# RFC 9110 token characters: valid cookie and header names.
_NAME: Final = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# A signed value is "<lsn>.<signature>"; anything longer than this is not ours.
_MAX_VALUE: Final = 1024  # a token may cover many primaries; a cookie holds 4 KiB
_SIGNATURE_BYTES: Final = 16
_SIGNING_CONTEXT: Final = b"sqlalchemy-scale causal token\x00"


class RoleResolver(Protocol):
    """Decides a request's default role from its HTTP method (a plain function will do)."""

    def __call__(self, method: str) -> Role: ...


def role_for_method(method: str) -> Role:
    """``"replica"`` for GET, HEAD and OPTIONS; ``"primary"`` for every other method.

    A request that changes something reads what it changes from the primary, so the
    read-modify-write of a POST handler never sees a lagging replica's copy; a statement
    may still opt in with ``execution_options(use_replica=True)``.
    """
    return "replica" if method.upper() in READ_METHODS else "primary"


def resolve_role(resolver: RoleResolver, method: str) -> Role:
    """The resolver's role for a request, checked: anything but ``"primary"`` or
    ``"replica"`` raises :class:`~sqlalchemy_scale.ConfigurationError` naming the resolver."""
    role = resolver(method)
    if role not in ("primary", "replica"):
        name = getattr(resolver, "__qualname__", repr(resolver))
        raise ConfigurationError(
            f"resolver {name} returned {role!r} for a {method} request; a role is "
            "'primary' or 'replica'"
        )
    return role


class TokenCarrier:
    """Where the causal token lives between requests: a cookie and a response/request header.

    :param cookie_name: the cookie's name (``scale_token``).
    :param header_name: the header's name (``X-Scale-Token``), for clients without cookies.
    :param secret_key: when given, tokens are sent signed (HMAC-SHA256) and a value without
        a valid signature is ignored, so a client cannot forge a position; every process
        serving the application must share the key. Without it tokens are sent as plain
        WAL positions and only malformed values are ignored.
    :param cookie_path: the cookie's ``Path``.
    :param cookie_max_age: the cookie's ``Max-Age`` in seconds, or None for a browser-session
        cookie (a token only matters for as long as replicas may lag, but an old one is
        harmless: replicas pass it within moments).

    The cookie is ``HttpOnly`` and ``SameSite=Lax``, and ``Secure`` when the request came
    over https.

    .. versionadded:: 0.2
    """

    def __init__(
        self,
        *,
        cookie_name: str = DEFAULT_COOKIE_NAME,
        header_name: str = DEFAULT_HEADER_NAME,
        secret_key: str | bytes | None = None,
        cookie_path: str = "/",
        cookie_max_age: int | None = None,
    ) -> None:
        for label, value in (("cookie_name", cookie_name), ("header_name", header_name)):
            if not isinstance(value, str) or not _NAME.match(value):
                raise ConfigurationError(
                    f"TokenCarrier: {label} must be an HTTP token (letters, digits, "
                    f"'-', '_', ...), got {value!r}"
                )
        if not cookie_path.startswith("/") or any(c in cookie_path for c in ";,\r\n"):
            raise ConfigurationError(
                f"TokenCarrier: cookie_path must be an absolute path, got {cookie_path!r}"
            )
        if cookie_max_age is not None and cookie_max_age <= 0:
            raise ConfigurationError(
                f"TokenCarrier: cookie_max_age must be positive seconds, got {cookie_max_age}"
            )
        if secret_key is not None and not secret_key:
            raise ConfigurationError("TokenCarrier: secret_key must not be empty")
        self.cookie_name = cookie_name
        self.header_name = header_name
        self.cookie_path = cookie_path
        self.cookie_max_age = cookie_max_age
        self._key = secret_key.encode() if isinstance(secret_key, str) else secret_key

    @property
    def is_signed(self) -> bool:
        """True when tokens are signed (a ``secret_key`` was given)."""
        return self._key is not None

    # -- reading --------------------------------------------------------------------------

    def read(self, *, cookies: Iterable[str] = (), headers: Iterable[str] = ()) -> str | None:
        """The newest valid token among the request's cookie and header values, or None.

        Values that are not valid tokens are logged and ignored, so a valid token in the
        other carrier still applies.
        """
        token: str | None = None
        for where, values in (("cookie", cookies), ("header", headers)):
            for value in values:
                token = newer_token(token, self.decode(value, where=where))
        return token

    def read_cookie_header(self, cookie_header: str | None) -> list[str]:
        """The values of this carrier's cookie in a ``Cookie`` request header (every one:
        a browser may send two cookies of the same name set for different paths)."""
        if not cookie_header:
            return []
        values = []
        for pair in cookie_header.split(";"):
            name, sep, value = pair.partition("=")
            if sep and name.strip() == self.cookie_name:
                values.append(value.strip().strip('"'))
        return values

    def decode(self, value: str, *, where: str = "value") -> str | None:
        """The token a carrier's value holds, or None (logged) if it is not a valid one."""
        value = value.strip()
        if not value:
            return None
        position, sep, signature = value.partition(".")
        why = None
        if len(value) > _MAX_VALUE:
            why = "too long to be a token"
        elif self._key is not None and not sep:
            why = "unsigned"
        elif self._key is not None and not hmac.compare_digest(
            # As bytes: compare_digest refuses non-ASCII str, and a header may hold anything.
            signature.encode("utf-8", "surrogateescape"),
            self._signature(position).encode(),
        ):
            why = "bad signature"
        elif self._key is None and sep:
            why = "signed, but no secret_key is configured"
        else:
            try:
                parse_token(position)
            except ConfigurationError:
                why = "not a causal token"
        if why is None:
            return position
        # repr() escapes control characters, so a crafted value cannot forge log lines.
        log.warning(
            "ignored the causal token in the %s %r (%s): %s",
            where,
            self.cookie_name if where == "cookie" else self.header_name,
            why,
            repr(value[:24]),
        )
        return None

    # -- writing --------------------------------------------------------------------------

    def encode(self, token: str) -> str:
        """The value sent to the client for ``token`` (signed when a ``secret_key`` is set)."""
        parse_token(token)  # never send anything but a token
        if self._key is None:
            return token
        return f"{token}.{self._signature(token)}"

    def set_cookie_header(self, token: str, *, secure: bool) -> str:
        """The ``Set-Cookie`` header value that hands ``token`` to a browser."""
        parts = [f"{self.cookie_name}={self.encode(token)}", f"Path={self.cookie_path}"]
        if self.cookie_max_age is not None:
            parts.append(f"Max-Age={self.cookie_max_age}")
        parts += ["HttpOnly", "SameSite=Lax"]
        if secure:
            parts.append("Secure")
        return "; ".join(parts)

    def response_headers(self, token: str, *, secure: bool) -> list[tuple[str, str]]:
        """Both carriers for a response: ``Set-Cookie`` and the token header."""
        return [
            ("Set-Cookie", self.set_cookie_header(token, secure=secure)),
            (self.header_name, self.encode(token)),
        ]

    def _signature(self, position: str) -> str:
        assert self._key is not None
        digest = hmac.new(self._key, _SIGNING_CONTEXT + position.encode(), hashlib.sha256)
        return base64.urlsafe_b64encode(digest.digest()[:_SIGNATURE_BYTES]).rstrip(b"=").decode()

    def __repr__(self) -> str:
        return (
            f"TokenCarrier(cookie_name={self.cookie_name!r}, header_name={self.header_name!r}, "
            f"signed={self.is_signed})"
        )


def make_carrier(
    carrier: TokenCarrier | None,
    *,
    cookie_name: str | None,
    header_name: str | None,
    secret_key: str | bytes | None,
    where: str,
) -> TokenCarrier:
    """The carrier an integration uses: the one given, or one built from its keywords
    (giving both is a configuration error, not a silent choice)."""
    if carrier is not None:
        if cookie_name is not None or header_name is not None or secret_key is not None:
            raise ConfigurationError(
                f"{where}: give either carrier= or cookie_name=/header_name=/secret_key=, not both"
            )
        return carrier
    return TokenCarrier(
        cookie_name=cookie_name or DEFAULT_COOKIE_NAME,
        header_name=header_name or DEFAULT_HEADER_NAME,
        secret_key=secret_key,
    )
