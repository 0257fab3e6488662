"""An iterator run ahead of its consumer on a daemon thread, through a bounded queue (file prefetch, loop stages)."""

from __future__ import annotations

import queue
import threading
from typing import Callable, Generic, Iterator, TypeVar

_T = TypeVar("_T")
_END = object()  # end of the items, passed down the queue
_POLL_S = 0.05  # how often a blocked put/get looks at the stop flag
#: the bytes of frame data one queue may hold besides its count limit. The loop's queues hold decoded frames: at the
#: 100 MP decode cap (300 MB a frame) the file prefetch, capture and inference queues held ~12 frames (3.6 GB) at
#: batch 1, more than an edge device spares. One item of any size always fits an empty queue, and the producer holds
#: the item it waits to put, so a stage holds at most this plus two items (at 100 MP, ~7 frames in all at batch 1).
QUEUE_BYTES = 512 * 2 ** 20


class _Raised:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class Buffered(Generic[_T]):
    """``items`` produced on a thread up to ``size`` ahead; the consumer's ``next`` re-raises what they raised.

    A full queue (``size`` items, or with ``size_of`` more than ``max_bytes`` with the new item) blocks the
    producer, or with ``drop_oldest`` (live cameras) drops its oldest item, counted in ``dropped``. ``stop``
    (shared by the stages of one loop) makes both sides give up: the producer stops putting, the consumer's
    iteration ends. The producer closes ``items`` (a generator) on its own thread when it ends.
    """

    def __init__(self, items: Iterator[_T], size: int, name: str, drop_oldest: bool = False,
                 stop: threading.Event | None = None, size_of: Callable[[_T], int] | None = None,
                 max_bytes: int = QUEUE_BYTES) -> None:
        self._items = items
        self._queue: queue.Queue[tuple[object, int]] = queue.Queue(maxsize=max(1, size))
        self._drop_oldest = drop_oldest
        self._size_of = size_of
        self.max_bytes = int(max_bytes)
        self._held = 0  # bytes of the queued items (by size_of)
        self._room = threading.Condition()  # notified whenever an item leaves the queue
        self.stop = stop or threading.Event()
        self.dropped = 0
        self._ended = False
        self.name = name
        self._thread = threading.Thread(target=self._produce, name=name[:60], daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            for item in self._items:
                if not self._put(item, self._drop_oldest):
                    return
            self._put(_END)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer's thread
            self._put(_Raised(exc))
        finally:
            close = getattr(self._items, "close", None)
            if close is not None:
                close()

    def _put(self, item: object, drop_oldest: bool = False) -> bool:
        real = item is not _END and not isinstance(item, _Raised)
        sized = real and self._size_of is not None
        nbytes = max(0, int(self._size_of(item))) if sized else 0  # type: ignore[arg-type,misc]
        while not self.stop.is_set():
            with self._room:
                if self._queue.empty() or self._held + nbytes <= self.max_bytes:
                    try:
                        self._queue.put_nowait((item, nbytes))
                        self._held += nbytes
                        return True
                    except queue.Full:
                        pass
                if not drop_oldest:
                    self._room.wait(_POLL_S)
                    continue
                try:
                    _, old = self._queue.get_nowait()
                except queue.Empty:  # the consumer took it and has not yet released its bytes: wait for that
                    self._room.wait(_POLL_S)
                    continue
                self._held -= old
                self.dropped += 1
        return False

    def _taken(self, entry: tuple[object, int]) -> object:
        """An entry the consumer took: its bytes leave the budget, a waiting producer wakes."""
        item, nbytes = entry
        with self._room:
            self._held -= nbytes
            self._room.notify_all()
        return item

    @property
    def held_bytes(self) -> int:
        """Bytes of the items queued now (by ``size_of``; 0 without it)."""
        return self._held

    @property
    def ended(self) -> bool:
        """True once the end (or an error) has been taken from the queue."""
        return self._ended

    def __iter__(self) -> Buffered[_T]:
        return self

    def __next__(self) -> _T:
        while not self._ended:
            try:
                return self._unpack(self._taken(self._queue.get(timeout=_POLL_S)))
            except queue.Empty:
                self._ended = self.stop.is_set() or (not self._thread.is_alive() and self._queue.empty())
        raise StopIteration

    def get_nowait(self) -> _T | None:
        """The next item if one is queued now, else None (also at the end, after which iteration stops)."""
        try:
            return None if self._ended else self._unpack(self._taken(self._queue.get_nowait()))
        except (queue.Empty, StopIteration):
            return None

    def _unpack(self, item: object) -> _T:
        if item is _END or isinstance(item, _Raised):
            self._ended = True
            if isinstance(item, _Raised):
                raise item.exc
            raise StopIteration
        return item  # type: ignore[return-value]

    def close(self, timeout_s: float) -> bool:
        """Stop both sides and wait up to ``timeout_s`` for the producer; False when it is still running."""
        self.stop.set()
        self._thread.join(timeout_s)
        return not self._thread.is_alive()
