"""An iterator run ahead of its consumer on a daemon thread, through a bounded queue (file prefetch, loop stages)."""

from __future__ import annotations

import queue
import threading
from typing import Generic, Iterator, TypeVar

_T = TypeVar("_T")
_END = object()  # end of the items, passed down the queue
_POLL_S = 0.05  # how often a blocked put/get looks at the stop flag


class _Raised:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class Buffered(Generic[_T]):
    """``items`` produced on a thread up to ``size`` ahead; the consumer's ``next`` re-raises what they raised.

    A full queue blocks the producer, or with ``drop_oldest`` (live cameras) drops its oldest item, counted in
    ``dropped``. ``stop`` (shared by the stages of one loop) makes both sides give up: the producer stops putting,
    the consumer's iteration ends. The producer closes ``items`` (a generator) on its own thread when it ends.
    """

    def __init__(self, items: Iterator[_T], size: int, name: str, drop_oldest: bool = False,
                 stop: threading.Event | None = None) -> None:
        self._items = items
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max(1, size))
        self._drop_oldest = drop_oldest
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
        while not self.stop.is_set():
            try:
                self._queue.put(item, block=not drop_oldest, timeout=_POLL_S)
                return True
            except queue.Full:
                if drop_oldest:
                    try:
                        self._queue.get_nowait()
                        self.dropped += 1
                    except queue.Empty:
                        pass
        return False

    @property
    def ended(self) -> bool:
        """True once the end (or an error) has been taken from the queue."""
        return self._ended

    def __iter__(self) -> Buffered[_T]:
        return self

    def __next__(self) -> _T:
        while not self._ended:
            try:
                return self._unpack(self._queue.get(timeout=_POLL_S))
            except queue.Empty:
                self._ended = self.stop.is_set() or (not self._thread.is_alive() and self._queue.empty())
        raise StopIteration

    def get_nowait(self) -> _T | None:
        """The next item if one is queued now, else None (also at the end, after which iteration stops)."""
        try:
            return None if self._ended else self._unpack(self._queue.get_nowait())
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
