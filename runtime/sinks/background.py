"""A slow file sink's encoding and writing on a thread of its own, so the verdict sinks never wait for it."""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from typing import Callable, Generic, TypeVar

from gradad.runtime.buffered import QUEUE_BYTES
from gradad.runtime.outage import Outage, OutageWords
from gradad.runtime.sinks.base import SinkBase

log = logging.getLogger("gradad.runtime.sinks")

#: Frames the video and the flagged folder may hold for their writer threads in grad-run (a 12 MP RGB frame is
#: 36 MB; 8 absorb a burst of NG frames without dropping and bound the memory).
FILE_QUEUE_FRAMES = 8
#: ... and the bytes those frames may take (8 frames of a 20 MP camera fit): at the 100 MP decode cap 8 frames would
#: be 2.4 GB per writer, more than a Jetson has to spare; one frame of any size is always taken into an empty queue.
#: The loop's own queues' budget: one figure for every queue of frames in grad-run.
FILE_QUEUE_BYTES = QUEUE_BYTES

_T = TypeVar("_T")
_STOP = object()  # the sentinel that ends the worker once everything queued before it is written
_DROPPING = OutageWords(still="still dropping frames after {seconds:.0f} s, {lost} dropped so far",
                        again="keeping up again after {seconds:.0f} s, {lost} frames dropped meanwhile")


