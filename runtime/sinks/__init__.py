"""Where the runtime's results go: JSON lines, an annotated window/video, a flagged-frame folder, MQTT, webhooks.

Every sink derives from :class:`SinkBase` (``write(result)``, ``write_record(dict)`` for follow-up records of an
already written frame, ``write_refined`` for refined masks, ``quit_requested``, ``close()``; all but ``write``
have no-op defaults, so callers never ask a sink what it can do). ``close()`` is idempotent and flushes everything, so the run loop may call it from its ``finally``
after Ctrl-C / SIGTERM and no record is lost. Every sink is also a context manager.

Only numpy, OpenCV and the standard library are imported here; ``paho-mqtt`` (for :class:`MqttSink`) is an
optional dependency imported when that sink is created. Never torch or timm.

Colour convention: :func:`annotate_frame` scales the anomaly map to the fixed range ``[0, 2 * threshold]`` (the
threshold sits in the middle of the JET scale, green-yellow), so colours mean the same in every frame and every
run with the same calibration.

Package layout: :mod:`.base` (the ``SinkBase`` interface with no-op defaults, JSON helpers, ``MultiSink``),
:mod:`.jsonl`, :mod:`.video` (overlay drawing, video file, display window), :mod:`.flagged` (the flagged-frame
folder), :mod:`.network` (webhook, MQTT), :mod:`.service` (systemd's READY/STATUS/WATCHDOG notifications) and
:mod:`.background` (the video and flagged folder's writer thread).
"""

from __future__ import annotations

from gradad.runtime.sinks.background import FILE_QUEUE_FRAMES, BackgroundWriter
from gradad.runtime.sinks.base import (NG_COLOR_BGR, OK_COLOR_BGR, MultiSink, SinkBase, map_display_range,
                                       record_to_json)
from gradad.runtime.sinks.flagged import FlaggedFrameSink
from gradad.runtime.sinks.jsonl import JsonlSink
from gradad.runtime.sinks.network import MqttSink, WebhookSink
from gradad.runtime.sinks.service import SERVICE_VARIABLES, ServiceNotifySink, notify_address, watchdog_period_s
from gradad.runtime.sinks.video import DisplaySink, VideoSink, annotate_frame

__all__ = [
    "SinkBase",
    "BackgroundWriter",
    "FILE_QUEUE_FRAMES",
    "JsonlSink",
    "VideoSink",
    "DisplaySink",
    "FlaggedFrameSink",
    "WebhookSink",
    "MqttSink",
    "ServiceNotifySink",
    "SERVICE_VARIABLES",
    "notify_address",
    "watchdog_period_s",
    "MultiSink",
    "annotate_frame",
    "map_display_range",
    "record_to_json",
    "NG_COLOR_BGR",
    "OK_COLOR_BGR",
]
