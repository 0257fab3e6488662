"""``grad-run --config line.yaml``: the settings a deployed line keeps under version control.

The file's sections map onto grad-run's options (click ``default_map``), so the precedence is the usual one:
command-line flag > environment variable (GRAD_MQTT_USER/GRAD_MQTT_PASSWORD) > file > built-in default.
Webhook settings beyond the URL exist only here. ``--print-config`` writes the resolved file, credentials
redacted as ``***`` under a comment saying so; a run refuses a value that still holds that placeholder.

    sources: ["0"]                    # camera index, pipeline, URL, video, folder or glob
    backend: auto                     # auto | tensorrt | onnxruntime
    precision: fp16
    class: nut                        # the class this line inspects: its own thresholds and F2PAD settings
    # threshold: 19.5                 # overrides the bundle's calibration (leave it out to keep that): a raw
                                      # anomaly score in the bundle's units, not 0-1; compare the calibrated
                                      # calibration.image_threshold in `grad-export inspect BUNDLE`
    sinks:
      jsonl: /var/log/gradad/line.jsonl
      flagged: /data/flagged
      flagged_max_mb: 2048
      mqtt: {host: broker.local:8883, topic: line3/results, username: line3, password: ..., tls: true}
      webhook: {url: "https://mes.local/ng", timeout_s: 2.0, queue_size: 1000, only_anomalous: true}
    refine: {enabled: true, budget: 1.0, device: cuda}       # class: the top-level class unless given here
    statistics: {every_s: 10}
    reconnect: {give_up_s: 0, backoff_max_s: 2}   # a lost camera/stream: seconds down before the run stops with
                                                  # exit code 2 (0 = keep trying), longest wait between attempts
"""

from __future__ import annotations

import logging
import os
import re
import urllib.parse
from pathlib import Path
from typing import Any, Literal

import yaml

from gradad.config_values import coerce_setting, load_settings_file, read_settings_text, yaml_error_text
from gradad.errors import ConfigError, GradError
from gradad.runtime.sinks.network import webhook_limit_problem
from gradad.urls import REDACTED, redact_url, redact_secrets_in

log = logging.getLogger(__name__)

#: file key -> grad-run parameter, per section ("" = top level).
KEYS: dict[str, dict[str, str]] = {
    "": {"sources": "sources", "backend": "backend", "precision": "precision", "threads": "threads",
         "batch": "batch_size", "class": "class_name", "threshold": "threshold", "max_frames": "max_frames",
         "loop": "loop"},
    "sinks": {"jsonl": "jsonl_path", "video": "video_path", "video_fps": "video_fps",
              "video_segment": "video_segment", "video_max_side": "video_max_side", "display": "display",
              "flagged": "flagged_dir", "flagged_max_mb": "flagged_max_mb"},
    "sinks.mqtt": {"host": "mqtt", "topic": "mqtt_topic", "username": "mqtt_user", "password": "mqtt_password",
                   "tls": "mqtt_tls", "ca_certs": "mqtt_ca"},
    "sinks.webhook": {"url": "webhook"},
    "refine": {"enabled": "refine", "budget": "refine_budget", "batch": "refine_batch", "queue": "refine_queue",
               "drain": "refine_drain", "device": "refine_device", "threads": "refine_threads",
               "class": "refine_class"},
    "statistics": {"every_s": "stats_every"},
    "reconnect": {"give_up_s": "reconnect_give_up", "backoff_max_s": "reconnect_backoff_max"},
}
#: The type of each parameter's file value, checked here: click would read `threshold: yes` as 1.0 and
#: `max_frames: 2.7` as 2, crash on `loop: 1`, and blame its --flag for a mistake made in the file.
#: Ranges are left to the options (test_line_config_types checks this table against them).
TYPES: dict[str, Any] = {
    "backend": Literal["auto", "tensorrt", "onnxruntime"], "precision": Literal["fp32", "fp16", "int8"],
    "threads": int, "batch_size": int, "class_name": str, "threshold": float, "max_frames": int, "loop": bool,
    "jsonl_path": str, "video_path": str, "video_fps": float, "video_segment": float, "video_max_side": int,
    "display": bool, "flagged_dir": str, "flagged_max_mb": int,
    "mqtt": str, "mqtt_topic": str, "mqtt_user": str, "mqtt_password": str, "mqtt_tls": bool, "mqtt_ca": str,
    "webhook": str,
    "refine": bool, "refine_budget": float, "refine_batch": int, "refine_queue": int, "refine_drain": float,
    "refine_device": Literal["auto", "cpu", "cuda"], "refine_threads": int, "refine_class": str,
    "stats_every": float, "reconnect_give_up": float, "reconnect_backoff_max": float,
}
#: Sections that hold sections.
SUBSECTIONS: dict[str, set[str]] = {"": {"sinks", "refine", "statistics", "reconnect"}, "sinks": {"mqtt", "webhook"}}
#: Webhook settings that have no flag (passed to WebhookSink) and the types they must have.
WEBHOOK_OPTIONS: dict[str, tuple[type, ...]] = {"timeout_s": (int, float), "queue_size": (int,),
                                                "only_anomalous": (bool,)}


