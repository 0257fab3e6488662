"""grad-run --config line.yaml: every value has its option's type (one clear error naming the file and the key, not
a traceback or a silent conversion), a settings file with a key twice is refused, and the format reference in
runtime/line_config.py sets no threshold on a 0-1 scale the bundle does not use."""

from __future__ import annotations

import textwrap
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

import gradad.runtime.line_config as line_config
from gradad.errors import ConfigError, GradError
from gradad.runtime.cli import main as run_main

ROOT = Path(__file__).resolve().parents[1]


def _print_config(tmp_path: Path, text: str) -> tuple[click.testing.Result, Path]:
    """grad-run --print-config on a line file holding ``text`` (exits before the bundle is opened)."""
    path = tmp_path / "line.yaml"
    path.write_text(text)
    return CliRunner().invoke(run_main, [str(tmp_path / "bundle"), "--config", str(path), "--print-config"]), path


@pytest.mark.parametrize(("text", "message"), [
    ("loop: 1\n", "setting loop = 1: expected bool"),  # click crashed: 'int' object has no attribute 'strip'
    ("loop: 0\n", "setting loop = 0: expected bool"),
    ("sinks: {display: 1}\n", "setting sinks.display = 1: expected bool"),
    ("refine: {enabled: 1}\n", "setting refine.enabled = 1: expected bool"),
    ("sinks: {mqtt: {host: broker, tls: 1}}\n", "setting sinks.mqtt.tls = 1: expected bool"),
    ("threshold: yes\n", "setting threshold = True: expected a finite number"),  # was 1.0: every frame NG
    ("threshold: high\n", "setting threshold = 'high': expected a finite number"),  # blamed --threshold
    ("max_frames: 2.7\n", "setting max_frames = 2.7: expected int"),  # was 2
    ("threads: 1.9\n", "setting threads = 1.9: expected int"),  # was 1
    ("batch: true\n", "setting batch = True: expected an integer"),  # was 1
    ("statistics: {every_s: false}\n", "setting statistics.every_s = False: expected a finite number"),
    ("backend: gpu\n", "setting backend = 'gpu': must be one of auto, tensorrt, onnxruntime"),
    ("class: [nut]\n", "setting class = ['nut']: expected str"),
])
def test_a_value_of_the_wrong_type_is_one_error_naming_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    result, path = _print_config(tmp_path, text)
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback
    assert f"--config {path}: {message}" in " ".join(result.output.split()), result.output


@pytest.mark.parametrize(("text", "message"), [
    ("threads: -1\n", "setting threads: -1 is not in the range x>=0"),
    ("sinks: {video_fps: 0}\n", "setting sinks.video_fps: 0.0 is not in the range x>0"),
])
def test_a_value_out_of_range_blames_the_file_not_a_flag(tmp_path: Path, text: str, message: str) -> None:
    result, path = _print_config(tmp_path, text)
    assert result.exit_code == 2 and (result.exception is None or isinstance(result.exception, SystemExit))
    flat = " ".join(result.output.split())
    assert f"--config {path}: {message}" in flat and "Invalid value for '--" not in flat, result.output


def test_the_mqtt_password_is_not_shown_when_it_has_the_wrong_type(tmp_path: Path) -> None:
    result, _ = _print_config(tmp_path, "sinks: {mqtt: {host: broker, password: 73104}}\n")
    assert result.exit_code == 2 and "setting sinks.mqtt.password: expected str" in result.output, result.output
    assert "73104" not in result.output


def test_values_of_the_right_type_are_read_as_the_options_take_them(tmp_path: Path) -> None:
    path = tmp_path / "line.yaml"
    path.write_text("threshold: 20\nmax_frames: 3\nloop: false\nbatch: 2\nclass: nut\nprecision:\n"
                    "sinks: {video_fps: 5, display: true}\nrefine: {enabled: true, budget: 1}\n")
    defaults, _ = line_config.read_line_config(path)
    assert defaults == {"threshold": 20.0, "max_frames": 3, "loop": False, "batch_size": 2, "class_name": "nut",
                        "precision": None, "video_fps": 5.0, "display": True, "refine": True, "refine_budget": 1.0}
    assert isinstance(defaults["threshold"], float) and isinstance(defaults["video_fps"], float)


