"""The list a get answers."""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from ._native import Value

__all__ = ["Values"]


class Values(list["Optional[Value]"]):
    """What :meth:`nencache.Client.get` answers: a list with, per key, a
    :class:`nencache.Value` or ``None`` (not cached).

    Use it in a ``with`` block (``with client.get(keys) as values: ...``) or call
    :meth:`release`: every value is then released (see :meth:`nencache.Value.release`).
    """

    def release(self) -> None:
        """Releases every value of the list (see :meth:`nencache.Value.release`)."""
        for v in self:
            if v is not None:
                v.release()

    def __enter__(self) -> Values:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
