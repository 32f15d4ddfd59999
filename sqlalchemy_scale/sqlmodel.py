"""SQLModel sessions that route: ``session.exec()`` with replica routing, sync and async.

:class:`RoutingSQLModelSession` is both :class:`sqlmodel.Session` (``.exec()``,
``.get()``) and :class:`~sqlalchemy_scale.RoutingSession` (same rules, same causal tokens);
:class:`AsyncRoutingSQLModelSession` is SQLModel's ``AsyncSession`` over it::

    Session = sessionmaker(class_=RoutingSQLModelSession, replica_set=replicas)
    AsyncSession = async_sessionmaker(class_=AsyncRoutingSQLModelSession, replica_set=replicas)

Both are plain subclasses: nothing is copied from either parent, so SQLModel's ``exec()``
goes through the routing session's ``execute()`` and its routing options.

.. versionadded:: 0.2
"""

from __future__ import annotations

from sqlmodel import Session as _SQLModelSession
from sqlmodel.ext.asyncio.session import AsyncSession as _SQLModelAsyncSession

from .routing import RoutingSession

__all__ = ["AsyncRoutingSQLModelSession", "RoutingSQLModelSession"]


# sqlmodel.Session narrows execute()'s signature for its deprecation overloads; both end in
# Session.execute, so the two parents agree at run time.
class RoutingSQLModelSession(_SQLModelSession, RoutingSession):  # type: ignore[misc]
    """A :class:`sqlmodel.Session` that routes like :class:`~sqlalchemy_scale.RoutingSession`.

    Takes :class:`~sqlalchemy_scale.RoutingSession`'s keyword arguments (``replica_set=``,
    ``default_role=``, ``causal_token=``).

    .. versionadded:: 0.2
    """


class AsyncRoutingSQLModelSession(_SQLModelAsyncSession):
    """SQLModel's ``AsyncSession`` (``await session.exec(...)``) over a
    :class:`RoutingSQLModelSession`; keyword arguments such as ``replica_set=`` go to it.

    .. versionadded:: 0.2
    """

    sync_session_class = RoutingSQLModelSession
