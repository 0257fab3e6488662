"""``grad-run``: inspect parts on a camera, stream, video or image folder with a model bundle.

Lean: numpy + OpenCV + ONNX Runtime or TensorRT. Never imports torch.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import os
import platform
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import click

from gradad.bundle import check_refine_class, warn_refine_settings
from gradad.cli_utils import (BUNDLE_FOLDER, CLI_CONTEXT, SettingsFileError, check_folder_writable,
                               check_writable, setup_logging, user_errors_as_exit, verbose_option)
from gradad.errors import GradError
from gradad.files import atomic_write_text, is_stream_path
from gradad.process_memory import peak_rss_mb
from gradad.runtime.outage import GIVE_UP_TIMEOUT, MIN_BACKOFF_S
from gradad.urls import REDACTED, redact_url, redact_secrets_in

if TYPE_CHECKING:
    from gradad.bundle import Bundle
    from gradad.runtime.pipeline import StopFlag, Thresholds
    from gradad.runtime.refine_worker import RefineStage
    from gradad.runtime.sinks import SinkBase
    from gradad.runtime.stats import LatencyStats

log = logging.getLogger("gradad.run")
_T = TypeVar("_T")

EPILOG = """\b
Sources:
  --camera 0                         USB/V4L2 camera index (RTX boxes, Jetson USB cameras)
  --source rtsp://10.0.0.5/stream    RTSP/HTTP stream (reconnects with back-off)
  --source line.mp4 | frames/ | 'frames/*.png'   video file, image folder, glob
  --source "nvarguscamerasrc sensor-id=0 ! video/x-raw(memory:NVMM),width=1920,height=1080,framerate=30/1 !
            nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! appsink drop=1"
                                     Jetson CSI camera through GStreamer (OpenCV built with GStreamer)
Several --source options are read as one stream and batched together (multi-camera): cameras and streams
frame by frame as each has one ready (one that is down or slower holds no other back), files in turn.
"""


def parse_mqtt(value: str, default_port: int = 1883) -> tuple[str, int]:
    """``host[:port]`` or ``[IPv6]:port`` -> (host, port); credentials in it are refused (redacted) in favour of the
    proper options. A bare IPv6 address without brackets is taken whole as the host."""
    if "@" in value or "://" in value:
        shown = redact_url(value if "://" in value else f"mqtt://{value}")
        raise GradError(f"--mqtt {shown}: give only host[:port]; pass the user with --mqtt-user and the password "
                        f"in the GRAD_MQTT_PASSWORD environment variable")
    if value.startswith("["):  # IPv6 literal: [::1] or [::1]:1884
        inside, bracket, after = value[1:].partition("]")
        host, port = inside, after[1:] if after.startswith(":") else after
        if not bracket or (after and not after.startswith(":")):
            host = ""
    else:
        host, _, port = value.rpartition(":") if value.count(":") == 1 else (value, "", "")
    if not host or (port and not (port.isdigit() and 0 < int(port) < 65536)):
        raise GradError(f"--mqtt {value!r}: expected host, host:port or [IPv6]:port with a port from 1 to 65535")
    return host, int(port or default_port)


#: False in the test process: there ``os._exit`` would end pytest itself (tests run grad-run in-process with click's
#: CliRunner); subprocess tests of the real command keep it.
HARD_EXIT_PAST_STUCK_CAPTURES = True


def exit_past_stuck_captures(func: Any) -> Any:
    """Exit with the command's code through ``os._exit`` when a camera/stream thread is still blocked in OpenCV.

    Python's normal shutdown would tear that thread down inside C++ and abort the process (``terminate called
    without an active exception``, exit code 134) right after the correct one-line error.
    """
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        code: int | str | None = 1  # an exception other than SystemExit
        try:
            result = func(*args, **kwargs)
            code = 0
            return result
        except SystemExit as exc:
            code = exc.code
            raise
        except KeyboardInterrupt:
            code = 128 + signal.SIGINT
            raise
        finally:
            from gradad.runtime.sources import native_threads_alive

            if HARD_EXIT_PAST_STUCK_CAPTURES and native_threads_alive():
                log.debug("a capture thread is still blocked in OpenCV: exiting without interpreter shutdown")
                logging.shutdown()
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code if isinstance(code, int) else (0 if code is None else 1))

    return wrapper


def _load_line_config(ctx: click.Context, _param: click.Parameter, path: str | None) -> None:
    """--config: the file's settings become the defaults of the other options (flags and env vars still win)."""
    if path is None:
        return
    from gradad.runtime.line_config import file_key, read_line_config

    try:
        defaults, webhook = read_line_config(path)
    except GradError as exc:  # the message names the file already: no "Invalid value for '--config'" before it
        raise SettingsFileError(str(exc)) from None
    by_name = {p.name: p for p in ctx.command.params}
    for name, value in defaults.items():  # ranges (threads >= 0, ...): click would blame a flag nobody gave
        if value is not None and name in by_name and name != "sources":
            try:
                by_name[name].type.convert(value, by_name[name], ctx)
            except click.BadParameter as exc:
                raise SettingsFileError(f"--config {path}: setting {file_key(name)}: {exc.message}") from None
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    ctx.meta["webhook_options"] = webhook
    ctx.meta["line_config"] = path


