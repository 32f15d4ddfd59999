"""The whole exception tree of sqlalchemy-scale.

Every exception derives from :class:`ScaleError`, itself a
:class:`sqlalchemy.exc.SQLAlchemyError`, so an application's existing
``except SQLAlchemyError`` keeps catching them. Messages name the model,
column, value, node or shard involved, and never contain a password: URLs are
rendered with :func:`render_url`.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Engine, make_url

__all__ = [
    "CommitOutcomeUnknown",
    "ConfigurationError",
    "CrossShardQueryError",
    "CrossShardWriteError",
    "NodeUnavailableError",
    "PartialCommitError",
    "ReplicaWriteError",
    "ScaleError",
    "ShardKeyError",
    "TransactionPoolingError",
    "mask_secrets",
    "render_url",
]


# libpq parameters whose value is a secret, and those whose value may be a whole connection
# string (``dbname='host=x password=y'``, ``dbname=postgresql://u:pw@h/db``) with one inside.
_SECRET_PARAMETERS = frozenset({"password", "sslpassword"})
_CONNINFO_PARAMETERS = frozenset({"dbname", "database", "service"})
_MASK = "***"
# password=... in a key/value connection string (quoted or not) or a URI's query string.
_CONNINFO_PASSWORD = re.compile(
    r"(\b(?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]*)", re.IGNORECASE
)
# user:password@ in a URI connection string.
_URI_PASSWORD = re.compile(r"(://[^/@:?#]*:)[^@/?#]*@")


def mask_secrets(message: str) -> str:
    """``message`` with any ``password=...`` or ``user:password@`` in it masked: for driver
    error messages, which may quote a connection string."""
    return _URI_PASSWORD.sub(rf"\1{_MASK}@", _CONNINFO_PASSWORD.sub(rf"\1{_MASK}", message))


def _mask_conninfo(value: str) -> str:
    if "=" not in value and "://" not in value:
        return value  # a plain database or service name
    return mask_secrets(value)


def _mask_parameter(key: str, value: str | tuple[str, ...]) -> str | tuple[str, ...]:
    if key.lower() in _SECRET_PARAMETERS:
        return _MASK if isinstance(value, str) else tuple(_MASK for _ in value)
    if key.lower() in _CONNINFO_PARAMETERS:
        return (
            _mask_conninfo(value) if isinstance(value, str) else tuple(map(_mask_conninfo, value))
        )
    return value


def render_url(target: str | URL | Engine) -> str:
    """Return ``target``'s URL as text with every secret masked (``***``).

    Masked: the URL's password, the ``password`` and ``sslpassword`` query parameters, and
    the password inside a connection string given as the database or as a ``dbname``,
    ``database`` or ``service`` query parameter (libpq accepts a whole conninfo there). This
    is the one function the library renders URLs with: logs, reprs and error messages.
    """
    if isinstance(target, Engine):
        target = target.url
    try:
        url = make_url(target)
    except Exception:  # an unparsable string: say so without echoing it
        return "<unparsable URL>"
    if url.query:
        url = url.set(query={k: _mask_parameter(k, v) for k, v in url.query.items()})
    if url.database:
        url = url.set(database=_mask_conninfo(url.database))
    # The query string is percent-encoded when rendered; show the mask as typed.
    return url.render_as_string(hide_password=True).replace("%2A%2A%2A", _MASK)


def sqlstate(exc: BaseException | None) -> str | None:
    """The SQLSTATE of a driver error, or of the SQLAlchemy error wrapping one, else None.

    psycopg2 calls it ``pgcode``, psycopg 3 and asyncpg ``sqlstate``.
    """
    if isinstance(exc, sa_exc.DBAPIError):
        exc = exc.orig
    code = getattr(exc, "pgcode", None) or getattr(exc, "sqlstate", None)
    return str(code) if code else None


class ScaleError(sa_exc.SQLAlchemyError):
    """Base class of every sqlalchemy-scale error."""


class ConfigurationError(ScaleError, sa_exc.ArgumentError):
    """A topology, strategy or preset was configured wrongly.

    Raised when the object is constructed, not at the first query.
    """


class ReplicaWriteError(ScaleError):
    """A statement that writes was sent to, or attempted on, a replica.

    Nothing was written: either the statement was refused before it left the
    process, or the replica (read-only by recovery, and by ``BEGIN READ ONLY``)
    rejected it. :attr:`node` names the node.
    """

    def __init__(self, message: str, *, node: str, statement: str | None = None) -> None:
        super().__init__(message)
        self.node = node
        self.statement = statement


class _NodeFailure(ScaleError, sa_exc.OperationalError):
    """What failed where: the node (and the shard) named, the driver's error as ``orig``,
    and the message as given (without SQLAlchemy's statement decoration)."""

    def __init__(
        self,
        message: str,
        *,
        node: str,
        orig: BaseException | None = None,
        shard: str | None = None,
    ) -> None:
        sa_exc.OperationalError.__init__(self, message, None, orig or Exception(message))
        self.node = node
        self.shard = shard
        self._text = message

    def __str__(self) -> str:
        return self._text


class NodeUnavailableError(_NodeFailure):
    """A node could not be reached and no other node could answer correctly instead.

    :attr:`node` names the node; :attr:`shard` the shard it belongs to (None outside a
    :class:`~sqlalchemy_scale.ShardedSession`).
    """


class ShardKeyError(ScaleError):
    """A row or query could not be placed on a shard.

    The shard key is missing, or its value falls outside what the sharding
    strategy can place. Nothing was written anywhere.
    """

    def __init__(
        self,
        message: str,
        *,
        model: str | None = None,
        column: str | None = None,
        value: Any = None,
    ) -> None:
        super().__init__(message)
        self.model = model
        self.column = column
        self.value = value


class CrossShardQueryError(ScaleError):
    """A query that spans shards has a shape whose results cannot be merged correctly."""


class CrossShardWriteError(ScaleError):
    """A transaction wrote to more than one shard and two-phase commit is not allowed.

    Raised before anything is committed.
    """


class CommitOutcomeUnknown(_NodeFailure):
    """The connection was lost during COMMIT: the transaction may or may not have committed.

    Reconcile (read back what was written) instead of blindly retrying. :attr:`node` names
    the node; :attr:`shard` the shard whose COMMIT (or COMMIT PREPARED) it was (None outside
    a :class:`~sqlalchemy_scale.ShardedSession`).
    """


class PartialCommitError(ScaleError):
    """A best-effort cross-shard commit (``ShardSet(cross_shard_writes="best_effort")``)
    stopped at a shard: some shards committed the transaction's writes, others did not.

    Not a :class:`CrossShardWriteError` (which promises that nothing committed). The
    shards are listed, each in one attribute:

    * ``committed``: shards whose COMMIT succeeded; their writes are durable;
    * ``failed``: the shard whose COMMIT the server refused (a deferred constraint, a
      serialization failure); its writes were rolled back;
    * ``unknown``: the shard whose connection was lost during its COMMIT; its writes may
      or may not have committed (read them back to know);
    * ``rolled_back``: shards after it, not committed; their writes were rolled back.

    ``orig`` is the exception the failing COMMIT raised.

    .. versionadded:: 0.3
    """

    def __init__(
        self,
        message: str,
        *,
        committed: list[str],
        failed: list[str],
        unknown: list[str],
        rolled_back: list[str],
        orig: BaseException,
    ) -> None:
        super().__init__(message)
        self.committed = committed
        self.failed = failed
        self.unknown = unknown
        self.rolled_back = rolled_back
        self.orig = orig


class TransactionPoolingError(ScaleError):
    """A statement that transaction pooling silently breaks was refused before it was sent.

    Raised by the guard that :func:`sqlalchemy_scale.pooling.guard_transaction_pooling`
    installs on engines behind a transaction pooler. Nothing reached the server.
    :attr:`statement` is the statement, :attr:`construct` what it does (e.g.
    ``"session-level SET"``) and :attr:`alternative` what to write instead.
    """

    def __init__(self, message: str, *, statement: str, construct: str, alternative: str) -> None:
        super().__init__(message)
        self.statement = statement
        self.construct = construct
        self.alternative = alternative
