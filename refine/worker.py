"""The process side of ``grad-run --refine``: the spawned worker that builds the F2PAD refiner and refines batches.

The camera process (``gradad.runtime.refine_worker``, the client) never imports this module: it spawns a process
that runs :func:`serve` by module name (:data:`gradad.runtime.refine_worker.WORKER_MODULE`), ships it
``(seq, image, anomaly map)`` jobs and reads back messages (protocol in the client module):

* ``("ready", pid)`` once the refiner is built, or ``("error", reason)`` when it cannot be (one line);
* ``("done", seq, RefineResult)`` per refined job, ``("failed", [seq, ...], reason)`` per batch that raised.

The worker takes up to ``max_batch`` waiting jobs per ``refine`` call and lowers its own priority (``os.nice``)
unless told to use CUDA, so the camera loop keeps the CPU cores. The refiner factory is
``RefineWorkerConfig.factory``: a picklable callable or a ``"module:function"`` string resolved here, so stand-in
refiners can test the queueing without torch.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import os
import queue
import signal
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from gradad.errors import GradError
from gradad.runtime.refine_result import RefineResult
from gradad.runtime.refine_worker import JOB_STOP, RefineWorkerConfig

log = logging.getLogger(__name__)


class Refiner(Protocol):
    """What the worker needs of a refiner (``gradad.refine.refiner.Refiner`` or a stand-in)."""

    def refine(self, images: Sequence[np.ndarray], coarse_maps: Sequence[np.ndarray]) -> list[RefineResult]: ...


def lower_priority(increment: int) -> None:
    """os.nice(increment) (POSIX; a no-op elsewhere).

    Called before the refiner is built: on Linux the nice value is per thread; threads created afterwards (torch's
    CPU thread pool) inherit it.
    """
    if increment <= 0 or not hasattr(os, "nice"):
        return
    try:
        value = os.nice(increment)
        tasks = "/proc/self/task"  # Linux: threads started earlier (numpy's BLAS pool) are lowered one by one
        for tid in os.listdir(tasks) if os.path.isdir(tasks) else []:
            os.setpriority(os.PRIO_PROCESS, int(tid), value)
    except OSError as exc:  # pragma: no cover - platform dependent
        log.warning("refinement worker: cannot lower its priority: %s", exc)


def resolve_factory(factory: str | Callable[[RefineWorkerConfig], Refiner]) -> Callable[[RefineWorkerConfig], Refiner]:
    """The factory itself, or the function a ``"module:function"`` string names (imported here, in the worker)."""
    if callable(factory):
        return factory
    module, _, name = str(factory).partition(":")
    if not module or not name:
        raise GradError(f"refiner factory {factory!r} must be 'module:function'")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def describe(exc: BaseException) -> str:
    """One line for an exception: GradError messages as they are, others with their type."""
    if isinstance(exc, GradError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _prepare_process(cfg: RefineWorkerConfig) -> None:
    """Worker-process set-up before the refiner is built: signals, thread count, priority."""
    # Ctrl-C, and a supervisor's SIGTERM (systemd signals the whole control group), reach the main process too: it
    # drains the pending jobs and then stops us; dying on the signal would fail every pending frame
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if cfg.threads > 0:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = str(cfg.threads)
    if cfg.device != "cuda":  # cpu, or auto (which may pick the CPU): the camera loop keeps the cores
        lower_priority(cfg.nice)


def next_batch(jobs: Any, max_batch: int, stop: Any) -> list[tuple] | None:
    """Up to ``max_batch`` waiting jobs ([] when none arrived for a moment); None on the stop sentinel."""
    try:
        first = jobs.get(timeout=0.1)
    except queue.Empty:
        return None if stop.is_set() else []
    if first is JOB_STOP:
        return None
    batch = [first]
    while len(batch) < max_batch:
        try:
            job = jobs.get_nowait()
        except queue.Empty:
            break
        if job is JOB_STOP:
            stop.set()
            break
        batch.append(job)
    return batch


def refine_batch(refiner: Refiner, batch: list[tuple], results: Any, class_name: str | None = None) -> None:
    """Refine one batch (every frame with ``class_name``'s tuned settings); when the batch fails, its frames are
    refined one by one, so one bad frame fails only itself."""
    seqs = [seq for seq, _, _ in batch]
    try:
        refined = refiner.refine([image for _, image, _ in batch], [amap for _, _, amap in batch],
                                 [class_name] * len(batch))
        if len(refined) != len(batch):
            raise RuntimeError(f"refiner returned {len(refined)} results for {len(batch)} images")
    except Exception as exc:  # noqa: BLE001 - one bad batch must not end the worker
        if len(batch) > 1:
            for job in batch:
                refine_batch(refiner, [job], results, class_name)
            return
        results.put(("failed", seqs, describe(exc)))
        return
    for seq, result in zip(seqs, refined):
        results.put(("done", seq, result))


def serve(cfg: RefineWorkerConfig, jobs: Any, results: Any, stop: Any) -> None:
    """Entry point of the worker process: build the refiner, say ready, refine batches until stopped."""
    try:
        _prepare_process(cfg)
        refiner = resolve_factory(cfg.factory)(cfg)
    except BaseException as exc:  # noqa: BLE001 - every start-up failure is reported to the main process
        results.put(("error", describe(exc)))
        return
    results.put(("ready", os.getpid()))
    parent = multiprocessing.parent_process()
    while True:
        batch = next_batch(jobs, cfg.max_batch, stop)
        if batch is None:
            return
        if parent is not None and not parent.is_alive():  # main process killed (kill -9, OOM): do not linger
            return
        if batch:
            refine_batch(refiner, batch, results, cfg.class_name)