@click.command(context_settings=CLI_CONTEXT, epilog=EPILOG)
@click.argument("bundle_dir", type=BUNDLE_FOLDER)
@click.option("--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False,
              callback=_load_line_config, help="Line file (YAML): sources, sinks incl. MQTT credentials and webhook "
              "settings, threshold, refinement, statistics; flags given here override it.")
@click.option("--print-config", is_flag=True, help="Write the resolved line file (credentials redacted) and exit.")
@click.option("--camera", type=click.IntRange(min=0), help="Camera index (same as --source N).")
@click.option("--source", "sources", multiple=True, help="Camera index, GStreamer pipeline, RTSP/HTTP URL, video "
              "file, image folder or glob (repeatable).")
@click.option("--backend", default="auto", type=click.Choice(["auto", "tensorrt", "onnxruntime"]))
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default=None,
              help="int8 needs grad-export quantize (ONNX Runtime) or build --int8 (TensorRT) [default: fp16 on "
              "TensorRT, fp32 on ONNX Runtime]")
@click.option("--providers", help="ONNX Runtime providers, comma-separated: tensorrt,cuda,cpu [default: by "
              "availability].")
@click.option("--threads", type=click.IntRange(min=0), default=0, help="ONNX Runtime CPU threads (0 = default).")
@click.option("--batch", "batch_size", type=click.IntRange(min=1), default=1,
              help="Frames per inference call (up to the engine's "
              "profile maximum).")
@click.option("--serial", is_flag=True, help="Run decode, inference and sinks one after another in one thread "
              "(the pre-pipeline loop, for comparisons) instead of three pipelined threads.")
@click.option("--in-flight", type=click.IntRange(min=1), default=2,
              help="Batches in flight on asynchronous backends (TensorRT: "
              "one CUDA stream each).")
@click.option("--ort-spin/--no-ort-spin", default=None, help="Let idle ONNX Runtime threads spin-wait [default: "
              "only with --serial; the pipelined loop's other threads need the cores].")
@click.option("--pace", "pace_fps", type=click.FloatRange(min=0), default=0.0,
              help="Hand file frames to the pipelined loop no "
              "faster than this many per second, as a camera would (benchmarks of end-to-end latency below "
              "saturation; 0 = as fast as possible).")
@click.option("--class", "class_name", help="The class (product) this line inspects, for a bundle of several: its "
              "own calibrated thresholds (grad-calibrate with one --good DIR per class) and its tuned F2PAD settings "
              "[default: the bundle's one threshold for all classes].")
@click.option("--threshold", type=float, help="Image threshold overriding the bundle's calibration: a raw score in "
              "the bundle's units, not a probability (grad-export inspect shows the calibrated one).")
@click.option("--jsonl", "jsonl_path", default="-", help="Per-frame JSON lines file ('-' = stdout, '' = off); "
              "appended to, never truncated.")
@click.option("--video", "video_path", type=click.Path(dir_okay=False), help="Write an annotated video (overlay "
              "+ OK/NG banner).")
@click.option("--video-fps", type=click.FloatRange(min=0, min_open=True), default=10.0)
@click.option("--video-segment", type=click.FloatRange(min=0), default=60.0,
              help="Seconds per video file: OUT.mp4 is written as "
              "OUT.000.mp4, OUT.001.mp4, ..., each closed and playable, so a crash or a full disk loses at most the "
              "file in progress (0 = one file, lost entirely if the process is killed).")
@click.option("--video-max-side", type=click.IntRange(min=0), default=1920,
              help="Longest side of the video's frames in pixels, scaled down from the camera's (0 = full size; a "
              "12 MP frame costs seconds to draw and encode).")
