"""An outage of something a 24/7 line depends on (a broker, a webhook, a camera), logged without flooding the log.

Shared by the network sinks (records not delivered) and the live sources (a camera or stream that is down): the
first failure is logged at once (WARNING, with its reason), then at most one line per ``every_s`` while it lasts,
and one INFO line when it is over, saying how long it lasted.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

#: Seconds between two log lines of one outage (its first failure is logged at once).
OUTAGE_LOG_EVERY_S = 60.0
#: The shortest longest wait between two reconnect attempts of a live source (--reconnect-backoff-max, a line
#: file's reconnect.backoff_max_s, SourceConfig.reconnect_max_s): 0 reopened a lost camera hundreds of times a second.
MIN_BACKOFF_S = 0.1
#: A live source's ``gave_up_reason`` when it was down for longer than its give-up time (the others say theirs).
GIVE_UP_TIMEOUT = "give-up time"


@dataclass(frozen=True)
class OutageWords:
    """How an outage's repeat line and its end read; ``{seconds}``, ``{lost}`` and ``{reason}`` are filled in
    (``lost``: the total of ``Outage.failed(..., lost=N)`` during the outage)."""

    still: str = "still not delivering after {seconds:.0f} s, {lost} records lost so far (last: {reason})"
    again: str = "delivering again after {seconds:.0f} s, {lost} records lost meanwhile"


class Outage:
    """A failure streak: its first failure is logged at once (WARNING, with the reason), then at most one line per
    ``every_s`` with what was lost so far, and one INFO line when it ends. Events are numbered by the caller (a
    sink numbers records in the order they were queued): the streak ends when an event numbered after its last
    failure succeeds (a slow endpoint that succeeds while its full queue keeps dropping stays one streak).
    Thread-safe (a sink's writer and paho's thread both report)."""

    def __init__(self, name: str, logger: logging.Logger, every_s: float = OUTAGE_LOG_EVERY_S,
                 words: OutageWords = OutageWords()) -> None:
        self.name = name
        self._log = logger
        self._every_s = every_s
        self._words = words
        self._lock = threading.Lock()
        self._since: float | None = None  # monotonic start of the streak in progress
        self._logged_at = 0.0
        self._lost = 0
        self._mark = -1  # the newest event number concerned by the last failure

    def failed(self, reason: str, seq: int, lost: int = 1) -> None:
        """A failure concerning the events up to number ``seq``; ``lost`` things given up on (0 for a lost
        connection whose records are still queued)."""
        now = time.monotonic()
        with self._lock:
            self._lost += lost
            self._mark = max(self._mark, seq)
            if self._since is None:
                self._since, self._logged_at = now, now
                self._log.warning("%s: %s (logged again at most every %.0f s while it lasts; the run goes on)",
                                  self.name, reason, self._every_s)
            elif now - self._logged_at >= self._every_s:
                self._logged_at = now
                self._log.warning("%s: %s", self.name,
                                  self._words.still.format(seconds=now - self._since, lost=self._lost, reason=reason))

    def delivered(self, seq: int) -> None:
        """Event number ``seq`` succeeded: ends the streak (one INFO line) if it came after its last failure."""
        with self._lock:
            if self._since is None or seq <= self._mark:
                return
            self._log.info("%s: %s", self.name,
                           self._words.again.format(seconds=time.monotonic() - self._since, lost=self._lost))
            self._since, self._lost = None, 0
