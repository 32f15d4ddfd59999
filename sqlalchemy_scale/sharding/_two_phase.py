"""Phase two of a PostgreSQL two-phase commit, shared by the sharded session and
:meth:`~sqlalchemy_scale.DirectorySharding.move`.

Once one ``COMMIT PREPARED`` has succeeded the transaction is committed: every
other prepared part must then be committed too, never rolled back, even when
one of them fails (a lost connection leaves its part prepared on the server,
where ``COMMIT PREPARED '<gid>'`` finishes it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from sqlalchemy.engine.base import TwoPhaseTransaction

from ..errors import CommitOutcomeUnknown

__all__ = ["commit_prepared"]


def commit_prepared(
    prepared: Sequence[tuple[str, TwoPhaseTransaction]],
    *,
    on_commit: Callable[[TwoPhaseTransaction], None] | None = None,
) -> None:
    """COMMIT PREPARED each ``(name, transaction)``, all of them even after a failure
    (``on_commit`` is called after each success); then raise :class:`CommitOutcomeUnknown`
    naming the parts that failed and their gids."""
    failed: list[tuple[str, str, BaseException]] = []
    for name, trans in prepared:
        try:
            trans.commit()
            if on_commit is not None:
                on_commit(trans)
        except Exception as exc:
            # Keep the prepared transaction for recovery: cleanup must not roll it back.
            trans._is_prepared = False
            failed.append((name, str(trans.xid), exc))
    if failed:
        names = {f[0] for f in failed}
        committed = [name for name, _ in prepared if name not in names]
        pending = ", ".join(f"{name!r} (gid {gid!r}: {exc})" for name, gid, exc in failed)
        raise CommitOutcomeUnknown(
            f"the transaction is committed on {committed} and prepared but not yet committed "
            f"on {pending}; run COMMIT PREPARED '<gid>' there when the server answers (a "
            "prepared transaction holds its locks until then)",
            node=failed[0][0],
            orig=failed[0][2],
        )
