"""The refinement worker process: batching, non-blocking submit, drops, drain timeout, start-up and crash errors.

Stand-in refiners (module-level, picklable, torch-free) replace F2PAD here; ``test_runtime_refine.py`` also runs
the real refiner end to end. The worker process imports this module to find them: keep its imports light.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from gradad.errors import GradError
from gradad.runtime.refine_result import STATUS_CONVERGED, RefineResult
from gradad.runtime.refine_worker import (STATUS_DROPPED, STATUS_FAILED, STATUS_UNFINISHED, RefineCounts,
                                          RefineOutcome, RefineWorker, RefineWorkerConfig, RefineWorkerError)

HW = (16, 16)


class StandInRefiner:
    """Thresholds the map at its mean; sleeps ``delay_s`` per refine() call; iterations = the batch's size."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s

    def refine(self, images: list[np.ndarray], coarse_maps: list[np.ndarray],
               class_names: list[str | None] | None = None) -> list[RefineResult]:
        time.sleep(self.delay_s)
        if any(int(img.max()) == 0 for img in images):
            raise ValueError("black frame in this batch")
        out = []
        for img, amap in zip(images, coarse_maps):
            mask = amap > amap.mean()
            out.append(RefineResult(mask, mask.copy(), np.ones_like(mask), np.array(img), len(images),
                                    self.delay_s, STATUS_CONVERGED, 1.0))
        return out


def standin_factory(cfg: RefineWorkerConfig) -> StandInRefiner:
    """Stand-in refiner; ``--refine-budget`` is its delay per refine() call (default 0)."""
    return StandInRefiner(cfg.time_budget_s or 0.0)


def failing_factory(cfg: RefineWorkerConfig) -> StandInRefiner:
    """A refiner that cannot be built, like an unprepared bundle."""
    raise GradError(f"bundle {cfg.bundle_dir} is not prepared for refinement (stand-in)")


def slow_start_factory(cfg: RefineWorkerConfig) -> StandInRefiner:
    """A refiner that takes 30 s to load (a large model on a slow disk)."""
    time.sleep(30.0)
    return StandInRefiner()


class _DyingRefiner:
    def refine(self, images: list[np.ndarray], coarse_maps: list[np.ndarray],
               class_names: list[str | None] | None = None) -> list[RefineResult]:
        os._exit(3)  # a hard crash: no exception, no message


def dying_factory(cfg: RefineWorkerConfig) -> _DyingRefiner:
    """A refiner whose process dies on the first job."""
    return _DyingRefiner()


class ClassEchoRefiner(StandInRefiner):
    """Reports the class names it was asked to refine with as each result's objective (1 = "nut", 0 = none)."""

    def refine(self, images: list[np.ndarray], coarse_maps: list[np.ndarray],
               class_names: list[str | None] | None = None) -> list[RefineResult]:
        out = super().refine(images, coarse_maps)
        for result, name in zip(out, class_names or [None] * len(out)):
            result.objective = {"nut": 1.0, None: 0.0}[name]
        return out


def class_echo_factory(cfg: RefineWorkerConfig) -> ClassEchoRefiner:
    return ClassEchoRefiner()


def _job(i: int, value: int = 100) -> tuple[np.ndarray, np.ndarray]:
    image = np.full((*HW, 3), value, np.uint8)
    amap = np.zeros(HW, np.float32)
    amap[: 4 + i % 8, :6] = 1.0
    return image, amap


def _worker(factory, **kw) -> RefineWorker:
    return RefineWorker(RefineWorkerConfig("unused-bundle", factory=factory, start_timeout_s=60, **kw)).start()


