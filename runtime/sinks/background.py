"""A slow file sink's encoding and writing on a thread of its own, so the verdict sinks never wait for it."""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable, Generic, TypeVar

from gradad.runtime.outage import Outage, OutageWords
from gradad.runtime.sinks.base import SinkBase

log = logging.getLogger("gradad.runtime.sinks")

#: Frames the video and the flagged folder may hold for their writer threads in grad-run (a 12 MP RGB frame is
#: 36 MB; 8 absorb a burst of NG frames without dropping and bound the memory).
FILE_QUEUE_FRAMES = 8

_T = TypeVar("_T")
_STOP = object()  # the sentinel that ends the worker once everything queued before it is written
_DROPPING = OutageWords(still="still dropping frames after {seconds:.0f} s, {lost} dropped so far",
                        again="keeping up again after {seconds:.0f} s, {lost} frames dropped meanwhile")


class BackgroundWriter(Generic[_T]):
    """Hands items (frames) to ``work`` on one worker thread through a bounded FIFO queue of ``queue_size``.

    The video and flagged-frame sinks encode multi-megapixel images (PNG, overlay, video frame): on the sink thread
    that delayed every verdict behind them, JSONL / MQTT / webhook included. Here :meth:`submit` never blocks: a
    full queue drops the new item (``dropped``, logged once per streak of drops, then at most once a minute, and
    once when items are written again: :class:`~gradad.runtime.outage.Outage`). Items are handled in order;
    :meth:`close` writes every item queued before it (a normal stop loses nothing) and ends the thread.
    ``work`` handles its own errors; one that escapes is logged and counted in ``failed``, and the thread goes on.
    """

    def __init__(self, name: str, work: Callable[[_T], None], queue_size: int) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self.name = name
        self.dropped = 0
        self.failed = 0
        self._work = work
        self._queue: queue.Queue[tuple[int, object]] = queue.Queue(maxsize=queue_size)
        self._outage = Outage(name, log, words=_DROPPING)
        self._seq = 0  # items submitted (dropped ones too): their numbers for the outage log
        self._done = 0  # the number of the newest item handled (FIFO: every older one is handled or dropped)
        self._done_cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"gradad-{name.split()[0]}-writer", daemon=True)
        self._thread.start()

    def submit(self, item: _T) -> int:
        """Queue ``item`` for the worker; its number, or 0 when the queue was full and it was dropped."""
        if self._closed:
            raise RuntimeError(f"{self.name}: the background writer is closed")
        self._seq += 1
        try:
            self._queue.put_nowait((self._seq, item))
            return self._seq
        except queue.Full:
            self.dropped += 1
            self._outage.failed(f"not keeping up: {self._queue.maxsize} frames already wait to be written, dropping "
                                f"new ones", self._seq)
            return 0

    def wait_done(self, number: int, timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) until item ``number`` is handled; True when it is."""
        with self._done_cond:
            return self._done_cond.wait_for(lambda: self._done >= number, timeout_s)

    def _run(self) -> None:
        while True:
            seq, item = self._queue.get()
            if item is _STOP:
                return
            try:
                self._work(item)  # type: ignore[arg-type]
                self._outage.delivered(seq)
            except Exception as exc:  # noqa: BLE001 - one bad frame must not end the writer (and its sink)
                self.failed += 1
                log.error("%s: writing a frame failed: %s", self.name, exc, exc_info=log.isEnabledFor(logging.DEBUG))
            finally:
                with self._done_cond:
                    self._done = seq
                    self._done_cond.notify_all()

    def close(self) -> None:
        """Write everything queued, then end the thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._queue.put((0, _STOP))  # blocks while the queue is full: behind every frame still to be written
        self._thread.join()


class OffloadedSink(SinkBase):
    """A sink whose slow work may run on a :class:`BackgroundWriter` (``_background``; None: on the caller's
    thread, the library default, where every write is complete on return)."""

    _background: BackgroundWriter | None = None

    def _offload(self, name: str, work: Callable[[_T], None], queue_size: int) -> None:
        """With ``queue_size > 0``, hand ``work`` to a writer thread of this sink's own."""
        self._background = BackgroundWriter(name, work, queue_size) if queue_size else None

    @property
    def dropped(self) -> int:
        """Frames dropped because the writer thread's queue was full."""
        return self._background.dropped if self._background is not None else 0
