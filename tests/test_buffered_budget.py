"""The loop queues' byte budget (runtime/buffered.py): decoded frames are large, so a queue is bounded in bytes as
well as in items; one item of any size always fits an empty queue; live queues drop their oldest item instead."""

from __future__ import annotations

import threading
import time

import numpy as np

from gradad.runtime.buffered import Buffered


def _items(n: int, nbytes: int, produced: list[int]):
    for i in range(n):
        produced.append(i)
        yield np.full(nbytes, i % 256, np.uint8)


def _wait_until(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def _settled(produced: list[int], pause_s: float = 0.3) -> int:
    """How many items the producer made once it stopped making more (it is blocked)."""
    last = -1
    while len(produced) != last:
        last = len(produced)
        time.sleep(pause_s)
    return last


def test_producer_waits_for_bytes_not_only_items_and_loses_nothing():
    produced: list[int] = []
    buf = Buffered(_items(10, 100, produced), size=8, name="t", size_of=lambda a: a.nbytes, max_bytes=250)
    try:
        made = _settled(produced)
        assert buf.held_bytes == 200  # two items queued: a third would pass 250 bytes, though 8 items would fit
        assert made == 3  # the third is made and waits for room
        got = [int(a[0]) for a in buf]
        assert got == list(range(10))  # every item, in order, after the waits
        assert buf.dropped == 0 and buf.held_bytes == 0
    finally:
        buf.close(2.0)


def test_an_item_larger_than_the_budget_still_passes_through_an_empty_queue():
    produced: list[int] = []
    buf = Buffered(_items(3, 1000, produced), size=4, name="t", size_of=lambda a: a.nbytes, max_bytes=100)
    try:
        assert [a.nbytes for a in buf] == [1000, 1000, 1000]  # one at a time, no deadlock
    finally:
        buf.close(2.0)


def test_live_queue_over_its_byte_budget_drops_the_oldest_and_keeps_the_newest():
    produced: list[int] = []
    buf = Buffered(_items(20, 100, produced), size=8, name="t", drop_oldest=True, size_of=lambda a: a.nbytes,
                   max_bytes=250)
    try:
        _wait_until(lambda: len(produced) == 20)
        _wait_until(lambda: buf.dropped == 18)
        assert buf.held_bytes == 200
        assert [int(a[0]) for a in buf] == [18, 19]
    finally:
        buf.close(2.0)


def test_get_nowait_frees_the_budget_for_the_producer():
    produced: list[int] = []
    buf = Buffered(_items(4, 100, produced), size=8, name="t", size_of=lambda a: a.nbytes, max_bytes=100)
    try:
        _settled(produced)
        assert buf.held_bytes == 100
        first = buf.get_nowait()
        assert first is not None and int(first[0]) == 0
        _wait_until(lambda: buf.held_bytes == 100 and len(produced) >= 3)
        assert [int(a[0]) for a in buf] == [1, 2, 3]
    finally:
        buf.close(2.0)


def test_a_blocked_producer_gives_up_on_stop():
    produced: list[int] = []
    stop = threading.Event()
    buf = Buffered(_items(10, 100, produced), size=8, name="t", stop=stop, size_of=lambda a: a.nbytes, max_bytes=100)
    _settled(produced)
    assert buf.close(2.0)  # the producer waiting for room sees the stop flag and ends


def test_empty_means_no_item_queued_not_no_bytes_held():
    """Zero-byte items (or a size_of that says less than nothing) do not let an oversized item past the budget."""
    sizes = [0, -300, 1000]
    buf = Buffered(iter(sizes), size=8, name="t", size_of=lambda n: n, max_bytes=100)
    try:
        _wait_until(lambda: buf._queue.qsize() == 2)
        time.sleep(0.3)
        assert buf._queue.qsize() == 2 and buf.held_bytes == 0  # the 1000-byte item waits for an empty queue
        assert list(buf) == [0, -300, 1000]
    finally:
        buf.close(2.0)
