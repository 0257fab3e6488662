"""How grad-run stops: a second signal, an error while the camera is idle, mixed sources, and what the records
then say (fresh-eyes review of session 12)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from gradad.runtime.cli import main as run_main
from gradad.runtime.pipeline import RunOptions, StopFlag, Thresholds, run_pipeline
from gradad.runtime.sinks import JsonlSink, SinkBase
from gradad.runtime.sources import SourceConfig, open_source

_DRIVER = '''
import sys, time, types
import numpy as np
import gradad.runtime.cli as cli
from gradad.runtime.pipeline import Thresholds

class SlowBackend:
    name, max_batch, input_hw = "slow", 8, (16, 16)
    def infer(self, images):
        time.sleep(0.5)
        n = len(images)
        return np.full(n, 0.1, np.float32), np.zeros((n, 16, 16), np.float32)
    def close(self):
        pass

bundle = types.SimpleNamespace(name="fake", input=types.SimpleNamespace(hw=(16, 16)))
cli.load_engine = lambda settings: (SlowBackend(), bundle, Thresholds(1.0))
sys.argv[0] = "grad-run"
cli.main()
'''


class _Backend:
    """Scores every frame 0; ``fail_on_call``-th call raises (an engine lost mid-run)."""

    name, max_batch, input_hw = "fake", 8, (16, 16)

    def __init__(self, fail_on_call: int | None = None) -> None:
        self.calls, self.fail_on_call = 0, fail_on_call

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.calls += 1
        if self.fail_on_call is not None and self.calls >= self.fail_on_call:
            raise RuntimeError("engine lost")
        return np.zeros(len(images), np.float32), np.zeros((len(images), 16, 16), np.float32)


class _Sink(SinkBase):
    def __init__(self) -> None:
        self.results: list[Any] = []

    def write(self, result: Any) -> None:
        self.results.append(result)


class _IdleCamera:
    """Two frames, then nothing until released (a triggered camera waiting for the next part)."""

    def __init__(self) -> None:
        self.reads, self.released = 0, threading.Event()

    def isOpened(self) -> bool:  # noqa: N802
        return True

    def read(self) -> tuple[bool, np.ndarray | None]:
        self.reads += 1
        if self.reads > 2:
            self.released.wait(30)
            return False, None
        return True, np.zeros((16, 16, 3), np.uint8)

    def release(self) -> None:
        self.released.set()


def test_an_error_while_the_camera_is_idle_ends_the_run_at_once() -> None:
    camera = _IdleCamera()
    source = open_source(0, SourceConfig(reconnect=False), capture_factory=lambda *a: camera)
    stop = StopFlag()
    stop.on_stop.append(source.interrupt)  # as grad-run registers every source
    t0 = time.perf_counter()
    try:
        with pytest.raises(RuntimeError, match="engine lost"):
            run_pipeline(iter(source), _Backend(fail_on_call=3), Thresholds(1.0), [_Sink()],
                         RunOptions(batch_size=1, live=True, stats_every_s=0), stop)
        assert time.perf_counter() - t0 < 3.0  # was 5 s: the capture stage waited for a frame that never came
    finally:
        source.close()


class _TimedCamera:
    """A frame every 50 ms; remembers when each read began (frame id = read number)."""

    def __init__(self) -> None:
        self.began: list[float] = []

    def isOpened(self) -> bool:  # noqa: N802
        return True

    def read(self) -> tuple[bool, np.ndarray]:
        self.began.append(time.perf_counter())
        time.sleep(0.05)
        return True, np.zeros((8, 8, 3), np.uint8)

    def release(self) -> None:
        pass


def test_live_end_to_end_latency_counts_the_wait_in_the_capture_slot() -> None:
    camera = _TimedCamera()
    with open_source(0, SourceConfig(), capture_factory=lambda *a: camera) as source:
        next(source)
        for _ in range(5):
            time.sleep(0.13)  # a slow consumer: the newest frame waits in the slot up to a frame interval
            frame = next(source)
            now = time.perf_counter()
            since_capture_ms = (now - camera.began[frame.frame_id]) * 1e3
            assert frame.age_ms() + 1.0 >= since_capture_ms  # the read and the wait in the slot are counted


def test_a_failed_jsonl_write_never_cuts_another_writers_lines(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from gradad.errors import GradError

    path = tmp_path / "line.jsonl"
    a, b = JsonlSink(path), JsonlSink(path)  # two processes / sinks appending to one file
    a.write_record({"writer": "A", "i": 0})
    real_write = a._fh.write

    def other_writer_then_full_disk(data: Any) -> int:
        b.write_record({"writer": "B", "i": 0})  # the other writer appends meanwhile
        real_write(bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(a, "_fh", type("F", (), {"write": staticmethod(other_writer_then_full_disk),
                                                  "fileno": a._fh.fileno, "flush": lambda self=None: None,
                                                  "close": a._fh.close})())
    with pytest.raises(GradError, match="another writer had appended"):
        a.write_record({"writer": "A", "i": 1, "pad": "x" * 50})
    b.write_record({"writer": "B", "i": 1})
    a.close()
    b.close()
    lines = path.read_text().splitlines()
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # A's half line, ended so the next record starts on its own line
    assert {"writer": "B", "i": 0} in parsed and {"writer": "B", "i": 1} in parsed
    assert parsed[0] == {"writer": "A", "i": 0}


def test_live_sources_and_files_cannot_share_a_run(tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((8, 8, 3), np.uint8))
    result = CliRunner().invoke(run_main, [str(tmp_path / "bundle"), "--source", "0", "--source", str(tmp_path)])
    assert result.exit_code == 2 and "cannot share a run" in result.stderr, result.output


@pytest.mark.parametrize(("option", "value"), [("--warmup", "-1"), ("--batch", "0"), ("--max-frames", "-1"),
                                               ("--flagged-max-mb", "-1"), ("--benchmark", "0")])
def test_out_of_range_numbers_name_their_option(tmp_path: Path, option: str, value: str) -> None:
    result = CliRunner().invoke(run_main, [str(tmp_path), "--source", str(tmp_path), option, value])
    assert result.exit_code == 2 and f"'{option}'" in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_stops_at_once_with_the_signal_exit_code(tmp_path: Path, sig: signal.Signals) -> None:
    for i in range(4):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((16, 16, 3), 60 * i, np.uint8))
    out, driver = tmp_path / "run.jsonl", tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    proc = subprocess.Popen([sys.executable, str(driver), str(tmp_path / "bundle"), "--source", str(tmp_path),
                             "--loop", "--jsonl", str(out), "--stats-every", "0", "--serial"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 2):
            time.sleep(0.05)
        proc.send_signal(sig)
        time.sleep(0.2)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig.value, err
    assert "Aborted!" not in err
    assert all(json.loads(line) for line in out.read_text().splitlines())  # every line whole


def test_sinks_built_before_one_that_fails_are_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gradad.runtime.sinks as kinds
    from gradad.errors import GradError
    from gradad.runtime.cli import SinkOptions, build_sinks

    closed: list[str] = []
    real_close = JsonlSink.close

    def recording_close(self: JsonlSink) -> None:
        closed.append(str(self.path))
        real_close(self)

    def unreachable(*args: Any, **kwargs: Any) -> None:
        raise GradError("cannot connect to MQTT broker broker.local:1883")

    monkeypatch.setattr(JsonlSink, "close", recording_close)
    monkeypatch.setattr(kinds, "MqttSink", unreachable)
    with pytest.raises(GradError, match="MQTT"):
        build_sinks(SinkOptions(jsonl_path=str(tmp_path / "r.jsonl"), mqtt="broker.local"), benchmark=False)
    assert closed == [str(tmp_path / "r.jsonl")]
