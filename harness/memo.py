"""Made once, or failed once: a value per key, and the error of a making
that failed, given again to every later asker.

A session builds the harness's QEMU once, and a nightly worker reaches each
host and builds each firmware once; when that fails, every case that needs
it fails with the same error, without trying again. Keep a :class:`Memo` in
``config.stash`` under a typed key.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class Memo(Generic[K, T]):
    """Values by key; :meth:`get` makes a missing one, once.

    :param keeps: the errors a failed making is remembered for (others, a
        bug, propagate and are not remembered).
    """

    def __init__(self, keeps: tuple[type[Exception], ...] = (Exception,)) -> None:
        self._made: dict[K, T | Exception] = {}
        self._keeps = keeps

    def get(self, key: K, make: Callable[[], T]) -> T:
        """The value of ``key``, made now if it never was; the remembered
        error, raised again, if its making failed."""
        if key not in self._made:
            try:
                self._made[key] = make()
            except self._keeps as exc:
                self._made[key] = exc
        found = self._made[key]
        if isinstance(found, Exception):
            raise found
        return found

    def values(self) -> Iterator[T]:
        """The values made (not the errors)."""
        return (v for v in self._made.values() if not isinstance(v, Exception))
