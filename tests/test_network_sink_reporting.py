"""MQTT and webhook sinks as a 24/7 line sees them: lost records in the run summary (not only in a log line), one
warning per outage and one line when delivery works again, no spurious warning before a refused start, a
--print-config file with its '***' placeholders refused, webhook URL errors that name the real problem, and the
world-readable line file warning for webhook secrets too."""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import gradad.runtime.sinks as sinks_module
import gradad.runtime.sinks.network as network
from cli_helpers import one_error_line
from gradad.errors import GradError
from gradad.runtime.cli import main as run_main
from gradad.runtime.sinks import MqttSink, SinkBase, WebhookSink

SINKS_LOG = "gradad.runtime.sinks"


class _Hook:
    """A loopback HTTP endpoint answering every POST with ``status`` (changeable while it runs)."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.bodies: list[dict] = []
        self.auth: list[str | None] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hook.auth.append(self.headers.get("Authorization"))
                if hook.status == 200:
                    hook.bodies.append(json.loads(body))
                self.send_response(hook.status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def hook():
    server = _Hook()
    yield server
    server.stop()


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == SINKS_LOG and r.levelno == logging.WARNING]


def _infos(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == SINKS_LOG and r.levelno == logging.INFO]


def _wait(predicate, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------------------------
# 1. webhook: counts in the summary, one warning per outage, one line when it delivers again


def test_webhook_outage_is_one_warning_then_one_recovery_line_and_counted(hook: _Hook, caplog) -> None:
    hook.status = 500
    with caplog.at_level(logging.INFO, logger=SINKS_LOG):
        sink = WebhookSink(hook.url, timeout_s=2.0, retry_delay_s=0.0, only_anomalous=False)
        for i in range(20):
            sink.write_record({"frame_id": i})
        _wait(lambda: sink.failed == 20)
        assert len(_warnings(caplog)) == 1  # not one per failed POST
        assert "HTTP Error 500" in _warnings(caplog)[0] and "at most every 60 s" in _warnings(caplog)[0]
        hook.status = 200
        for i in range(20, 25):
            sink.write_record({"frame_id": i})
        sink.close()
    assert sink.sent == 5 and sink.failed == 20 and sink.dropped == 0
    again = [m for m in _infos(caplog) if "delivering again" in m]
    assert len(again) == 1 and "20 records lost meanwhile" in again[0], _infos(caplog)
    assert sink.delivery_report() == {"webhook": {"target": f"http://127.0.0.1:{hook.port}/***", "sent": 5,
                                                  "failed": 20, "dropped": 0, "records_lost": 20,
                                                  "complete": False}}
    assert "20 records NOT delivered" in _warnings(caplog)[-1]


def test_webhook_outage_is_counted_again_at_most_every_period(hook: _Hook, caplog,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(network, "OUTAGE_LOG_EVERY_S", 0.3)
    hook.status = 500
    with caplog.at_level(logging.WARNING, logger=SINKS_LOG):
        sink = WebhookSink(hook.url, retry_delay_s=0.0, only_anomalous=False)
        sink.write_record({"frame_id": 0})
        _wait(lambda: sink.failed == 1)
        time.sleep(0.35)
        for i in range(1, 30):
            sink.write_record({"frame_id": i})
        _wait(lambda: sink.failed == 30)
        sink.close()
    still = [m for m in _warnings(caplog) if "still not delivering" in m]
    assert 1 <= len(still) <= 3 and "records lost so far" in still[0], _warnings(caplog)


def test_a_working_webhook_reports_complete(hook: _Hook, caplog) -> None:
    with caplog.at_level(logging.INFO, logger=SINKS_LOG):
        sink = WebhookSink(hook.url, only_anomalous=False)
        for i in range(3):
            sink.write_record({"frame_id": i})
        sink.close()
    assert sink.delivery_report()["webhook"]["complete"] is True
    assert _warnings(caplog) == [] and not any("delivering again" in m for m in _infos(caplog))


def test_a_post_still_hanging_at_shutdown_counts_as_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    monkeypatch.setattr(WebhookSink, "_post", lambda self, body: release.wait(10))  # outlasts the join
    sink = WebhookSink("http://127.0.0.1:9/ng", timeout_s=0.05, close_timeout_s=0.05, retry_delay_s=0.0,
                       only_anomalous=False)
    sink.write_record({"frame_id": 0})
    time.sleep(0.1)  # the thread has taken the record
    sink.close()
    release.set()
    report = sink.delivery_report()["webhook"]
    assert (report["sent"], report["failed"], report["dropped"], report["complete"]) == (0, 0, 1, False)


def test_base_sinks_report_no_delivery() -> None:
    assert SinkBase().delivery_report() == {}


# ---------------------------------------------------------------------------------------------------------------
# 1 + 3. MQTT: a real broker killed and restarted mid-run; a refused start without a spurious warning


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _broker(tmp_path: Path, port: int, anonymous: bool = True) -> subprocess.Popen:
    """A mosquitto broker on 127.0.0.1:``port``; the test is skipped without paho-mqtt or mosquitto."""
    pytest.importorskip("paho.mqtt.client", reason="paho-mqtt not installed (pip install paho-mqtt)")
    exe = shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
                                             if os.path.exists(p)), None)
    if exe is None:
        pytest.skip("no MQTT broker: install mosquitto to run the MQTT tests")
    conf = tmp_path / f"mosquitto-{port}.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous {str(anonymous).lower()}\npersistence false\n")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 5
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.skip("mosquitto did not start")
            time.sleep(0.05)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _reaped(sink: MqttSink) -> MqttSink:
    """The sink after counting the confirmations paho has received (done on each write otherwise)."""
    with sink._lock:  # noqa: SLF001
        sink._reap()  # noqa: SLF001
    return sink


def test_mqtt_broker_lost_mid_run_is_one_warning_counted_and_delivering_again(tmp_path: Path, caplog) -> None:
    port = _free_port()
    broker = _broker(tmp_path, port)
    try:
        with caplog.at_level(logging.INFO, logger=SINKS_LOG):
            sink = MqttSink("127.0.0.1", port, queue_size=3, close_timeout_s=5.0)
            for i in range(3):
                sink.write_record({"frame_id": i})
            _wait(lambda: _reaped(sink).published == 3)
            _stop(broker)
            time.sleep(0.5)  # paho notices the lost connection
            for i in range(3, 13):  # 3 wait in paho's queue, 7 are dropped
                sink.write_record({"frame_id": i})
                time.sleep(0.02)
            assert sink.dropped == 7  # counted when dropped, not after the messages queued ahead of them
            outage = _warnings(caplog)
            assert len(outage) == 1 and "connection lost" in outage[0], outage  # not one line per drop
            broker = _broker(tmp_path, port)
            _wait(lambda: not _reaped(sink)._pending, 40)  # noqa: SLF001 - reconnected (back-off: seconds), resent
            assert sink.published == 6 and not any("delivering again" in m for m in _infos(caplog))
            sink.write_record({"frame_id": 99})  # the first record queued after the last drop
            _wait(lambda: any("delivering again" in m for m in _infos(_reaped(sink) and caplog)))
            sink.close()
        report = sink.delivery_report()["mqtt"]
        assert report["target"] == f"127.0.0.1:{port}" and report["dropped"] == 7 and report["records_lost"] == 7
        assert report["complete"] is False and report["published"] == 7
        assert [m for m in _infos(caplog) if "delivering again" in m][0].endswith("7 records lost meanwhile")
        assert "7 records NOT delivered" in _warnings(caplog)[-1]
    finally:
        _stop(broker)


def test_mqtt_refused_at_start_is_one_error_without_a_disconnect_warning(tmp_path: Path, caplog) -> None:
    port = _free_port()
    broker = _broker(tmp_path, port, anonymous=False)
    try:
        with caplog.at_level(logging.DEBUG, logger=SINKS_LOG):
            with pytest.raises(GradError, match=r"cannot connect to MQTT broker .*refused: Not authorized"):
                MqttSink("127.0.0.1", port, username="line3", password="wrong", connect_timeout_s=5.0)
            time.sleep(0.3)  # a late callback of paho's thread would land here
        assert _warnings(caplog) == [], _warnings(caplog)
    finally:
        _stop(broker)


# ---------------------------------------------------------------------------------------------------------------
# 1. grad-run: the summary carries the sinks' counts and the last line says records were lost; exit code 0


def _images(tiny_demo_root: Path) -> str:
    return str(tiny_demo_root / "nut" / "test" / "good")


def _summary(result) -> dict:
    return json.loads(result.stderr.strip().splitlines()[-1])["summary"]


def test_grad_run_summary_counts_webhook_losses_and_says_so(bundle: Path, tiny_demo_root: Path, hook: _Hook,
                                                            caplog) -> None:
    hook.status = 500
    with caplog.at_level(logging.INFO):
        result = CliRunner().invoke(run_main, [str(bundle), "--source", _images(tiny_demo_root), "--backend",
                                               "onnxruntime", "--threshold", "1e-9", "--jsonl", "", "--webhook",
                                               hook.url, "--stats-every", "0"])
    assert result.exit_code == 0, result.output  # the README's choice: the JSONL / flagged archive is the record
    summary = _summary(result)
    frames = summary["frames"]
    assert frames > 0 and summary["flagged"] == frames
    assert summary["webhook"] == {"target": f"http://127.0.0.1:{hook.port}/***", "sent": 0, "failed": frames,
                                  "dropped": 0, "records_lost": frames, "complete": False}
    done = [r for r in caplog.records if r.getMessage().startswith("done:")]
    assert len(done) == 1 and done[0].levelno == logging.WARNING
    assert f"records NOT delivered: webhook http://127.0.0.1:{hook.port}/*** lost {frames}" in done[0].getMessage()


def test_grad_run_summary_counts_mqtt_publishes(bundle: Path, tiny_demo_root: Path, tmp_path: Path, caplog) -> None:
    port = _free_port()
    broker = _broker(tmp_path, port)
    try:
        with caplog.at_level(logging.INFO):
            result = CliRunner().invoke(run_main, [str(bundle), "--source", _images(tiny_demo_root), "--backend",
                                                   "onnxruntime", "--threshold", "1e6", "--jsonl", "", "--mqtt",
                                                   f"127.0.0.1:{port}", "--stats-every", "0"])
    finally:
        _stop(broker)
    assert result.exit_code == 0, result.output
    summary = _summary(result)
    assert summary["mqtt"] == {"target": f"127.0.0.1:{port}", "published": summary["frames"], "dropped": 0,
                               "records_lost": 0, "complete": True}  # every frame, OK ones too
    assert [r.levelno for r in caplog.records if r.getMessage().startswith("done:")] == [logging.INFO]


# ---------------------------------------------------------------------------------------------------------------
# 2. --print-config's '***' placeholders: announced in a comment, refused when fed back


def _secret_line_file(tmp_path: Path, images: str, url: str) -> Path:
    path = tmp_path / "line.yaml"
    path.write_text(yaml.safe_dump({
        "sources": [images], "threshold": 1e6, "statistics": {"every_s": 0},
        "sinks": {"jsonl": "", "mqtt": {"host": "broker.local", "username": "line3", "password": "s3cret"},
                  "webhook": {"url": url}}}))
    path.chmod(0o600)
    return path


class _Recorder(SinkBase):
    made: list[tuple[str, tuple, dict]] = []

    def __init__(self, *args, **kwargs) -> None:
        self.made.append((type(self).__name__, args, kwargs))


def test_print_config_output_is_refused_as_a_line_file_until_filled_in(bundle: Path, tiny_demo_root: Path,
                                                                       tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRAD_MQTT_USER", raising=False)
    monkeypatch.delenv("GRAD_MQTT_PASSWORD", raising=False)
    monkeypatch.setattr(sinks_module, "MqttSink", type("_Mqtt", (_Recorder,), {}))
    monkeypatch.setattr(sinks_module, "WebhookSink", type("_Webhook", (_Recorder,), {}))
    line = _secret_line_file(tmp_path, _images(tiny_demo_root), "http://bot:pw@127.0.0.1:9/T0/B0/x?key=k")
    printed = CliRunner().invoke(run_main, [str(bundle), "--config", str(line), "--print-config"])
    assert printed.exit_code == 0, printed.output
    assert printed.stdout.startswith("# ") and "redacted as '***'" in printed.stdout.splitlines()[0]
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(printed.stdout)
    resolved.chmod(0o600)

    result = CliRunner().invoke(run_main, [str(bundle), "--config", str(resolved), "--backend", "onnxruntime"])
    line_err = one_error_line(result)
    assert f"--config {resolved}: setting sinks.mqtt.password holds the redaction placeholder '***' written by " \
           f"--print-config" in line_err and "GRAD_MQTT_PASSWORD" in line_err
    _Recorder.made.clear()

    # the password from the environment: the file's '***' is not used; the webhook URL's is
    monkeypatch.setenv("GRAD_MQTT_PASSWORD", "s3cret")
    line_err = one_error_line(CliRunner().invoke(run_main, [str(bundle), "--config", str(resolved)]))
    assert f"--config {resolved}: setting sinks.webhook.url holds the redaction placeholder '***'" in line_err
    assert _Recorder.made == []  # refused before any sink was built: nothing was posted to '/***'

    # filled in: it runs
    resolved.write_text(printed.stdout.replace("http://bot:***@127.0.0.1:9/***?key=***", "http://127.0.0.1:9/ng"))
    result = CliRunner().invoke(run_main, [str(bundle), "--config", str(resolved), "--backend", "onnxruntime",
                                           "--max-frames", "1"])
    assert result.exit_code == 0, result.output
    assert {name for name, *_ in _Recorder.made} == {"_Mqtt", "_Webhook"}
    assert [kw["password"] for name, _, kw in _Recorder.made if name == "_Mqtt"] == ["s3cret"]


@pytest.mark.parametrize(("args", "where"), [
    (["--webhook", "https://mes.local/***"], "--webhook holds"),
    (["--source", "rtsp://admin:***@10.0.0.5/live"], "--source holds"),
    (["--mqtt", "***@broker.local"], "--mqtt holds"),
])
def test_a_placeholder_in_a_flag_is_refused(bundle: Path, args: list[str], where: str) -> None:
    line = one_error_line(CliRunner().invoke(run_main, [str(bundle), *args]))
    assert where in line and "redaction placeholder '***'" in line


@pytest.mark.parametrize(("param", "value"), [
    ("mqtt_password", "Pa***word"), ("webhook", "https://mes.local/x?q=a***b"), ("webhook", "https://h/api/a***b"),
    ("sources", ["frames/***"]), ("mqtt", "broker.local:1883"),
])
def test_a_real_value_that_merely_contains_stars_is_no_placeholder(param: str, value) -> None:
    from gradad.runtime.line_config import holds_placeholder
    from gradad.urls import redact_url

    assert not holds_placeholder(param, value)
    assert holds_placeholder("webhook", redact_url("https://u:p@h/x?a=1&b#f", hide_path=True))  # what it writes
    assert holds_placeholder("mqtt_password", "***")


def test_a_placeholder_password_in_the_environment_is_refused(bundle: Path, tiny_demo_root: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAD_MQTT_PASSWORD", "***")
    line = one_error_line(CliRunner().invoke(run_main, [str(bundle), "--source", _images(tiny_demo_root),
                                                        "--mqtt", "broker.local", "--mqtt-user", "line3"]))
    assert "the environment variable GRAD_MQTT_PASSWORD holds the redaction placeholder" in line


# ---------------------------------------------------------------------------------------------------------------
# 4 + 5. webhook URL rules: a bad port is named as such; '@' in the password works, as the README says


@pytest.mark.parametrize(("url", "message"), [
    ("http://127.0.0.1:notaport/x", "port 'notaport' is not a number"),
    ("http://127.0.0.1:99999/x", "port '99999' is out of range (1-65535)"),
    ("http://u:pw@127.0.0.1:0/x", "port '0' is out of range (1-65535)"),
])
def test_a_bad_webhook_port_is_named_as_such(url: str, message: str) -> None:
    with pytest.raises(GradError) as err:
        WebhookSink(url)
    assert message in str(err.value) and "credentials" not in str(err.value) and "pw" not in str(err.value)


def test_an_at_sign_in_the_webhook_password_is_sent_as_written(hook: _Hook) -> None:
    sink = WebhookSink(f"http://u:p@ss@127.0.0.1:{hook.port}/hook", only_anomalous=False)
    sink.write_record({"frame_id": 1})
    sink.close()
    assert sink.sent == 1 and hook.auth == ["Basic " + base64.b64encode(b"u:p@ss").decode()]
    with pytest.raises(GradError) as err:  # what is refused: '/', '?', '#' in the credentials, '@' in the path
        WebhookSink("https://line3:Pa55/w0rd@mes.local/ng")
    assert "percent-encode '/', '?' and '#' in the user name and password and '@' in the path" in str(err.value)


# ---------------------------------------------------------------------------------------------------------------
# 7. a world-readable line file holding webhook credentials is warned about, like one holding the MQTT password


@pytest.mark.parametrize(("url", "secret"), [
    ("https://bot:hunter2@mes.local/ng", True), ("https://mes.local/ng?key=abc", True),
    ("https://hooks.slack.com/services/T000/B000/XXXXxxxx3456XXXXXXXXXXXX", True),
    ("https://mes.local/api/ng", False), ("https://mes.local/api/anomaly_detection_results", False),
])
def test_a_world_readable_line_file_with_webhook_credentials_is_warned_about(tmp_path: Path, caplog, url: str,
                                                                             secret: bool) -> None:
    from gradad.runtime.line_config import read_line_config

    path = tmp_path / "line.yaml"
    path.write_text(yaml.safe_dump({"sinks": {"webhook": {"url": url}}}))
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        read_line_config(path)
    warned = f"--config {path} holds webhook credentials (sinks.webhook.url) and other users can read it (mode 644)"
    assert (warned in caplog.text) is secret, caplog.text
    assert "hunter2" not in caplog.text and "XXXXXXXX" not in caplog.text
    caplog.clear()
    path.chmod(0o600)
    with caplog.at_level(logging.WARNING):
        read_line_config(path)
    assert "other users" not in caplog.text