@click.option("--display", is_flag=True, help="Show the annotated stream in a window.")
@click.option("--save-flagged", "flagged_dir", type=click.Path(file_okay=False), help="Folder for NG frames "
              "(original, overlay, map .npy/.png).")
@click.option("--flagged-max-mb", type=click.IntRange(min=1), default=1024,
              help="Disk budget of --save-flagged (oldest evicted).")
@click.option("--mqtt", help="MQTT broker host[:port] for result records (needs paho-mqtt); credentials go in "
              "--mqtt-user and GRAD_MQTT_PASSWORD, never here.")
@click.option("--mqtt-user", envvar="GRAD_MQTT_USER", help="MQTT user name [env: GRAD_MQTT_USER].")
@click.option("--mqtt-password", envvar="GRAD_MQTT_PASSWORD", help="MQTT password; prefer the environment variable "
              "(a command line is visible to every user of the machine) [env: GRAD_MQTT_PASSWORD].")
@click.option("--mqtt-topic", default="gradad/results")
@click.option("--mqtt-tls", is_flag=True, help="Connect to the broker over TLS (default port 8883), verifying its "
              "certificate against the system's CAs or --mqtt-ca; without it user name, password and records cross "
              "the network in clear text.")
@click.option("--mqtt-ca", type=click.Path(dir_okay=False), help="CA certificate file (PEM) that signed the "
              "broker's certificate (implies --mqtt-tls).")
@click.option("--webhook", help="URL receiving NG records as JSON POSTs.")
@click.option("--max-frames", type=click.IntRange(min=0), help="Stop after this many frames scored (records "
              "written; live sources read more, dropping those the loop cannot keep up with) [default: 0 = no "
              "limit].")
@click.option("--loop", is_flag=True, help="Repeat file/folder sources.")
@click.option("--reconnect-give-up", type=click.FloatRange(min=0), default=0.0,
              help="Seconds a lost camera/stream may stay down (since its last frame) before grad-run gives up: "
              "the run stops (every source), writes its summary and exits with code 2 (0 = keep trying for ever).")
@click.option("--reconnect-backoff-max", type=click.FloatRange(min=MIN_BACKOFF_S), default=2.0,
              help="Longest wait in seconds between two reconnect attempts of a lost camera/stream (the wait "
              f"starts at 0.5 s and doubles; at least {MIN_BACKOFF_S:g} s).")
@click.option("--benchmark", "benchmark_frames", type=click.IntRange(min=1),
              help="Run N frames (looping the source, no JSON lines) "
              "and write a latency summary.")
@click.option("--benchmark-out", type=click.Path(dir_okay=False), help="JSON file of the --benchmark summary "
              "(needs --benchmark) [default: stdout].")
@click.option("--warmup", type=click.IntRange(min=0), default=5, help="Frames excluded from --benchmark statistics.")
@click.option("--stats-every", type=click.FloatRange(min=0), default=10.0,
              help="Seconds between latency log lines (0 = off).")
@click.option("--refine", is_flag=True, help="F2PAD pixel refinement of NG frames in a worker process (bundle "
              "prepared with grad-refine prepare; torch in the worker only): a follow-up JSON record per NG frame "
              "(same frame_id, \"type\": \"refine\"), mask saved with --save-flagged.")
@click.option("--refine-budget", type=click.FloatRange(min=0),
              help="Refinement seconds per frame [default: the bundle's refine "
              "config].")
@click.option("--refine-batch", type=click.IntRange(min=1), default=4,
              help="NG frames refined together (waiting ones).")
@click.option("--refine-queue", type=click.IntRange(min=1), default=8,
              help="NG frames waiting for the worker; more are dropped "
              "(the loop never waits).")
@click.option("--refine-drain", type=click.FloatRange(min=0), default=30.0,
              help="Seconds to wait for pending refinements at the "
              "end of the stream.")
