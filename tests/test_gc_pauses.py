"""The serving process's collector: start-up heap frozen, every collection timed (adistill.inference.gc_pauses)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from adistill.inference.gc_pauses import GcPauses, freeze_startup_heap


@pytest.fixture
def unfrozen() -> Iterator[None]:
    yield
    gc.unfreeze()  # the test process's heap back to normal for the other tests


def test_freezing_takes_live_objects_out_of_full_collections(unfrozen: None) -> None:
    kept = [[i] for i in range(50_000)]  # long-lived objects a full collection would walk
    frozen = freeze_startup_heap()
    # objects frozen a moment ago may since have been freed (by this or another thread of the test process), which
    # lowers the count; nothing is added to the permanent generation without another freeze
    assert len(kept) <= gc.get_freeze_count() <= frozen
    assert all(gc.is_tracked(x) for x in kept[:10])
    assert not any(x is kept[0] for x in gc.get_objects(generation=2))  # in the permanent generation, not walked


def test_every_collection_is_counted_and_timed_per_generation() -> None:
    pauses = GcPauses().start()
    try:
        before = pauses.snapshot()["generations"]
        gc.collect(0)
        gc.collect(2)
        gc.collect(2)
        after = pauses.snapshot()["generations"]
    finally:
        pauses.stop()
    assert after["2"]["collections"] - before["2"]["collections"] == 2
    assert after["0"]["collections"] - before["0"]["collections"] >= 1
    assert after["2"]["total_ms"] > 0 and after["2"]["max_ms"] > 0
    assert pauses._callback not in gc.callbacks  # stop() unhooks it
    gc.collect(2)
    assert pauses.snapshot()["generations"]["2"]["collections"] == after["2"]["collections"]
