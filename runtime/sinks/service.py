"""systemd's service notification for a station that runs ``grad-run`` as a ``Type=notify`` service.

systemd sets ``$NOTIFY_SOCKET`` for such a service and waits for ``READY=1`` before it counts the service as
started (units ordered after it, ``systemctl start`` itself). :class:`ServiceNotifySink` sends it once the loop
starts scoring (the model loaded and warmed up, the sources open), keeps ``systemctl status`` showing the frames
scored, NG parts and frame rate (``STATUS=``), feeds the watchdog when the unit sets ``WatchdogSec=`` (one
``WATCHDOG=1`` per half period while frames are scored: a free-running camera's line is restarted when no frame has
been scored for that long; a triggered camera's unit should not set it) and says ``STOPPING=1`` as the loop ends,
before the drains of the refinement worker and the file writers (which may outlast a watchdog period).
The protocol is one datagram per message on a Unix socket (sd_notify(3)); no systemd library is needed.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from typing import Mapping

from gradad.runtime.sinks.base import SinkBase
from gradad.runtime.types import FrameResult

log = logging.getLogger("gradad.runtime.sinks")

#: seconds between two STATUS= updates (systemctl status shows the latest)
STATUS_EVERY_S = 5.0
#: what systemd sets for the service's main process; the refinement worker must not inherit it (sd_notify's
#: unset_environment): only grad-run itself speaks for the service
SERVICE_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
#: a full socket buffer (systemd busy): this message is dropped, the next one tried; other errors end notifying
_BUSY = {errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS}


def notify_address(environ: Mapping[str, str] | None = None) -> str | bytes | None:
    """The socket systemd listens on (``$NOTIFY_SOCKET``; '@' names an abstract socket), or None outside systemd."""
    path = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not path:
        return None
    return b"\0" + path[1:].encode() if path.startswith("@") else path


def watchdog_period_s(environ: Mapping[str, str] | None = None) -> float | None:
    """The unit's watchdog period in seconds (``$WATCHDOG_USEC``, for this process: ``$WATCHDOG_PID``), or None."""
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
        pid = int(env.get("WATCHDOG_PID", str(os.getpid())))
    except ValueError:
        return None
    return usec / 1e6 if usec > 0 and pid == os.getpid() else None


class ServiceNotifySink(SinkBase):
    """sd_notify messages for the run's life: READY at :meth:`started`, STATUS and WATCHDOG as frames are scored,
    STOPPING at :meth:`stopping` (or at :meth:`close` when the loop never ran). A socket that stops answering is warned about once and then left alone: the line
    keeps running."""

    def __init__(self, address: str | bytes, watchdog_s: float | None = None) -> None:
        self.address = address
        self.watchdog_s = watchdog_s
        self._socket: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._frames = self._flagged = 0
        self._last_ping = self._last_status = -float("inf")
        self._window = (time.monotonic(), 0)  # (start, frames) of the current frame-rate window
        self._stopping_sent = False

    def send(self, message: str) -> None:
        """One notification (``KEY=VALUE`` lines); never blocks the loop (the sinks run on its thread)."""
        if self._socket is None:
            return
        try:
            self._socket.sendto(message.encode(), socket.MSG_DONTWAIT, self.address)
        except OSError as exc:
            if exc.errno in _BUSY:
                log.debug("systemd notification dropped (socket busy): %s", message.splitlines()[0])
                return
            log.warning("systemd notification socket %s: %s; no more notifications this run",
                        self.address.decode(errors="replace") if isinstance(self.address, bytes) else self.address,
                        exc.strerror or exc)
            self._socket.close()
            self._socket = None

    def started(self) -> None:
        self.send("READY=1\nSTATUS=scoring frames")
        self._last_ping = time.monotonic()
        self._window = (self._last_ping, self._frames)  # the frame rate from here, not from before the warm-up

    def stopping(self) -> None:
        self.send(f"STOPPING=1\nSTATUS=stopping after {self._frames} frames, {self._flagged} NG")
        self._stopping_sent = True

    def write(self, result: FrameResult) -> None:
        self._frames += 1
        self._flagged += int(result.is_anomalous)
        now = time.monotonic()
        if self.watchdog_s is not None and now - self._last_ping >= self.watchdog_s / 2:
            self.send("WATCHDOG=1")
            self._last_ping = now
        if now - self._last_status >= STATUS_EVERY_S:
            start, frames = self._window
            fps = (self._frames - frames) / (now - start) if now > start else 0.0
            self.send(f"STATUS={self._frames} frames scored, {self._flagged} NG, {fps:.1f} FPS")
            self._window, self._last_status = (now, self._frames), now

    def close(self) -> None:
        if not self.closed:
            if not self._stopping_sent:  # closed without the loop (an error before it started, library use)
                self.stopping()
            if self._socket is not None:
                self._socket.close()
                self._socket = None
        super().close()