def _section(data: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    node: Any = data
    for part in name.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if node is None:
        return {}
    if not isinstance(node, dict):
        raise GradError(f"{where}: '{name}' must be a mapping, got {type(node).__name__}")
    return node


def read_line_config(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(grad-run parameter defaults, extra webhook settings) from a line file; unknown keys are an error."""
    where = f"--config {path}"
    try:
        data = load_settings_file(read_settings_text(path)) or {}
    except OSError as exc:
        raise GradError(f"{where}: cannot read it ({exc})") from None
    except yaml.YAMLError as exc:
        raise GradError(f"{where}: not valid YAML ({yaml_error_text(exc)})") from None
    if not isinstance(data, dict):
        raise GradError(f"{where}: expected a mapping of settings")
    defaults: dict[str, Any] = {}
    webhook: dict[str, Any] = {}
    for section, keys in KEYS.items():
        node = _section(data, section, where) if section else data
        nested = SUBSECTIONS.get(section, set())
        extra = set(WEBHOOK_OPTIONS) if section == "sinks.webhook" else set()
        unknown = {str(k) for k in node} - set(keys) - nested - extra  # YAML reads `on:` as True, `1:` as 1
        if unknown:
            raise GradError(f"{where}: unknown setting(s) {', '.join(sorted(unknown))} in "
                            f"{section or 'the top level'} (known: {', '.join(sorted(set(keys) | nested | extra))})")
        for key, param in keys.items():
            if key in node:
                defaults[param] = (_sources(node[key], where) if param == "sources"
                                   else _typed(f"{section}.{key}" if section else key, param, node[key], where))
        if section == "sinks.webhook":
            webhook = {k: _webhook_option(k, node[k], where) for k in WEBHOOK_OPTIONS if k in node}
    secrets = [what for what, held in (("the MQTT password", defaults.get("mqtt_password") not in (None, REDACTED)),
                                       ("webhook credentials (sinks.webhook.url)", _webhook_secret(defaults)),
                                       ("source credentials", any(redact_secrets_in(str(source)) != str(source)
                                                                  for source in defaults.get("sources") or ())))
               if held]
    if secrets:
        _warn_if_others_can_read(Path(path), " and ".join(secrets))
    return defaults, webhook


def _warn_if_others_can_read(path: Path, what: str) -> None:
    """A line file holding a secret should not be world-readable (group-readable by a service group is a normal
    set-up; Windows has no such bits)."""
    mode = path.stat().st_mode & 0o777
    if os.name != "nt" and mode & 0o004:
        log.warning("--config %s holds %s and other users can read it (mode %03o): chmod 600 %s", path, what, mode,
                    path)


#: A path segment that may be a token (Slack, Teams and Discord webhooks carry theirs in the path): 20 or more
#: URL-safe characters ...
_TOKEN_SEGMENT = re.compile(r"[A-Za-z0-9_-]{20,}")


def _looks_like_token(segment: str) -> bool:
    """... with digits or mixed case in them, as random tokens have (``anomaly_detection_results`` is a name)."""
    return bool(_TOKEN_SEGMENT.fullmatch(segment)) and (any(c.isdigit() for c in segment)
                                                         or (segment.lower() != segment != segment.upper()))


def _webhook_secret(defaults: dict[str, Any]) -> bool:
    """True when the file's webhook URL carries a secret: ``user:password@``, a query or fragment (``?key=``), or
    a token-like path segment."""
    url = defaults.get("webhook")
    if not url:
        return False
    path = urllib.parse.urlsplit(url).path
    return redact_url(url) != url or any(_looks_like_token(part) for part in path.split("/"))


#: grad-run parameters whose values --print-config may write with ``***`` in place of a secret.
REDACTED_PARAMS = ("sources", "mqtt", "mqtt_password", "webhook")

#: The first line of --print-config's output.
PRINT_CONFIG_HEADER = (f"# grad-run resolved line file. Credentials are redacted as '{REDACTED}' (the MQTT password; "
                       f"passwords, tokens and query\n# values in URLs; the webhook URL's path): fill in the real "
                       f"values, or set the password via GRAD_MQTT_PASSWORD,\n# before using it as --config (a run "
                       f"refuses '{REDACTED}').\n")


def holds_placeholder(param: str, value: Any) -> bool:
    """True when grad-run parameter ``param``'s ``value`` holds the ``***`` that --print-config writes in place of
    a secret (a source only where it can be a URL or a property, not a glob)."""
    if value is None or param not in REDACTED_PARAMS:
        return False
    if param == "mqtt_password":
        return value == REDACTED
    if param == "sources":
        return any(_PLACEHOLDER.search(s) and ("://" in s or "=" in s) for s in value)
    return bool(_PLACEHOLDER.search(str(value)))


#: Where --print-config's redaction puts ``***`` (gradad.urls): ``user:***@`` / ``//***@``, a query or property
#: value ``=***`` or a bare query item, a fragment ``#***``, a hidden webhook path ``host/***``; a real value that
#: merely contains ``***`` (a password ``Pa***word``) is not one.
_PLACEHOLDER = re.compile(r"(?:^|[/:])\*\*\*@|=\*\*\*(?=$|[&#\s!\"'/;])|[?&;]\*\*\*(?=$|[&#/;])|#\*\*\*$"
                          r"|/\*\*\*(?=$|[/?#;\s])")


def placeholder_error(where: str, param: str) -> GradError:
    """The one-line refusal of a value that holds --print-config's placeholder; ``where`` names the file and key or
    the flag."""
    fix = ("fill in the real value or set it via the environment (GRAD_MQTT_PASSWORD)" if param == "mqtt_password"
           else "fill in the real value")
    return GradError(f"{where} holds the redaction placeholder '{REDACTED}' written by --print-config: {fix}")


def _sources(value: Any, where: str) -> tuple[str, ...]:
    """``sources``: a list of sources, or one source written without the list brackets."""
    items = [value] if isinstance(value, (str, int)) and not isinstance(value, bool) else value
    if not isinstance(items, list) or any(isinstance(v, bool) or not isinstance(v, (str, int)) for v in items):
        raise GradError(f"{where}: 'sources' must be a source or a list of sources (camera index, pipeline, URL, "
                        f"video, folder or glob), got {redact_secrets_in(repr(value))}")
    return tuple(str(v) for v in items)


def file_key(param: str) -> str:
    """The line file's dotted key of grad-run parameter ``param`` (``sinks.mqtt.tls`` for ``mqtt_tls``)."""
    return next((f"{section}.{key}" if section else key for section, keys in KEYS.items()
                 for key, name in keys.items() if name == param), param)


def _typed(name: str, param: str, value: Any, where: str) -> Any:
    """The file's ``name: value`` as grad-run's ``param`` takes it, by grad-train's ``--set`` rule (no bool for a
    number, no float (even 2.0) for an int, only true/false for a flag); empty (what --print-config writes for an unset
    option) keeps the option's default."""
    if value is None:
        return None
    try:
        return coerce_setting(value, TYPES[param], name)
    except ConfigError as exc:
        if param == "mqtt_password":  # never echo it
            raise ConfigError(f"{where}: setting {name}: expected str (quote it)") from None
        raise ConfigError(f"{where}: {exc}") from None


def _webhook_option(key: str, value: Any, where: str) -> Any:
    """A webhook setting of the right type (a quoted "false" would otherwise read as true)."""
    types = WEBHOOK_OPTIONS[key]
    if isinstance(value, bool) != (bool in types) or not isinstance(value, types):
        wanted = " or ".join("true/false" if t is bool else t.__name__ for t in types)
        raise GradError(f"{where}: sinks.webhook.{key} must be {wanted}, got {value!r}")
    # the sink's own limits, checked here so the error names the file and the key, before the bundle loads
    problem = webhook_limit_problem(key, value)  # None for only_anomalous (a bool)
    if problem:
        raise GradError(f"{where}: sinks.webhook.{key} {problem}, got {value!r}")
    return value


def _redacted_host(host: Any) -> Any:
    """An MQTT host as written, without anything before an ``@`` (grad-run refuses credentials there)."""
    return f"{REDACTED}@{host.rpartition('@')[2]}" if isinstance(host, str) and "@" in host else host


def resolved_config(params: dict[str, Any], webhook: dict[str, Any]) -> dict[str, Any]:
    """The line file that reproduces ``params`` (grad-run's resolved options); the password is never shown, and
    URLs (webhook, stream sources, GStreamer ``location=``) and the MQTT host lose any credentials."""
    out: dict[str, Any] = {}
    for section, keys in KEYS.items():
        values = {key: params.get(param) for key, param in keys.items()}
        if section == "":
            camera = [str(params["camera"])] if params.get("camera") is not None else []
            values["sources"] = [redact_secrets_in(s) for s in camera + list(values["sources"] or [])]
        if section == "sinks.mqtt":
            values["host"] = _redacted_host(values["host"])
            if values.get("password"):
                values["password"] = REDACTED
        if section == "sinks.webhook":
            values["url"] = redact_url(values["url"], hide_path=True) if values["url"] else None
            values.update(webhook)
        node = out
        for part in [p for p in section.split(".") if p]:
            node = node.setdefault(part, {})
        node.update(values)
    return out
