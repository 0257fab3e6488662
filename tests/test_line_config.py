"""grad-run --config line.yaml: the file's settings are used (MQTT credentials, webhook settings), a flag overrides
the file, --print-config writes the resolved file without the password."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

import gradad.runtime.sinks as sinks_module
from gradad.runtime.cli import main as run_main
from gradad.runtime.sinks import SinkBase


class _Recorder(SinkBase):
    """Stands in for MqttSink/WebhookSink: records how grad-run built it and what it wrote."""

    made: list[tuple[str, tuple, dict[str, Any]]] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.made.append((type(self).__name__, args, kwargs))
        self.records: list[dict] = []

    def write(self, result: Any) -> None:
        self.records.append(result.to_record())


class _Mqtt(_Recorder):
    pass


class _Webhook(_Recorder):
    pass


def _line_file(tmp_path: Path, images: Path) -> Path:
    path = tmp_path / "line.yaml"
    path.write_text(yaml.safe_dump({
        "sources": [str(images)],
        "threshold": 1e6,
        "sinks": {"jsonl": "",
                  "mqtt": {"host": "broker.local:1884", "topic": "file/topic", "username": "line3",
                           "password": "s3cret-from-file"},
                  "webhook": {"url": "https://mes.local/ng", "timeout_s": 1.5, "only_anomalous": False}},
        "statistics": {"every_s": 0},
    }))
    return path


def test_config_file_mqtt_credentials_used_and_flag_overrides(bundle: Path, tiny_demo_root: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sinks_module, "MqttSink", _Mqtt)
    monkeypatch.setattr(sinks_module, "WebhookSink", _Webhook)
    monkeypatch.delenv("GRAD_MQTT_USER", raising=False)
    monkeypatch.delenv("GRAD_MQTT_PASSWORD", raising=False)
    _Recorder.made.clear()
    line = _line_file(tmp_path, tiny_demo_root / "nut" / "test" / "good")
    result = CliRunner().invoke(run_main, [str(bundle), "--config", str(line), "--backend", "onnxruntime",
                                           "--mqtt-topic", "flag/topic"])
    assert result.exit_code == 0, result.output
    made = {name: (args, kwargs) for name, args, kwargs in _Recorder.made}
    args, kwargs = made["_Mqtt"]
    assert args == ("broker.local", 1884)
    assert kwargs["username"] == "line3" and kwargs["password"] == "s3cret-from-file"  # from the file
    assert kwargs["topic"] == "flag/topic"  # the flag beats the file
    args, kwargs = made["_Webhook"]
    assert args == ("https://mes.local/ng",) and kwargs == {"timeout_s": 1.5, "only_anomalous": False}
    assert "s3cret" not in result.output


def test_mqtt_tls_from_the_line_file_defaults_to_port_8883(bundle: Path, tiny_demo_root: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sinks_module, "MqttSink", _Mqtt)
    _Recorder.made.clear()
    line = tmp_path / "line.yaml"
    line.write_text(yaml.safe_dump({"sources": [str(tiny_demo_root / "nut" / "test" / "good")], "threshold": 1e6,
                                    "sinks": {"jsonl": "", "mqtt": {"host": "broker.local", "tls": True}},
                                    "statistics": {"every_s": 0}}))
    result = CliRunner().invoke(run_main, [str(bundle), "--config", str(line), "--backend", "onnxruntime",
                                           "--max-frames", "1"])
    assert result.exit_code == 0, result.output
    (_, args, kwargs), = _Recorder.made
    assert args == ("broker.local", 8883) and kwargs["tls"] is True and kwargs["ca_certs"] is None


def test_print_config_resolves_and_redacts(bundle: Path, tmp_path: Path) -> None:
    line = _line_file(tmp_path, tmp_path)
    result = CliRunner().invoke(run_main, [str(bundle), "--config", str(line), "--print-config", "--threshold", "2"])
    assert result.exit_code == 0, result.output
    assert "s3cret" not in result.output
    resolved = yaml.safe_load(result.output)
    assert resolved["threshold"] == 2.0 and resolved["sinks"]["mqtt"]["password"] == "***"
    assert resolved["sinks"]["mqtt"]["username"] == "line3" and resolved["sinks"]["webhook"]["timeout_s"] == 1.5
    again = tmp_path / "again.yaml"  # the printed file is itself a valid line file
    again.write_text(result.output.replace("'***'", "other"))
    assert CliRunner().invoke(run_main, [str(bundle), "--config", str(again), "--print-config"]).exit_code == 0


def test_unknown_setting_is_one_clear_error(bundle: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("sinks:\n  mqtt:\n    pasword: x\n")
    result = CliRunner().invoke(run_main, [str(bundle), "--config", str(bad), "--print-config"])
    assert result.exit_code == 2 and "unknown setting(s) pasword in sinks.mqtt" in result.output
    # one 'error:' line, as the README promises for a bad setting (it was click's usage banner and three more)
    assert result.output.startswith(f"error: --config {bad}: ") and result.output.count("\n") == 1, result.output


def test_print_config_hides_credentials_of_sources_and_mqtt_host(bundle: Path, tmp_path: Path) -> None:
    line = tmp_path / "line.yaml"
    line.write_text(yaml.safe_dump({
        "sources": ["rtsp://admin:CamPass123@10.0.0.5/live?token=TOKEN42",
                    "rtspsrc location=rtsp://u:GstPass99@cam/live ! decodebin ! appsink"],
        "sinks": {"mqtt": {"host": "line3:MqttHostPass@broker.local:1883"}}}))
    result = CliRunner().invoke(run_main, [str(bundle), "--config", str(line), "--camera", "2", "--print-config"])
    assert result.exit_code == 0, result.output
    for secret in ("CamPass123", "TOKEN42", "GstPass99", "MqttHostPass"):
        assert secret not in result.output
    resolved = yaml.safe_load(result.output)
    assert resolved["sources"][0] == "2"  # --camera is a source too
    assert resolved["sources"][1] == "rtsp://admin:***@10.0.0.5/live?token=***"
    assert resolved["sinks"]["mqtt"]["host"] == "***@broker.local:1883"


@pytest.mark.parametrize(("text", "sources"), [("sources: line.mp4\n", ("line.mp4",)), ("sources: 0\n", ("0",)),
                                                ("sources: [0, rtsp://cam/live]\n", ("0", "rtsp://cam/live"))])
def test_a_single_source_need_not_be_a_list(tmp_path: Path, text: str, sources: tuple[str, ...]) -> None:
    from gradad.runtime.line_config import read_line_config

    path = tmp_path / "line.yaml"
    path.write_text(text)
    assert read_line_config(path)[0]["sources"] == sources


def test_a_line_file_with_the_mqtt_password_readable_by_others_is_warned_about(tmp_path: Path, caplog) -> None:
    from gradad.runtime.line_config import read_line_config

    path = tmp_path / "line.yaml"
    path.write_text("sinks:\n  mqtt: {host: broker, username: cell7, password: hunter2}\n")
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        assert read_line_config(path)[0]["mqtt_password"] == "hunter2"
    assert f"--config {path} holds the MQTT password and other users can read it (mode 644)" in caplog.text
    caplog.clear()
    path.chmod(0o640)  # readable by a service group: a normal set-up
    with caplog.at_level(logging.WARNING):
        read_line_config(path)
    assert "hunter2" not in caplog.text and "other users" not in caplog.text


@pytest.mark.parametrize(("text", "message"), [
    ("sources: {cam: 0}\n", "'sources' must be a source or a list"),
    ("on: true\n", "unknown setting(s) True in the top level"),
    ("sinks:\n  webhook: {url: 'http://h/x', timeout_s: 2s}\n", "sinks.webhook.timeout_s must be int or float"),
    ("sinks:\n  webhook: {url: 'http://h/x', queue_size: lots}\n", "sinks.webhook.queue_size must be int"),
    ("sinks:\n  webhook: {url: 'http://h/x', only_anomalous: 'false'}\n",
     "sinks.webhook.only_anomalous must be true/false"),
    ("sinks:\n  webhook: {url: 'http://h/x', timeout_s: 1.0e+300}\n",
     "sinks.webhook.timeout_s must be > 0 and at most 300 seconds"),
    ("sinks:\n  webhook: {url: 'http://h/x', queue_size: 1000000000000}\n",
     "sinks.webhook.queue_size must be from 1 to 200000"),
])
def test_bad_line_file_values_are_one_clear_error(bundle: Path, tmp_path: Path, text: str, message: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    result = CliRunner().invoke(run_main, [str(bundle), "--config", str(bad), "--print-config"])
    assert result.exit_code == 2 and message in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize(("content", "message"), [
    (b"sources: " + b"[" * 2000 + b"]" * 2000 + b"\n", "nested too deeply"),
    (b"threshold: 20\nsources: ['caf\xe9']\n", "not UTF-8 text (a byte that is not UTF-8 on line 2)"),
    (b"# padding\n" * 200_000, "larger than 1024 KB"),
])
def test_a_hostile_settings_file_is_one_clear_error(bundle: Path, tmp_path: Path, content: bytes,
                                                    message: str) -> None:
    """Deep nesting made PyYAML's composer raise RecursionError, and a byte that is not UTF-8 a
    UnicodeDecodeError: tracebacks, in grad-run --config and grad-train --config alike."""
    from gradad.errors import ConfigError
    from gradad.training.config import load_config

    bad = tmp_path / "bad.yaml"
    bad.write_bytes(content)
    result = CliRunner().invoke(run_main, [str(bundle), "--config", str(bad), "--print-config"])
    assert result.exit_code == 2 and message in result.output and str(bad) in result.output, result.output
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        load_config(bad)
    assert str(bad) in str(info.value)


@pytest.mark.parametrize(("value", "parsed"), [("broker", ("broker", 1883)), ("broker:1884", ("broker", 1884)),
                                               ("[::1]:1884", ("::1", 1884)), ("[::1]", ("::1", 1883)),
                                               ("fe80::1", ("fe80::1", 1883))])
def test_mqtt_host_and_port(value: str, parsed: tuple[str, int]) -> None:
    from gradad.runtime.cli import parse_mqtt

    assert parse_mqtt(value) == parsed


@pytest.mark.parametrize("value", ["[::1]x", "[::1", "broker:0", "broker:http"])
def test_mqtt_host_and_port_refused(value: str) -> None:
    from gradad.errors import GradError
    from gradad.runtime.cli import parse_mqtt

    with pytest.raises(GradError, match="--mqtt"):
        parse_mqtt(value)


def test_every_grad_run_option_lands_in_one_typed_group() -> None:
    import dataclasses

    from gradad.runtime.cli import (BackendOptions, BenchmarkOptions, LoopOptions, RefineOptions, RunSettings,
                                    SinkOptions)

    groups = [BackendOptions, LoopOptions, SinkOptions, RefineOptions, BenchmarkOptions]
    fields = [f.name for g in groups for f in dataclasses.fields(g) if f.name not in ("webhook_options", "line_class")]
    assert len(fields) == len(set(fields))  # no option in two groups
    top_level = {"bundle_dir", "camera", "sources", "class_name", "threshold", "config", "print_config", "verbose"}
    assert {p.name for p in run_main.params} == set(fields) | top_level  # and none left out

    ctx = run_main.make_context("grad-run", ["B", "--camera", "2", "--source", "a/", "--mqtt", "h:1", "--refine",
                                             "--refine-batch", "2", "--benchmark", "10", "--serial"])
    settings = RunSettings.from_params(ctx.params, {"timeout_s": 1.0})
    assert settings.sources == ("a/", "2") and settings.loop.serial and settings.benchmark.enabled
    assert settings.sinks.mqtt == "h:1" and settings.sinks.webhook_options == {"timeout_s": 1.0}
    assert settings.refine.refine and settings.refine.refine_batch == 2 and settings.backend.in_flight == 2