class BackgroundWriter(Generic[_T]):
    """Hands items (frames) to ``work`` on one worker thread through a bounded FIFO queue of ``queue_size``.

    The video and flagged-frame sinks encode multi-megapixel images (PNG, overlay, video frame): on the sink thread
    that delayed every verdict behind them, JSONL / MQTT / webhook included. Here :meth:`submit` never blocks a
    live run (``drop_when_full``): a full queue drops the new item (``dropped``, logged once per streak of drops, then at most once a minute, and
    once when items are written again: :class:`~gradad.runtime.outage.Outage`). Items are handled in order;
    :meth:`close` writes every item queued before it (a normal stop loses nothing) and ends the thread, unless
    :meth:`limit` set a deadline (a stop signal): items still queued then are dropped, not written. An interrupted
    :meth:`close` (a second Ctrl-C) drops the rest too. ``work`` handles its own errors; one that escapes is logged
    and counted in ``failed``, and the thread goes on. Items submitted with ``counted=False`` (follow-ups of a
    frame, such as a refined mask) are not frames: their drops count in ``dropped_other``. Without
    ``drop_when_full`` (files: nothing is dropped, the loop waits as its own queues do) :meth:`submit` waits for room.
    """

    def __init__(self, name: str, work: Callable[[_T], None], queue_size: int, drop_when_full: bool = True,
                 max_bytes: int = FILE_QUEUE_BYTES) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self.name = name
        self.max_bytes = int(max_bytes)
        self._bytes = 0  # what the queued items hold (as given to submit)
        self._room = threading.Condition()
        self.drop_when_full = drop_when_full
        self.dropped = 0
        self.dropped_other = 0
        self.dropped_at_stop = 0  # of ``dropped``: queued frames the capped drain after a stop signal left unwritten
        self.failed = 0
        self._work = work
        self._queue: queue.Queue[tuple[int, object, bool, int]] = queue.Queue(maxsize=queue_size)
        self._outage = Outage(name, log, words=_DROPPING)
        self._seq = 0  # items submitted (dropped ones too): their numbers for the outage log
        self._deadline = math.inf  # time.monotonic() after which queued items are dropped, not written
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"gradad-{name.split()[0]}-writer", daemon=True)
        self._thread.start()

    def submit(self, item: _T, counted: bool = True, nbytes: int = 0) -> int:
        """Queue ``item`` (holding ``nbytes`` of frame data) for the worker; its number, or 0 when the queue was
        full (``queue_size`` items, or ``max_bytes`` with this one) and it was dropped."""
        if self._closed:
            raise RuntimeError(f"{self.name}: the background writer is closed")
        self._seq += 1
        with self._room:
            if not self.drop_when_full:  # files: wait for room, as the loop's own queues do
                self._room.wait_for(lambda: not self._over_budget(nbytes))
            elif self._over_budget(nbytes):
                return self._dropped_now(counted, f"its queue and the frame being written hold "
                                                  f"{self._bytes / 2 ** 20:.0f} MiB")
            self._bytes += nbytes
        try:
            self._queue.put((self._seq, item, counted, nbytes), block=not self.drop_when_full)
            return self._seq
        except queue.Full:
            self._release(nbytes)
            return self._dropped_now(counted, f"{self._queue.maxsize} frames already wait to be written")
        except BaseException:  # a second Ctrl-C in the blocking put: the item is not queued, its bytes are free
            self._release(nbytes)
            raise

    def _over_budget(self, nbytes: int) -> bool:
        return self._bytes > 0 and self._bytes + nbytes > self.max_bytes

    def _release(self, nbytes: int) -> None:
        with self._room:
            self._bytes -= nbytes
            self._room.notify_all()

    def _dropped_now(self, counted: bool, why: str) -> int:
        self._drop(counted)
        if counted:
            self._outage.failed(f"not keeping up: {why}, dropping new ones", self._seq)
        return 0

    def _drop(self, counted: bool) -> None:
        if counted:
            self.dropped += 1
        else:
            self.dropped_other += 1

    def limit(self, seconds: float) -> None:
        """Write queued items for at most ``seconds`` more (an earlier limit stays); the rest is dropped."""
        self._deadline = min(self._deadline, time.monotonic() + seconds)

    def _run(self) -> None:
        late = 0  # items dropped at the deadline
        while True:
            seq, item, counted, nbytes = self._queue.get()
            if item is _STOP:
                break
            try:
                if time.monotonic() > self._deadline:
                    self._drop(counted)
                    late += counted
                    continue
                self._work(item)  # type: ignore[arg-type]
                self._outage.delivered(seq)
            except Exception as exc:  # noqa: BLE001 - one bad frame must not end the writer (and its sink)
                self.failed += 1
                log.error("%s: writing a frame failed: %s", self.name, exc, exc_info=log.isEnabledFor(logging.DEBUG))
            finally:
                self._release(nbytes)
        self.dropped_at_stop = late
        if late:
            log.warning("%s: %d queued frame(s) dropped, not written: the run was stopped by a signal and the "
                        "writer had no more time", self.name, late)

    def close(self) -> None:
        """Write everything queued (until the :meth:`limit` deadline, if any), then end the thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._queue.put((0, _STOP, False, 0))  # blocks while the queue is full: behind every frame to be written
            self._thread.join()
        except BaseException:
            self._deadline = -math.inf  # interrupted (a second Ctrl-C): what is still queued is dropped
            raise


class OffloadedSink(SinkBase):
    """A sink whose slow work may run on a :class:`BackgroundWriter` (``_background``; None: on the caller's
    thread, the library default, where every write is complete on return)."""

    _background: BackgroundWriter | None = None

    def _offload(self, name: str, work: Callable[[_T], None], queue_size: int, drop_when_full: bool) -> None:
        """With ``queue_size > 0``, hand ``work`` to a writer thread of this sink's own (a full queue drops the
        frame with ``drop_when_full``, a live run's rule; else the caller waits, as a run over files does)."""
        self._background = BackgroundWriter(name, work, queue_size, drop_when_full) if queue_size else None

    @property
    def dropped(self) -> int:
        """Frames dropped because the writer thread's queue was full (or the drain after a signal ran out)."""
        return self._background.dropped if self._background is not None else 0

    @property
    def dropped_at_stop(self) -> int:
        """Of :attr:`dropped`: frames still queued when the drain after a stop signal ran out of time."""
        return self._background.dropped_at_stop if self._background is not None else 0

    @property
    def slow_close(self) -> bool:
        return self._background is not None

    def limit_drain(self, seconds: float) -> None:
        if self._background is not None:
            self._background.limit(seconds)
