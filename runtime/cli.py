"""``grad-run``: inspect parts on a camera, stream, video or image folder with a model bundle.

Lean: numpy + OpenCV + ONNX Runtime or TensorRT. Never imports torch.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import platform
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from gradad.cli_utils import CLI_CONTEXT, check_writable, setup_logging, user_errors_as_exit, verbose_option
from gradad.errors import GradError
from gradad.urls import redact_url

if TYPE_CHECKING:
    from gradad.bundle import Bundle
    from gradad.runtime.refine_worker import RefineStage

log = logging.getLogger("gradad.run")

EPILOG = """\b
Sources:
  --camera 0                         USB/V4L2 camera index (RTX boxes, Jetson USB cameras)
  --source rtsp://10.0.0.5/stream    RTSP/HTTP stream (reconnects with back-off)
  --source line.mp4 | frames/ | 'frames/*.png'   video file, image folder, glob
  --source "nvarguscamerasrc sensor-id=0 ! video/x-raw(memory:NVMM),width=1920,height=1080,framerate=30/1 !
            nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! appsink drop=1"
                                     Jetson CSI camera through GStreamer (OpenCV built with GStreamer)
Several --source options are interleaved and batched together (multi-camera).
"""


def parse_mqtt(value: str) -> tuple[str, int]:
    """``host[:port]`` -> (host, port); credentials in it are refused (redacted) in favour of the proper options."""
    if "@" in value or "://" in value:
        shown = redact_url(value if "://" in value else f"mqtt://{value}")
        raise GradError(f"--mqtt {shown}: give only host[:port]; pass the user with --mqtt-user and the password "
                        f"in the GRAD_MQTT_PASSWORD environment variable")
    host, _, port = value.rpartition(":") if value.count(":") == 1 else (value, "", "")
    if not host or (port and not (port.isdigit() and 0 < int(port) < 65536)):
        raise GradError(f"--mqtt {value!r}: expected host or host:port with a port from 1 to 65535")
    return host, int(port or 1883)


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
    from gradad.runtime.line_config import read_line_config

    try:
        defaults, webhook = read_line_config(path)
    except GradError as exc:
        raise click.BadParameter(str(exc)) from None
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    ctx.meta["webhook_options"] = webhook


@click.command(context_settings=CLI_CONTEXT, epilog=EPILOG)
@click.argument("bundle_dir", type=click.Path(file_okay=False))
@click.option("--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False,
              callback=_load_line_config, help="Line file (YAML): sources, sinks incl. MQTT credentials and webhook "
              "settings, threshold, refinement, statistics; flags given here override it.")
@click.option("--print-config", is_flag=True, help="Write the resolved line file (credentials redacted) and exit.")
@click.option("--camera", type=int, help="Camera index (same as --source N).")
@click.option("--source", "sources", multiple=True, help="Camera index, GStreamer pipeline, RTSP/HTTP URL, video "
              "file, image folder or glob (repeatable).")
@click.option("--backend", default="auto", type=click.Choice(["auto", "tensorrt", "onnxruntime"]))
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default=None,
              help="int8 needs grad-export quantize (ONNX Runtime) or build --int8 (TensorRT) [default: fp16 on "
              "TensorRT, fp32 on ONNX Runtime]")
@click.option("--providers", help="ONNX Runtime providers, comma-separated: tensorrt,cuda,cpu [default: by "
              "availability].")
@click.option("--threads", type=int, default=0, help="ONNX Runtime CPU threads (0 = default).")
@click.option("--batch", "batch_size", type=int, default=1, help="Frames per inference call (up to the engine's "
              "profile maximum).")
@click.option("--serial", is_flag=True, help="Run decode, inference and sinks one after another in one thread "
              "(the pre-pipeline loop, for comparisons) instead of three pipelined threads.")
@click.option("--in-flight", type=int, default=2, help="Batches in flight on asynchronous backends (TensorRT: "
              "one CUDA stream each).")
@click.option("--ort-spin/--no-ort-spin", default=None, help="Let idle ONNX Runtime threads spin-wait [default: "
              "only with --serial; the pipelined loop's other threads need the cores].")
@click.option("--pace", "pace_fps", type=float, default=0.0, help="Hand file frames to the pipelined loop no "
              "faster than this many per second, as a camera would (benchmarks of end-to-end latency below "
              "saturation; 0 = as fast as possible).")
@click.option("--threshold", type=float, help="Image threshold overriding the bundle's calibration.")
@click.option("--jsonl", "jsonl_path", default="-", help="Per-frame JSON lines file ('-' = stdout, '' = off); "
              "appended to, never truncated.")
@click.option("--video", "video_path", type=click.Path(dir_okay=False), help="Write an annotated video (overlay "
              "+ OK/NG banner).")
@click.option("--video-fps", type=float, default=10.0)
@click.option("--video-segment", type=float, default=60.0, help="Seconds per video file: OUT.mp4 is written as "
              "OUT.000.mp4, OUT.001.mp4, ..., each closed and playable, so a crash or a full disk loses at most the "
              "file in progress (0 = one file, lost entirely if the process is killed).")
@click.option("--display", is_flag=True, help="Show the annotated stream in a window.")
@click.option("--save-flagged", "flagged_dir", type=click.Path(file_okay=False), help="Folder for NG frames "
              "(original, overlay, map .npy/.png).")
@click.option("--flagged-max-mb", type=int, default=1024, help="Disk budget of --save-flagged (oldest evicted).")
@click.option("--mqtt", help="MQTT broker host[:port] for result records (needs paho-mqtt); credentials go in "
              "--mqtt-user and GRAD_MQTT_PASSWORD, never here.")
@click.option("--mqtt-user", envvar="GRAD_MQTT_USER", help="MQTT user name [env: GRAD_MQTT_USER].")
@click.option("--mqtt-password", envvar="GRAD_MQTT_PASSWORD", help="MQTT password; prefer the environment variable "
              "(a command line is visible to every user of the machine) [env: GRAD_MQTT_PASSWORD].")
@click.option("--mqtt-topic", default="gradad/results")
@click.option("--webhook", help="URL receiving NG records as JSON POSTs.")
@click.option("--max-frames", type=int, help="Stop after this many frames.")
@click.option("--loop", is_flag=True, help="Repeat file/folder sources.")
@click.option("--benchmark", "benchmark_frames", type=int, help="Run N frames (looping the source, no JSON lines) "
              "and write a latency summary.")
@click.option("--benchmark-out", type=click.Path(dir_okay=False), help="JSON file of the --benchmark summary "
              "[default: stdout].")
@click.option("--warmup", type=int, default=5, help="Frames excluded from --benchmark statistics.")
@click.option("--stats-every", type=float, default=10.0, help="Seconds between latency log lines (0 = off).")
@click.option("--refine", is_flag=True, help="F2PAD pixel refinement of NG frames in a worker process (bundle "
              "prepared with grad-refine prepare; torch in the worker only): a follow-up JSON record per NG frame "
              "(same frame_id, \"type\": \"refine\"), mask saved with --save-flagged.")
@click.option("--refine-budget", type=float, help="Refinement seconds per frame [default: the bundle's refine "
              "config].")
@click.option("--refine-batch", type=int, default=4, help="NG frames refined together (waiting ones).")
@click.option("--refine-queue", type=int, default=8, help="NG frames waiting for the worker; more are dropped "
              "(the loop never waits).")
@click.option("--refine-drain", type=float, default=30.0, help="Seconds to wait for pending refinements at the "
              "end of the stream.")
@click.option("--refine-device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
@click.option("--refine-threads", type=int, default=1, help="Torch CPU threads of the worker (0 = all cores).")
@verbose_option
@exit_past_stuck_captures
@user_errors_as_exit
def main(bundle_dir, camera, sources, backend, precision, providers, threads, batch_size, serial, in_flight,
         ort_spin, pace_fps, threshold, jsonl_path,
         video_path, video_fps, video_segment, display, flagged_dir, flagged_max_mb, mqtt, mqtt_user, mqtt_password,
         mqtt_topic, webhook, max_frames, loop,
         benchmark_frames, benchmark_out, warmup, stats_every, refine, refine_budget, refine_batch, refine_queue,
         refine_drain, refine_device, refine_threads, print_config, verbose) -> None:
    """Run BUNDLE_DIR on live or recorded images: one JSON line per frame, OK/NG by the calibrated threshold.

    Capture/decode, inference and sinks run on separate threads with bounded queues (--serial: one after
    another): files never drop a frame and keep their order, live sources keep the newest frames. The backend is
    warmed up before the first frame. Each JSON line has per-stage and end-to-end (capture -> line written)
    latency. Prints rolling p50/p95 latency per stage and FPS every --stats-every seconds and a summary at exit.
    Ctrl-C or SIGTERM stops cleanly: every sink is flushed and closed; the exit code is then 130 or 143.

    With --refine, NG frames are refined to sharp pixel masks in a separate process; the loop never waits for it
    (a full queue drops the frame's refinement, counted in the summary).
    """
    setup_logging(verbose)
    ctx = click.get_current_context()
    if print_config:
        import yaml

        from gradad.runtime.line_config import resolved_config

        click.echo(yaml.safe_dump(resolved_config(ctx.params, ctx.meta.get("webhook_options", {})),
                                  sort_keys=False), nl=False)
        return
    import cv2

    if not verbose:  # OpenCV's own open/probe warnings duplicate our one-line errors
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    from gradad.runtime.loader import load_backend
    from gradad.runtime.pipeline import RunOptions, StopFlag, interleave, run_pipeline, thresholds_from_bundle
    from gradad.runtime.sinks import (DisplaySink, FlaggedFrameSink, JsonlSink, MqttSink, VideoSink,
                                      WebhookSink)
    from gradad.runtime.sources import SourceConfig, open_source
    from gradad.runtime.stats import LatencyStats

    specs = list(sources) + ([str(camera)] if camera is not None else [])
    if not specs:
        raise GradError("no input: give --camera N or --source ...")
    engine, bundle = load_backend(bundle_dir, backend, precision, providers.split(",") if providers else None,
                                    threads, in_flight=1 if serial else max(1, in_flight),
                                    spin=serial if ort_spin is None else ort_spin)
    thresholds = thresholds_from_bundle(bundle, threshold)
    if benchmark_out:
        check_writable(benchmark_out, "--benchmark-out")
    calibrated_on = bundle.calibration.backend if bundle.calibration else None
    if threshold is None and calibrated_on and calibrated_on != engine.name:
        log.warning("thresholds were calibrated on %s but this run uses %s: scores may shift slightly; "
                    "re-run grad-calibrate with --backend/--precision of the line", calibrated_on, engine.name)
    log.info("bundle %s, backend %s, threshold %.4f (%s)", bundle.name, engine.name, thresholds.image,
             thresholds.source)
    benchmark = benchmark_frames is not None
    source_cfg = SourceConfig(loop=loop or benchmark)
    opened = []
    sinks = []
    refine_stage = None
    stop = StopFlag()
    restore = stop.install()
    try:
        if refine:
            refine_stage = _start_refine(bundle_dir, bundle, refine_budget, refine_batch, refine_queue, refine_drain,
                                         refine_device, refine_threads)
        for spec in specs:
            opened.append(open_source(spec, source_cfg))
            stop.on_stop.append(opened[-1].interrupt)
        if jsonl_path and not benchmark:
            sinks.append(JsonlSink(jsonl_path))
        if video_path:
            sinks.append(VideoSink(video_path, fps=video_fps, segment_s=video_segment))
        if display:
            sinks.append(DisplaySink())
        if flagged_dir:
            sinks.append(FlaggedFrameSink(flagged_dir, max_bytes=flagged_max_mb * 2**20))
        if mqtt:
            host, port = parse_mqtt(mqtt)
            sinks.append(MqttSink(host, port, topic=mqtt_topic, username=mqtt_user, password=mqtt_password))
        if webhook:
            sinks.append(WebhookSink(webhook, **ctx.meta.get("webhook_options", {})))
        frames = iter(opened[0]) if len(opened) == 1 else interleave(opened)
        total = (benchmark_frames + warmup) if benchmark else max_frames
        loop_opts = {"pipelined": not serial, "live": any(src.live for src in opened), "in_flight": in_flight,
                     "pace_fps": pace_fps}
        if benchmark and warmup:
            warm = LatencyStats()
            run_pipeline(itertools.islice(frames, warmup), engine, thresholds, [],
                         RunOptions(batch_size, stats_every_s=0, **loop_opts), stop, warm)
            total = benchmark_frames
        stats = LatencyStats()  # after the warm-up: FPS covers the measured frames only
        t0 = time.perf_counter()
        run_pipeline(frames, engine, thresholds, sinks,
                     RunOptions(batch_size, total, stats_every, refine=refine_stage,
                                warmup=not (benchmark and warmup), **loop_opts), stop, stats)
        wall = time.perf_counter() - t0
    except OSError as exc:  # e.g. disk full while writing JSONL/video: one line, sinks already closed
        raise GradError(f"output failed: {exc}") from exc
    finally:
        if refine_stage is not None:
            refine_stage.worker.close(0.0)  # no-op after a normal run; stops the worker after an early error
        for src in opened:
            src.close()
        restore()
    summary = stats.summary()
    summary["wall_seconds"] = round(wall, 3)
    summary["source_stats"] = {s.label: s.stats() for s in opened}  # labels hide stream passwords
    summary.update({"video": sink.report() for sink in sinks if isinstance(sink, VideoSink)})
    if refine_stage is not None:
        summary["refine"] = refine_stage.summary()
    log.info("done: %s", stats.format_line() if stats.frames else "no frames")
    if benchmark:
        summary.update({
            "bundle": bundle.name, "backend": engine.name, "batch_size": batch_size,
            "loop": "serial" if serial else "pipelined", "pace_fps": pace_fps, "precision": precision,
            "peak_rss_mb": round(_peak_rss_mb(), 1), "load_average_1min": round(os.getloadavg()[0], 2),
            "input": list(bundle.input.hw), "threads": threads,
            "warmup_frames": warmup, "machine": platform.machine(), "processor": platform.processor(),
            "python": platform.python_version(), "onnxruntime": _version("onnxruntime"),
            "command": " ".join(["grad-run", *sys.argv[1:]]),
        })
        text = json.dumps(summary, indent=2)
        if benchmark_out:
            Path(benchmark_out).parent.mkdir(parents=True, exist_ok=True)
            Path(benchmark_out).write_text(text + "\n")
            click.echo(f"benchmark summary: {benchmark_out}", err=True)
        else:
            click.echo(text)
    else:
        click.echo(json.dumps({"summary": summary}), err=True)
    if stop.signal_name in ("SIGINT", "SIGTERM"):  # stopped cleanly, but not finished: the shell convention
        sys.exit(128 + signal.Signals[stop.signal_name].value)


def _start_refine(bundle_dir: str, bundle: "Bundle", budget: float | None, batch: int, queue: int,
                  drain: float, device: str, threads: int) -> "RefineStage":
    """Start the refinement worker (fails fast, one line, when the bundle or the worker cannot refine)."""
    from gradad.runtime import refine_worker
    from gradad.runtime.refine_worker import RefineStage, RefineWorker, RefineWorkerConfig

    if bundle.refine is None or bundle.refine.empty:
        raise GradError(f"bundle {bundle_dir} is not prepared for refinement; run: grad-refine prepare --bundle "
                        f"{bundle_dir} --checkpoint MODEL.pt --data TRAIN_ROOT")
    if drain < 0:
        raise GradError(f"--refine-drain {drain}: must be >= 0 seconds")
    config = RefineWorkerConfig(str(bundle_dir), time_budget_s=budget, max_batch=batch, queue_size=queue,
                                device=device, threads=threads,
                                factory=refine_worker.DEFAULT_FACTORY)  # read now: tests set a stand-in
    return RefineStage(RefineWorker(config).start(), drain)


def _peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux: ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:
        return None


if __name__ == "__main__":
    main()
