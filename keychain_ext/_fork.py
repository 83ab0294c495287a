"""What a forked child must renew.

fork() copies a lock as it is: one that another thread held at that moment
stays held in the child forever.  And what the parent holds (its PIN files)
is the parent's to remove, not the child's.  Objects with such state
register here; the child calls their ``_after_fork_in_child``.  (The C layer
does the same for its own locks with pthread_atfork.)
"""

from __future__ import annotations

import os
import weakref
from typing import Protocol


class RenewedInChild(Protocol):
    def _after_fork_in_child(self) -> None: ...


_REGISTERED: weakref.WeakSet[RenewedInChild] = weakref.WeakSet()


def renew_in_child(obj: RenewedInChild) -> None:
    _REGISTERED.add(obj)


def _renew_all() -> None:
    for obj in list(_REGISTERED):
        obj._after_fork_in_child()


os.register_at_fork(after_in_child=_renew_all)