def _poll_until(worker: RefineWorker, n: int, timeout_s: float = 20.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout_s
    while len(got) < n and time.monotonic() < deadline:
        got.extend(worker.poll())
        time.sleep(0.02)
    return got


def test_refines_in_batches_and_poll_never_waits() -> None:
    worker = _worker(standin_factory, time_budget_s=0.3, max_batch=4, queue_size=8)
    try:
        for i in range(6):
            assert worker.submit(i, *_job(i), meta={"name": f"f{i}"})
        t0 = time.perf_counter()
        assert worker.poll() == []  # the first batch is still sleeping
        assert time.perf_counter() - t0 < 0.05
        outcomes = worker.close(drain_timeout_s=20)
    finally:
        worker.close(0)
    assert sorted(o.frame_id for o in outcomes) == list(range(6))
    assert all(o.status == STATUS_CONVERGED and o.meta == {"name": f"f{o.frame_id}"} for o in outcomes)
    assert all(np.array_equal(o.result.mask, _job(o.frame_id)[1] > _job(o.frame_id)[1].mean()) for o in outcomes)
    batch_sizes = [o.result.iterations for o in outcomes]
    assert max(batch_sizes) <= 4 and max(batch_sizes) > 1  # waiting jobs were refined together
    counts = worker.counts.summary()
    assert counts["submitted"] == counts["done"] == 6 and counts["dropped"] == counts["unfinished"] == 0
    assert counts["mean_seconds"] == pytest.approx(0.3) and counts["mean_latency_s"] > 0
    assert not worker.alive


def test_full_queue_drops_and_never_blocks() -> None:
    worker = _worker(standin_factory, time_budget_s=2.0, max_batch=1, queue_size=2)
    try:
        t0 = time.perf_counter()
        queued = [worker.submit(i, *_job(i)) for i in range(10)]
        assert time.perf_counter() - t0 < 0.5
        assert sum(queued) <= 4 and not all(queued)  # 2 waiting, at most 1 in the refiner (+1 being taken)
        dropped = worker.poll()
        assert len(dropped) == 10 - sum(queued)
        assert all(o.status == STATUS_DROPPED and "queue full" in o.reason and o.result is None for o in dropped)
        assert [o.frame_id for o in dropped] == [i for i, q in enumerate(queued) if not q]
    finally:
        rest = worker.close(drain_timeout_s=0)
    assert {o.status for o in rest} == {STATUS_UNFINISHED}
    counts = worker.counts
    assert counts.dropped == len(dropped) and counts.submitted == 10
    assert counts.dropped + counts.unfinished + counts.done == 10


def test_drain_timeout_reports_unfinished_and_stops_the_worker() -> None:
    worker = _worker(standin_factory, time_budget_s=30.0, max_batch=1, queue_size=4)
    for i in range(3):
        assert worker.submit(i, *_job(i))
    t0 = time.perf_counter()
    outcomes = worker.close(drain_timeout_s=0.5)
    assert time.perf_counter() - t0 < 8.0  # waited 0.5 s, then terminated the busy worker
    assert sorted(o.frame_id for o in outcomes) == [0, 1, 2]
    assert all(o.status == STATUS_UNFINISHED and "0.5 s" in o.reason for o in outcomes)
    assert worker.counts.unfinished == 3 and not worker.alive
    assert worker.close(5) == []  # idempotent
    assert not worker.submit(9, *_job(9)) and worker.poll()[0].reason == "refinement worker closed"


def test_a_stop_during_the_drain_shortens_it() -> None:
    worker = _worker(standin_factory, time_budget_s=30.0, max_batch=1, queue_size=4)
    for i in range(2):
        assert worker.submit(i, *_job(i))
    t0 = time.perf_counter()
    signalled_at = t0 + 0.5  # SIGTERM from a supervisor, half a second into a 60-second drain
    outcomes = worker.close(drain_timeout_s=60.0, stopping=lambda: time.perf_counter() > signalled_at,
                            stop_drain_s=0.5)
    assert time.perf_counter() - t0 < 8.0  # 0.5 s + 0.5 s, then the busy worker is terminated
    assert sorted(o.status for o in outcomes) == [STATUS_UNFINISHED] * 2


def test_a_stop_during_start_up_ends_the_wait_for_the_worker() -> None:
    config = RefineWorkerConfig("unused-bundle", factory=slow_start_factory, start_timeout_s=120)
    t0 = time.perf_counter()
    worker = RefineWorker(config).start(stopping=lambda: time.perf_counter() > t0 + 0.5)
    assert time.perf_counter() - t0 < 10.0  # not the 30 s the stand-in takes to load
    assert worker.failure == "stopped during start-up" and not worker.alive
    assert not worker.submit(0, *_job(0)) and worker.close(1.0) == []


def test_refiner_exception_fails_its_batch_only() -> None:
    worker = _worker(standin_factory, max_batch=1)
    try:
        worker.submit(0, *_job(0, value=0))  # the stand-in raises on black frames
        worker.submit(1, *_job(1))
        outcomes = {o.frame_id: o for o in _poll_until(worker, 2)}
    finally:
        worker.close(0)
    assert outcomes[0].status == STATUS_FAILED and "ValueError: black frame" in outcomes[0].reason
    assert outcomes[1].status == STATUS_CONVERGED


def test_start_failure_is_one_clear_error() -> None:
    with pytest.raises(RefineWorkerError, match=r"failed to start: bundle unused-bundle is not prepared"):
        _worker(failing_factory)
    with pytest.raises(RefineWorkerError, match=r"failed to start: .*no_such_module"):
        _worker("no_such_module:factory")


def test_worker_crash_fails_pending_jobs_and_later_ones_are_dropped() -> None:
    worker = _worker(dying_factory)
    try:
        assert worker.submit(0, *_job(0))
        outcomes = _poll_until(worker, 1)
        assert [(o.frame_id, o.status) for o in outcomes] == [(0, STATUS_FAILED)]
        assert "died (exit code 3)" in outcomes[0].reason and "exit code 3" in worker.failure
        assert not worker.submit(1, *_job(1))
        (later,) = worker.poll()
        assert later.status == STATUS_DROPPED and "not running" in later.reason
    finally:
        worker.close(0)


def test_default_factory_reports_an_unprepared_bundle(bundle: Path) -> None:
    pytest.importorskip("torch")
    with pytest.raises(RefineWorkerError, match=r"not prepared for refinement.*grad-refine prepare"):
        RefineWorker(RefineWorkerConfig(str(bundle), device="cpu", start_timeout_s=120)).start()


def test_invalid_settings_name_the_option() -> None:
    with pytest.raises(GradError, match=r"--refine-budget -1.*--refine-queue 0"):
        RefineWorkerConfig("b", queue_size=0, time_budget_s=-1)


def test_worker_process_side_is_named_by_module_and_lives_in_gradad_refine(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from gradad.runtime import refine_worker

    assert refine_worker.WORKER_MODULE == "gradad.refine.worker"
    assert importlib.util.find_spec(refine_worker.WORKER_MODULE) is not None
    monkeypatch.setattr(refine_worker, "WORKER_MODULE", "gradad.refine.no_such_worker")
    with pytest.raises(RefineWorkerError, match=r"cannot load the refinement worker gradad.refine.no_such_worker"):
        _worker(standin_factory)


def test_refine_counts_group_the_outcomes_by_status() -> None:
    counts = RefineCounts(submitted=7)
    mask = np.zeros(HW, bool)
    for seconds in (0.5, 1.5):
        result = RefineResult(mask, mask, mask, np.zeros((*HW, 3), np.uint8), 10, seconds, STATUS_CONVERGED, 0.0)
        counts.add(RefineOutcome(0, {}, result.status, result, latency_s=2.0))
    for status in (STATUS_DROPPED, STATUS_DROPPED, STATUS_FAILED, STATUS_UNFINISHED, STATUS_FAILED):
        counts.add(RefineOutcome(0, {}, status))
    summary = counts.summary()
    assert (summary["done"], summary["dropped"], summary["failed"], summary["unfinished"]) == (2, 2, 2, 1)
    assert summary["statuses"] == {STATUS_CONVERGED: 2, STATUS_DROPPED: 2, STATUS_FAILED: 2, STATUS_UNFINISHED: 1}
    assert summary["mean_seconds"] == 1.0 and summary["mean_iterations"] == 10 and summary["mean_latency_s"] == 2.0


def test_a_kept_coarse_mask_is_counted_apart_and_saves_no_repaired_copy() -> None:
    """A class whose tuning kept its coarse masks returns them with no solver run: counted as done but kept out of
    the solver's means, and the follow-up saves the mask but no "repaired" image (it would be the frame itself)."""
    from gradad.runtime.refine_result import STATUS_COARSE_KEPT
    from gradad.runtime.refine_worker import RefineStage

    mask = np.zeros(HW, bool)
    mask[2:5, 2:5] = True
    solved = RefineResult(mask, mask, mask, np.zeros((*HW, 3), np.uint8), 10, 1.0, STATUS_CONVERGED, 0.0)
    kept = RefineResult(mask, mask, np.zeros_like(mask), np.zeros((*HW, 3), np.uint8), 0, 0.0, STATUS_COARSE_KEPT,
                        float("nan"))
    counts = RefineCounts(submitted=2)
    counts.add(RefineOutcome(0, {}, solved.status, solved, latency_s=2.0))
    counts.add(RefineOutcome(1, {}, kept.status, kept, latency_s=0.5))
    summary = counts.summary()
    assert (summary["done"], summary["coarse_kept"], summary["failed"]) == (2, 1, 0)
    assert summary["mean_seconds"] == 1.0 and summary["mean_iterations"] == 10

    class RecordingSink:
        def __init__(self) -> None:
            self.refined: list[tuple[int, bool]] = []
            self.records: list[dict] = []

        def write_refined(self, frame_id, name, source, mask, repaired=None):
            self.refined.append((frame_id, repaired is not None))
            return {"mask_file": f"{frame_id}_mask.png", "repaired_file": None if repaired is None else "r.png"}

        def write_record(self, record):
            self.records.append(record)

    sink = RecordingSink()
    stage = RefineStage(worker=None)  # _emit only writes to the sink
    stage._emit([RefineOutcome(0, {"name": "a"}, solved.status, solved), RefineOutcome(1, {"name": "b"}, kept.status,
                                                                                         kept)], sink)
    assert sink.refined == [(0, True), (1, False)]
    assert [r["status"] for r in sink.records] == [STATUS_CONVERGED, STATUS_COARSE_KEPT]
    assert sink.records[1]["mask_file"] == "1_mask.png" and sink.records[1]["repaired_file"] is None


@pytest.mark.parametrize("class_name, objective", [("nut", 1.0), (None, 0.0)])
def test_the_line_class_reaches_the_refiner(class_name: str | None, objective: float) -> None:
    """grad-run --refine-class NAME: every frame is refined with that class's tuned settings."""
    with _worker(class_echo_factory, class_name=class_name) as worker:
        assert worker.submit(0, *_job(0))
        (outcome,) = _poll_until(worker, 1)
    assert outcome.result is not None and outcome.result.objective == objective


def test_a_supervisors_sigterm_to_the_group_does_not_fail_pending_jobs() -> None:
    """systemd stops a service by signalling its whole control group: the worker outlives the SIGTERM, the main
    process drains (shortened by the stop) and the pending frames are refined, not failed."""
    import signal

    worker = _worker(standin_factory, time_budget_s=0.3, max_batch=1, queue_size=8)
    for i in range(3):
        assert worker.submit(i, *_job(i))
    os.kill(worker._process.pid, signal.SIGTERM)
    time.sleep(0.2)
    assert worker.alive
    outcomes = worker.close(drain_timeout_s=30.0, stopping=lambda: True, stop_drain_s=5.0)
    assert sorted(o.frame_id for o in outcomes) == [0, 1, 2]
    assert {o.status for o in outcomes} == {STATUS_CONVERGED} and worker.counts.failed == 0
    assert not worker.alive


def test_jobs_cut_off_by_a_stop_say_how_long_the_drain_was() -> None:
    worker = _worker(standin_factory, time_budget_s=30.0, max_batch=1, queue_size=4)
    assert worker.submit(0, *_job(0))
    outcomes = worker.close(drain_timeout_s=30.0, stopping=lambda: True, stop_drain_s=0.3)
    assert outcomes[0].status == STATUS_UNFINISHED and "cut short by a stop signal" in outcomes[0].reason
    assert "30 s" not in outcomes[0].reason


def test_a_one_pixel_frame_reaches_the_worker_with_a_2d_map() -> None:
    """A 1x1 frame's (1, 1) map was squeezed to a scalar before it was sent: its refinement failed."""
    from gradad.runtime.refine_worker import RefineStage
    from gradad.runtime.types import Frame, FrameResult

    class SubmittingWorker:
        def __init__(self) -> None:
            self.jobs: list[tuple] = []

        def poll(self) -> list:
            return []

        def submit(self, frame_id, image, coarse_map, meta) -> bool:
            self.jobs.append((image.shape, coarse_map.shape))
            return True

    worker = SubmittingWorker()
    frame = Frame(0, 0.0, "cam", np.zeros((1, 1, 3), np.uint8))
    result = FrameResult(frame, 9.0, 0.9, True, 5.0, np.ones((1, 1), np.float32))
    RefineStage(worker=worker).step([result], np.zeros((1, 3, 1, 1), np.float32), sink=None)  # type: ignore[arg-type]
    assert worker.jobs and worker.jobs[0][1] == (1, 1) and result.extra["refine"] == "queued"
