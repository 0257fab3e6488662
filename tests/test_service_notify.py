"""grad-run as a systemd Type=notify service: READY once the loop starts scoring (after the warm-up), STATUS and
WATCHDOG while frames are scored, STOPPING at the end; a dead socket never stops the line."""

from __future__ import annotations

import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from gradad.runtime.cli import SinkOptions, build_sinks
from gradad.runtime.pipeline import RunOptions, Thresholds, run_pipeline
from gradad.runtime.sinks import ServiceNotifySink, SinkBase, notify_address, watchdog_period_s
from gradad.runtime.types import Frame, FrameResult


class CountingBackend:
    """Scores each image by its mean grey level (so frames alternate OK/NG); counts its calls."""

    name, max_batch, input_hw, input_dtype = "fake", 4, (16, 16), np.uint8

    def __init__(self) -> None:
        self.calls = 0

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.calls += 1
        scores = images.reshape(len(images), -1).mean(axis=1).astype(np.float32)
        return scores, np.repeat(scores[:, None, None], 16, axis=1).repeat(16, axis=2)

    def close(self) -> None:
        pass


def frames(n: int) -> Iterator[Frame]:
    for i in range(n):
        yield Frame(i, time.time(), "files", np.full((16, 16, 3), 200 if i % 2 else 10, np.uint8), name=f"{i}.png")


@pytest.fixture()
def listener() -> Iterator[tuple[str, socket.socket]]:
    folder = tempfile.mkdtemp(prefix="n", dir="/tmp")  # a Unix socket path must stay under ~100 characters
    path = os.path.join(folder, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    yield path, sock
    sock.close()
    os.unlink(path)
    os.rmdir(folder)


def received(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except socket.timeout:
            return out


class StartRecorder(SinkBase):
    def __init__(self, backend: CountingBackend) -> None:
        self.backend, self.calls_at_start, self.written_at_start, self.written = backend, None, None, 0

    def started(self) -> None:
        self.calls_at_start, self.written_at_start = self.backend.calls, self.written

    def write(self, result: FrameResult) -> None:
        self.written += 1


@pytest.mark.parametrize("pipelined", [True, False])
def test_ready_after_the_warm_up_then_status_watchdog_and_stopping(listener, pipelined: bool) -> None:
    path, sock = listener
    backend = CountingBackend()
    recorder = StartRecorder(backend)
    notify = ServiceNotifySink(path, watchdog_s=1e-6)  # a tiny period: one WATCHDOG=1 per frame
    run_pipeline(frames(6), backend, Thresholds(100.0), [recorder, notify], RunOptions(pipelined=pipelined))
    messages = received(sock)
    assert recorder.calls_at_start >= 1 and recorder.written_at_start == 0  # warmed up, nothing scored yet
    assert messages[0].startswith("READY=1")
    assert messages.count("WATCHDOG=1") == 6
    assert any(m.startswith("STATUS=1 frames scored, 0 NG") for m in messages)  # the first frame is dark: OK
    assert messages[-1] == "STOPPING=1\nSTATUS=stopping after 6 frames, 3 NG"


def test_no_watchdog_pings_unless_the_unit_asks_for_them(listener) -> None:
    path, sock = listener
    run_pipeline(frames(3), CountingBackend(), Thresholds(100.0), [ServiceNotifySink(path)], RunOptions())
    assert "WATCHDOG=1" not in received(sock)


def test_a_notification_socket_that_is_gone_is_warned_about_once_and_the_line_runs_on(tmp_path: Path,
                                                                                       caplog) -> None:
    written = []

    class Collect(SinkBase):
        def write(self, result: FrameResult) -> None:
            written.append(result.frame.frame_id)

    run_pipeline(frames(4), CountingBackend(), Thresholds(100.0),
                 [ServiceNotifySink(str(tmp_path / "gone"), watchdog_s=1e-6), Collect()], RunOptions())
    assert written == [0, 1, 2, 3]
    assert sum("systemd notification socket" in r.getMessage() for r in caplog.records) == 1


def test_the_environment_systemd_sets() -> None:
    assert notify_address({}) is None
    assert notify_address({"NOTIFY_SOCKET": "/run/systemd/notify"}) == "/run/systemd/notify"
    assert notify_address({"NOTIFY_SOCKET": "@/org/freedesktop/systemd1/notify"}) == \
        b"\0/org/freedesktop/systemd1/notify"
    assert watchdog_period_s({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_period_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    assert watchdog_period_s({"WATCHDOG_USEC": "junk"}) is None and watchdog_period_s({}) is None


def test_grad_run_notifies_only_under_systemd(monkeypatch, listener) -> None:
    path, _ = listener
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not any(isinstance(s, ServiceNotifySink) for s in build_sinks(SinkOptions(jsonl_path=""), False))
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    sinks = build_sinks(SinkOptions(jsonl_path=""), False)
    notify = [s for s in sinks if isinstance(s, ServiceNotifySink)]
    assert len(notify) == 1 and notify[0].watchdog_s == 20.0
    assert "NOTIFY_SOCKET" not in os.environ and "WATCHDOG_USEC" not in os.environ  # not for the worker process
    for sink in sinks:
        sink.close()


def test_stopping_goes_out_before_the_sinks_drain_and_close(listener) -> None:
    """The refinement worker's and file writers' drains may outlast a watchdog period: systemd must know the
    service is stopping before them, or it kills the draining process."""
    path, sock = listener
    seen_at_close: list[str] = []

    class SlowToClose(SinkBase):
        def close(self) -> None:
            seen_at_close.extend(received(sock))
            super().close()

    run_pipeline(frames(2), CountingBackend(), Thresholds(100.0), [SlowToClose(), ServiceNotifySink(path)],
                 RunOptions())
    assert seen_at_close and seen_at_close[-1].startswith("STOPPING=1")
    assert received(sock) == []  # nothing after it


def test_a_busy_socket_drops_a_notification_and_never_blocks_the_loop(listener) -> None:
    path, sock = listener
    notify = ServiceNotifySink(path, watchdog_s=1e-6)
    started = time.monotonic()
    for _ in range(5000):  # far more than a datagram socket's queue holds unread
        notify.send("WATCHDOG=1")
    assert time.monotonic() - started < 5.0
    assert received(sock)  # the queued ones arrive...
    notify.send("STATUS=still here")
    assert received(sock) == ["STATUS=still here"]  # ...and the socket was kept for later messages
    notify.close()