def test_every_file_setting_has_the_type_of_its_option() -> None:
    """TYPES (checked by the file reader) agrees with grad-run's options (which take the value afterwards)."""
    options = {p.name: p for p in run_main.params}
    params = {param for keys in line_config.KEYS.values() for param in keys.values()} - {"sources"}
    assert set(line_config.TYPES) == params
    for param, hint in line_config.TYPES.items():
        option = options[param]
        if isinstance(option, click.Option) and option.is_flag:
            expected = bool
        elif isinstance(option.type, click.Choice):
            expected = line_config.Literal[tuple(option.type.choices)]
        else:
            expected = {click.INT: int, click.FLOAT: float}.get(option.type, option.type)
            expected = int if isinstance(expected, click.IntRange) else expected
            expected = float if isinstance(expected, click.FloatRange) else expected
            expected = str if expected == click.STRING or isinstance(expected, click.Path) else expected
        assert hint == expected, param


@pytest.mark.parametrize(("text", "key", "lines"), [
    ("threshold: 20\nthreshold: 30\n", "'threshold'", "on lines 1 and 2"),  # ran at 30
    ("sinks:\n  mqtt:\n    topic: a\n    host: b\n    topic: c\n", "'topic'", "on lines 3 and 5"),
    ("refine: {budget: 1.0, budget: 2.0}\n", "'budget'", "twice on line 1"),
])
def test_a_key_twice_in_a_line_file_is_refused(tmp_path: Path, text: str, key: str, lines: str) -> None:
    path = tmp_path / "line.yaml"
    path.write_text(text)
    with pytest.raises(GradError) as caught:
        line_config.read_line_config(path)
    assert str(path) in str(caught.value) and f"duplicate key {key} {lines}" in str(caught.value)


def test_a_key_twice_in_a_training_config_is_refused(tmp_path: Path) -> None:
    from training.config import load_config

    path = tmp_path / "run.yaml"
    path.write_text("train:\n  epochs: 3\n  lr: 1.0e-3\n  epochs: 30\n")
    with pytest.raises(ConfigError, match=rf"{path}.*duplicate key 'epochs' on lines 2 and 4"):
        load_config(path)


def test_the_same_key_in_different_mappings_is_fine() -> None:
    from gradad.config_values import load_settings_file

    assert load_settings_file("class: nut\nrefine: {class: nut}\nitems: [{a: 1}, {a: 2}]\n") == {
        "class": "nut", "refine": {"class": "nut"}, "items": [{"a": 1}, {"a": 2}]}


def test_the_repos_own_yaml_files_have_no_key_twice() -> None:
    from gradad.config_values import load_settings_file

    files = [p for pattern in ("*.yaml", "*.yml") for p in ROOT.rglob(pattern)
             if not {".venv", ".git", "node_modules"} & set(p.relative_to(ROOT).parts)]
    for path in files:
        load_settings_file(path.read_text())  # raises yaml.YAMLError naming the key and lines


def test_the_format_reference_sets_no_threshold_and_says_its_units(tmp_path: Path) -> None:
    """The module docstring's example line file is valid and leaves the calibrated threshold alone: thresholds are
    raw scores (the demo's good parts score 14-19), so a 0-1 value would flag every part."""
    from gradad.export.cli import main as export_main

    doc = line_config.__doc__ or ""
    template = textwrap.dedent(doc[doc.index("    sources:"):])
    path = tmp_path / "line.yaml"
    path.write_text(template)
    path.chmod(0o600)
    defaults, _ = line_config.read_line_config(path)
    assert "threshold" not in defaults and defaults["class_name"] == "nut"
    assert "calibration.image_threshold" in template and "grad-export inspect" in template
    assert "inspect" in export_main.commands  # the command the comment cites exists
    assert yaml.safe_load(template)  # plain YAML too


def test_the_readme_line_file_is_valid_and_shows_every_key(tmp_path: Path) -> None:
    """README's line-file example says it shows every key: it loads, and no key of the format is missing from it
    (it had left out 15 when a review compared them)."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("```yaml", readme.index("Every key (an unknown one is refused"))
    block = readme[start + len("```yaml\n"):readme.index("```\n", start + 7)]
    path = tmp_path / "line.yaml"
    path.write_text(block.replace("password: ...", "password: s3cret"))
    path.chmod(0o600)
    defaults, webhook = line_config.read_line_config(path)
    assert "threshold" not in defaults and set(webhook) == set(line_config.WEBHOOK_OPTIONS)
    written = {*defaults, *(f"webhook_{k}" for k in webhook)}
    expected = {*(name for keys in line_config.KEYS.values() for name in keys.values()),
                *(f"webhook_{k}" for k in line_config.WEBHOOK_OPTIONS)} - {"threshold"}
    assert expected - written == set()
    assert "# threshold:" in block  # shown, commented out: a value there overrides the calibration