@click.option("--refine-device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
@click.option("--refine-threads", type=click.IntRange(min=0), default=1,
              help="Torch CPU threads of the worker (0 = all cores).")
@click.option("--refine-class", help="Class whose tuned F2PAD settings (grad-refine tune) refine the frames of this "
              "line [default: --class, else the only tuned class, else the bundle's settings].")
@verbose_option
@exit_past_stuck_captures
@user_errors_as_exit
def main(**params: Any) -> None:
    """Run BUNDLE_DIR on live or recorded images: one JSON line per frame, OK/NG by the calibrated threshold.

    Capture/decode, inference and sinks run on separate threads with bounded queues (--serial: one after
    another): files never drop a frame and keep their order, live sources keep the newest frames. The backend is
    warmed up before the first frame. Each JSON line has per-stage and end-to-end (capture -> line written)
    latency. Prints rolling p50/p95 latency per stage and FPS every --stats-every seconds and a summary at exit.
    Ctrl-C or SIGTERM stops cleanly: every sink is flushed and closed; the exit code is then 130 or 143.

    With --refine, NG frames are refined to sharp pixel masks in a separate process; the loop never waits for it
    (a full queue drops the frame's refinement, counted in the summary).
    """
    setup_logging(params["verbose"])
    ctx = click.get_current_context()
    webhook_options = ctx.meta.get("webhook_options", {})
    if params["print_config"]:
        import yaml

        from gradad.runtime.line_config import PRINT_CONFIG_HEADER, resolved_config

        click.echo(PRINT_CONFIG_HEADER + yaml.safe_dump(resolved_config(params, webhook_options), sort_keys=False),
                   nl=False)
        return
    _refuse_placeholders(ctx, params)
    import cv2

    if not params["verbose"]:  # OpenCV's own open/probe warnings duplicate our one-line errors
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
        # FFmpeg's own lines ("Connection refused" per reconnect attempt, "huffman table decode error" per corrupt
        # frame) bypass OpenCV's log level; OpenCV reads this when it first opens an FFmpeg capture (AV_LOG_QUIET)
        os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    run(RunSettings.from_params(params, webhook_options))


def _refuse_placeholders(ctx: click.Context, params: dict[str, Any]) -> None:
    """A value that still holds the ``***`` --print-config wrote in place of a secret is one error naming where it
    came from (the line file and key, the flag or the environment variable), not a run against a path ``/***``
    or with the password ``***``."""
    from gradad.runtime.line_config import REDACTED_PARAMS, file_key, holds_placeholder, placeholder_error

    options = {p.name: p for p in ctx.command.params}
    for name in REDACTED_PARAMS:
        if not holds_placeholder(name, params.get(name)):
            continue
        source = ctx.get_parameter_source(name)
        if source == click.core.ParameterSource.DEFAULT_MAP:
            where = f"--config {ctx.meta.get('line_config')}: setting {file_key(name)}"
        elif source == click.core.ParameterSource.ENVIRONMENT:
            where = f"the environment variable {getattr(options[name], 'envvar', None) or name}"
        else:
            where = max(options[name].opts, key=len)
        raise placeholder_error(where, name)


# ---------------------------------------------------------------------------------------------------------------
# typed option groups (one per concern; field names are grad-run's parameter names)


def _pick(cls: type[_T], params: dict[str, Any], **extra: Any) -> _T:
    """``cls`` built from the grad-run parameters named like its fields."""
    return cls(**{f.name: params[f.name] for f in dataclasses.fields(cls) if f.name not in extra}, **extra)


@dataclass(frozen=True)
class BackendOptions:
    """Which engine runs the bundle and how."""

    backend: str = "auto"
    precision: str | None = None
    providers: str | None = None
    threads: int = 0
    in_flight: int = 2
    ort_spin: bool | None = None


@dataclass(frozen=True)
class LoopOptions:
    """How frames are read and batched."""

    batch_size: int = 1
    serial: bool = False
    pace_fps: float = 0.0
    max_frames: int | None = None  # frames scored; 0 = no limit
    loop: bool = False
    stats_every: float = 10.0
    reconnect_give_up: float = 0.0  # seconds a lost live source may stay down before the run ends (0 = never)
    reconnect_backoff_max: float = 2.0  # longest wait between two reconnect attempts


@dataclass(frozen=True)
class SinkOptions:
    """Where records go, and the line file's webhook settings that have no flag."""

    jsonl_path: str = "-"
    video_path: str | None = None
    video_fps: float = 10.0
    video_segment: float = 60.0
    video_max_side: int = 1920
    display: bool = False
    flagged_dir: str | None = None
    flagged_max_mb: int = 1024
    mqtt: str | None = None
    mqtt_user: str | None = None
    mqtt_password: str | None = field(default=None, repr=False)
    mqtt_topic: str = "gradad/results"
    mqtt_tls: bool = False
    mqtt_ca: str | None = None
    webhook: str | None = None
    webhook_options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RefineOptions:
    """``--refine`` and its worker settings."""

    refine: bool = False
    refine_budget: float | None = None
    refine_batch: int = 4
    refine_queue: int = 8
    refine_drain: float = 30.0
    refine_device: str = "auto"
    refine_threads: int = 1
    refine_class: str | None = None  # given: its tuned settings must exist
    line_class: str | None = None  # --class: its tuned settings where they exist, else the bundle's


@dataclass(frozen=True)
class BenchmarkOptions:
    """``--benchmark N --benchmark-out --warmup``: N measured frames after ``warmup`` excluded ones."""

    benchmark_frames: int | None = None
    benchmark_out: str | None = None
    warmup: int = 5

    def __post_init__(self) -> None:
        if self.benchmark_out and self.benchmark_frames is None:  # else it would be ignored without a word
            raise GradError(f"--benchmark-out {self.benchmark_out} needs --benchmark N (the frames to measure)")

    @property
    def enabled(self) -> bool:
        return self.benchmark_frames is not None


@dataclass(frozen=True)
class RunSettings:
    """Everything one ``grad-run`` needs, grouped."""

    bundle_dir: str
    sources: tuple[str, ...]
    threshold: float | None
    class_name: str | None
    backend: BackendOptions
    loop: LoopOptions
    sinks: SinkOptions
    refine: RefineOptions
    benchmark: BenchmarkOptions

    @classmethod
    def from_params(cls, params: dict[str, Any], webhook_options: dict[str, Any] | None = None) -> "RunSettings":
        """Group grad-run's parameters; ``--camera N`` joins the sources; ``--class`` is the refinement's class
        unless ``--refine-class`` names one."""
        camera, class_name = params["camera"], params["class_name"]
        return cls(params["bundle_dir"], tuple(params["sources"]) + ((str(camera),) if camera is not None else ()),
                   params["threshold"], class_name, _pick(BackendOptions, params), _pick(LoopOptions, params),
                   _pick(SinkOptions, params, webhook_options=dict(webhook_options or {})),
                   _pick(RefineOptions, params, line_class=class_name), _pick(BenchmarkOptions, params))


# ---------------------------------------------------------------------------------------------------------------
# builders


def load_engine(settings: RunSettings) -> tuple[Any, "Bundle", "Thresholds"]:
    """(backend, bundle, thresholds), with a warning when the thresholds were calibrated on another backend."""
    from gradad.runtime.loader import calibration_backend_warning, load_backend
    from gradad.runtime.pipeline import thresholds_from_bundle

    opts, serial = settings.backend, settings.loop.serial
    engine, bundle = load_backend(settings.bundle_dir, opts.backend, opts.precision,
                                  opts.providers.split(",") if opts.providers else None, opts.threads,
                                  in_flight=1 if serial else max(1, opts.in_flight),
                                  spin=serial if opts.ort_spin is None else opts.ort_spin)
    thresholds = thresholds_from_bundle(bundle, settings.threshold, settings.class_name)
    calibrated_on = bundle.calibration.backend if bundle.calibration else None
    mismatch = calibration_backend_warning(calibrated_on, engine.name, bundle) if calibrated_on else None
    if settings.threshold is None and mismatch:
        log.warning("%s", mismatch)
    log.info("bundle %s, backend %s, threshold %.4f (%s)", bundle.name, engine.name, thresholds.image,
             thresholds.source)
    return engine, bundle, thresholds


def build_sinks(opts: SinkOptions, benchmark: bool, live: bool = True) -> list["SinkBase"]:
    """The sinks the options ask for (no JSON lines in benchmark mode); the video and the flagged folder write on
    threads of their own, so the JSONL and the network sinks never wait for their encoding. ``live``: a full
    writer queue drops the frame; over files nothing is dropped (the loop waits, as its own queues do)."""
    from gradad.runtime import sinks as kinds  # looked up at call time: tests swap the network sinks

    if benchmark and opts.jsonl_path not in ("", "-"):  # '-' is the default (stdout holds the benchmark JSON)
        log.warning("--jsonl %s: not written with --benchmark, which measures latency and writes no JSON lines "
                    "(run without --benchmark for them)", opts.jsonl_path)
    out: list[SinkBase] = []
    try:
        if opts.jsonl_path and not benchmark:
            out.append(kinds.JsonlSink(opts.jsonl_path))
        if opts.video_path:
            out.append(kinds.VideoSink(opts.video_path, fps=opts.video_fps, segment_s=opts.video_segment,
                                       max_side=opts.video_max_side, queue_size=kinds.FILE_QUEUE_FRAMES,
                                       drop_when_full=live))
        if opts.display:
            out.append(kinds.DisplaySink())
        if opts.flagged_dir:
            out.append(kinds.FlaggedFrameSink(opts.flagged_dir, max_bytes=opts.flagged_max_mb * 2**20,
                                              overlay_max_side=opts.video_max_side,  # as the video: drawn once
                                              queue_size=kinds.FILE_QUEUE_FRAMES, drop_when_full=live))
        if opts.mqtt:
            tls = opts.mqtt_tls or opts.mqtt_ca is not None
            host, port = parse_mqtt(opts.mqtt, 8883 if tls else 1883)
            out.append(kinds.MqttSink(host, port, topic=opts.mqtt_topic, username=opts.mqtt_user,
                                      password=opts.mqtt_password, tls=tls, ca_certs=opts.mqtt_ca))
        if opts.webhook:
            out.append(kinds.WebhookSink(opts.webhook, **opts.webhook_options))
        if (address := kinds.notify_address()) is not None:  # a systemd Type=notify service
            out.append(kinds.ServiceNotifySink(address, kinds.watchdog_period_s()))
            for name in kinds.SERVICE_VARIABLES:  # children (the refinement worker) do not speak for the service
                os.environ.pop(name, None)
    except BaseException:
        for sink in out:  # e.g. the MQTT broker is unreachable: the files opened before it are closed cleanly
            sink.close()
        raise
    return out


def start_refine(bundle_dir: str, bundle: "Bundle", opts: RefineOptions,
                 stopping: "Callable[[], bool] | None" = None) -> "RefineStage":
    """Start the refinement worker (fails fast, one line, when the bundle or the worker cannot refine)."""
    from gradad.runtime import refine_worker
    from gradad.runtime.refine_worker import RefineStage, RefineWorker, RefineWorkerConfig

    if bundle.refine is None or bundle.refine.empty:
        raise GradError(f"bundle {bundle_dir} is not prepared for refinement; run: grad-refine prepare --bundle "
                        f"{bundle_dir} --checkpoint MODEL.pt --data TRAIN_ROOT")
    if opts.refine_drain < 0:
        raise GradError(f"--refine-drain {opts.refine_drain}: must be >= 0 seconds")
    tuned = bundle.refine.classes or {}
    class_name = opts.refine_class
    if class_name is not None:  # asked for by name: refused unless tuned
        check_refine_class(bundle_dir, tuned, class_name, "--refine-class")
        settings = class_name
    else:  # the line's class: its tuned settings where there are some (grad-refine run's rule and words)
        class_name = opts.line_class
        settings = warn_refine_settings(bundle_dir, bundle.classes or [], tuned, class_name, "--class")
    config = RefineWorkerConfig(str(bundle_dir), time_budget_s=opts.refine_budget, max_batch=opts.refine_batch,
                                queue_size=opts.refine_queue, device=opts.refine_device, threads=opts.refine_threads,
                                class_name=class_name,
                                factory=refine_worker.DEFAULT_FACTORY)  # read now: tests set a stand-in
    return RefineStage(RefineWorker(config).start(stopping), opts.refine_drain, settings)


# ---------------------------------------------------------------------------------------------------------------
# the run


def run(settings: RunSettings) -> None:
    """Open everything, run the loop, close everything, print the summary; exit 130/143 after a signal (also
    after a second one, which stops at once: the sinks still close on the way out)."""
    from gradad.runtime.pipeline import StopFlag

    if not settings.sources:
        raise GradError("no input: give --camera N or --source ...")
    _refuse_mixed_sources(settings.sources)
    stop = StopFlag()
    restore = stop.install()
    try:
        _run(settings, stop)
    except KeyboardInterrupt:
        log.warning("stopped at once by a second signal")
        sys.exit(128 + signal.Signals[stop.signalled or "SIGINT"].value)
    finally:
        restore()


def _refuse_mixed_sources(sources: tuple[str, ...]) -> None:
    """Live sources drop frames when the loop falls behind; files must not: one run takes one kind."""
    from gradad.runtime.sources import parse_source

    kinds = [parse_source(s) for s in sources]
    if len({k.live for k in kinds}) > 1:
        live = ", ".join(k.label for k in kinds if k.live)
        files = ", ".join(k.label for k in kinds if not k.live)
        raise GradError(f"--source: live sources ({live}) and files ({files}) cannot share a run (the files would "
                        f"lose frames to the cameras' newest-frame policy): run them as two grad-run processes")


#: The counts a summary block may have, as the closing ``done:`` warning lists them for a block that lost records.
_LOSS_COUNTS = ("published", "sent", "written", "saved", "failed", "skipped", "dropped", "deleted")


def _run(settings: RunSettings, stop: "StopFlag") -> None:
    from gradad.runtime.pipeline import interleave
    from gradad.runtime.sinks import VideoSink
    from gradad.runtime.stats import LatencyStats

    engine, bundle, thresholds = load_engine(settings)
    bench = settings.benchmark
    if bench.benchmark_out:
        check_writable(bench.benchmark_out, "--benchmark-out")
        if not is_stream_path(bench.benchmark_out):  # replaced atomically: a file is made beside it
            check_folder_writable(Path(bench.benchmark_out).parent, "--benchmark-out: folder")
    opened, sinks, refine_stage = [], [], None
    stats, wall = LatencyStats(), 0.0
    try:
        if settings.refine.refine:
            refine_stage = start_refine(settings.bundle_dir, bundle, settings.refine, stopping=stop.__bool__)
        _open_sources(settings, stop, opened)
        if not stop:
            live = any(src.live for src in opened)
            sinks = build_sinks(settings.sinks, bench.enabled, live)
            frames = iter(opened[0]) if len(opened) == 1 else interleave(opened)
            stats, wall = _run_loop(settings, frames, engine, thresholds, sinks, refine_stage, stop, live=live)
    except OSError as exc:  # e.g. disk full while writing JSONL/video: one line, sinks already closed
        raise GradError(f"output failed: {exc}") from exc
    finally:
        if refine_stage is not None:
            refine_stage.worker.close(0.0)  # no-op after a normal run; stops the worker after an early error
        for src in opened:
            src.close()
    summary = stats.summary()
    summary["wall_seconds"] = round(wall, 3)
    summary["source_stats"] = {s.label: s.stats() for s in opened}  # labels hide stream passwords
    summary.update({"video": sink.report() for sink in sinks if isinstance(sink, VideoSink)})
    delivery = {kind: block for sink in sinks for kind, block in sink.delivery_report().items()}
    summary.update(delivery)  # MQTT / webhook / JSONL / flagged counts: losses are in the summary, not only the log
    if refine_stage is not None:
        summary["refine"] = refine_stage.summary()
    done = stats.format_line(rolling=False) if stats.frames else "no frames"  # as the summary
    lost = [f"{kind} {block['target']} lost {block['records_lost']} ("
            + ", ".join(f"{block[k]} {k}" for k in _LOSS_COUNTS if k in block) + ")"
            for kind, block in delivery.items() if block["records_lost"]]
    if lost:  # exit code 0: the run went on (a JSONL it cannot write again is exit 2); `complete` tells
        log.warning("done: %s; records NOT delivered: %s", done, "; ".join(lost))
    else:
        log.info("done: %s", done)
    _report(settings, summary, bundle, engine)
    if stop.signal_name in ("SIGINT", "SIGTERM"):  # stopped cleanly, but not finished: the shell convention
        sys.exit(128 + signal.Signals[stop.signal_name].value)
    _refuse_lost_sources(summary["source_stats"], settings.loop.reconnect_give_up)


def _open_sources(settings: RunSettings, stop: "StopFlag", opened: list[Any]) -> None:
    """Open every source into ``opened`` (the caller closes them). The stop flag reaches each open: a signal while
    a stream is still connecting ends the wait at once (not a source error); a source lost for good stops the run."""
    from gradad.runtime.sources import OpenInterrupted, SourceConfig, open_source

    loop = settings.loop
    config = SourceConfig(loop=loop.loop or settings.benchmark.enabled, reconnect_give_up_s=loop.reconnect_give_up,
                          reconnect_max_s=loop.reconnect_backoff_max)
    for spec in settings.sources:
        if stop:  # a signal during start-up: no source is opened, no frame is read
            return
        try:
            source = open_source(spec, config, stopping=stop.__bool__, on_give_up=lambda: stop.set("a lost source"))
        except OpenInterrupted:
            return  # the signal's own exit code follows
        opened.append(source)
        stop.on_stop.append(source.interrupt)


def _refuse_lost_sources(source_stats: dict[str, dict[str, Any]], give_up_s: float) -> None:
    """Exit code 2, one line, when a live source was given up on, each with why (the summary and the log said the
    rest)."""
    lost = [f"{label} (down {s.get('down_seconds', 0):.0f} s: {_give_up_words(s.get('gave_up_reason'), give_up_s)})"
            for label, s in source_stats.items() if s["gave_up"]]
    if lost:
        raise GradError(f"lost for good, the run stopped: {'; '.join(lost)}")


def _give_up_words(reason: str | None, give_up_s: float) -> str:
    """Why a source was given up on, in the option's words where an option decided it."""
    if reason == GIVE_UP_TIMEOUT:
        return f"no frame for longer than --reconnect-give-up {give_up_s:g} s"
    return reason or "see the log"


def _run_loop(settings: RunSettings, frames: Any, engine: Any, thresholds: "Thresholds", sinks: list["SinkBase"],
              refine_stage: "RefineStage | None", stop: "StopFlag", live: bool) -> tuple["LatencyStats", float]:
    """The benchmark warm-up frames (if any), then the measured run; returns its statistics and wall seconds."""
    from gradad.runtime.pipeline import RunOptions, run_pipeline
    from gradad.runtime.stats import LatencyStats

    loop, bench = settings.loop, settings.benchmark
    total = (bench.benchmark_frames + bench.warmup) if bench.enabled else (loop.max_frames or None)  # 0: no limit
    shared = {"pipelined": not loop.serial, "live": live, "in_flight": settings.backend.in_flight,
              "pace_fps": loop.pace_fps}
    if bench.enabled and bench.warmup:
        run_pipeline(itertools.islice(frames, bench.warmup), engine, thresholds, [],
                     RunOptions(loop.batch_size, stats_every_s=0, **shared), stop, LatencyStats())
        total = bench.benchmark_frames
    stats = LatencyStats()  # after the warm-up: FPS covers the measured frames only
    t0 = time.perf_counter()
    run_pipeline(frames, engine, thresholds, sinks,
                 RunOptions(loop.batch_size, total, loop.stats_every, refine=refine_stage,
                            warmup=not (bench.enabled and bench.warmup), **shared), stop, stats)
    return stats, time.perf_counter() - t0


def _report(settings: RunSettings, summary: dict[str, Any], bundle: "Bundle", engine: Any) -> None:
    """The summary: a JSON line on stderr, or the --benchmark JSON (with the machine) on stdout / --benchmark-out."""
    bench = settings.benchmark
    if not bench.enabled:
        click.echo(json.dumps({"summary": summary}), err=True)
        return
    summary.update({
        "bundle": bundle.name, "backend": engine.name, "batch_size": settings.loop.batch_size,
        "loop": "serial" if settings.loop.serial else "pipelined", "pace_fps": settings.loop.pace_fps,
        "precision": settings.backend.precision, "peak_rss_mb": peak_rss_mb(),
        "load_average_1min": round(os.getloadavg()[0], 2), "input": list(bundle.input.hw),
        "threads": settings.backend.threads, "warmup_frames": bench.warmup, "machine": platform.machine(),
        "processor": platform.processor(), "python": platform.python_version(),
        "onnxruntime": _version("onnxruntime"), "command": redacted_command(sys.argv[1:]),
    })
    text = json.dumps(summary, indent=2)
    if bench.benchmark_out:
        Path(bench.benchmark_out).parent.mkdir(parents=True, exist_ok=True)
        if is_stream_path(bench.benchmark_out):  # /dev/stdout: written through
            Path(bench.benchmark_out).write_text(text + "\n")
        else:  # a link at the name is replaced, never written through
            atomic_write_text(bench.benchmark_out, text + "\n")
        click.echo(f"benchmark summary: {bench.benchmark_out}", err=True)
    else:
        click.echo(text)


def redacted_command(argv: list[str]) -> str:
    """The command line as a benchmark summary records it: no password, URL credentials or webhook path."""
    shown, previous = ["grad-run"], ""
    for arg in argv:
        option, eq, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        if not eq:  # a value given as the next argument belongs to the option before it
            option, value = previous, arg
        if option == "--mqtt-password":
            value = REDACTED
        elif option == "--webhook":
            value = redact_url(value, hide_path=True)
        else:
            value = redact_secrets_in(value)
        shown.append(f"{option}={value}" if eq else value)
        previous = arg
    return " ".join(shown)


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:
        return None


if __name__ == "__main__":
    main()
