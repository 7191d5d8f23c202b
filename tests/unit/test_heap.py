"""The start-up freeze: what a process holds when it starts is exempt from collection,
and what it allocates later is still collected."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from scanqueue.worker.heap import freeze_startup_objects


@pytest.fixture
def unfrozen_after() -> Iterator[None]:
    yield
    gc.unfreeze()


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_startup_objects_are_frozen_and_later_garbage_is_collected(unfrozen_after: None) -> None:
    frozen = freeze_startup_objects()
    # A frozen object that is freed leaves the count, and the test process's other
    # threads (a lease watchdog, a deadline thread) may free some meanwhile.
    assert frozen > 1000 and frozen - 1000 < gc.get_freeze_count() <= frozen
    later = weakref.ref(_Cycle())  # a cycle made after the freeze, unreachable at once
    assert later() is not None
    gc.collect()
    assert later() is None
