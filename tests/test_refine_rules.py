"""F2PAD rules of issue 15: the paper's lambda rule, a feature scale fixed per bundle, tau calibrated on good images,
masks that grow beyond the start mask, the collapse guard, the tuning check and shift inpainting."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradad.data.datasets import load_samples
from gradad.errors import ConfigError
from gradad.refine.bundle_files import load_refine_parts, prepare_bundle, tuning_images, write_class_settings
from gradad.refine.config import RefineConfig
from gradad.refine.prior import fit_pixel_prior
from gradad.refine.refiner import Refiner, finish_mask, mask_from_norm, pixel_mask
from gradad.refine.regions import (confident_core, dilate, inpaint, interior, shift_fill, start_mask,
                                    trim_spurs)
from gradad.refine.tuning import best_tau, breakeven_lambda0, calibrate_tau
from gradad.training.features import load_images

FIXED = dict(device="cpu", min_iterations=10_000, threads=1, time_budget_s=0.0)  # no wall-clock dependence


class _BrightnessHead(torch.nn.Module):
    """Map post-processing of the stand-in detector: bilinear up-sampling by the feature stride (linear)."""

    def __init__(self, image_hw: tuple[int, int], stride: int) -> None:
        super().__init__()
        self.image_hw = image_hw
        self.stride = stride

    def postprocess(self, lowres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        full = F.interpolate(lowres, scale_factor=self.stride, mode="bilinear", align_corners=False)
        return full.amax(dim=(1, 2, 3)), full


class _BrightnessDetector(torch.nn.Module):
    """A differentiable stand-in for GRAD: the anomaly map is the local mean squared distance of the image from
    mid-grey (0 in normalised units), pooled to stride 4. Defects are bright; the background is grey."""

    def __init__(self, size: int = 64, stride: int = 4) -> None:
        super().__init__()
        self.head = _BrightnessHead((size, size), stride)
        self.model = type("M", (), {"feat_hw": (size // stride, size // stride)})()
        self.stride = stride
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def lowres_map(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x.pow(2).sum(dim=1, keepdim=True), self.stride)


def _grey_prior():
    rng = np.random.default_rng(0)
    return fit_pixel_prior(rng.normal(0.0, 0.05, size=(2000, 3)), components=2, iterations=5)


def _synthetic_refiner(**overrides) -> Refiner:
    config = dataclasses.replace(RefineConfig(), **{**FIXED, **overrides})
    return Refiner(_BrightnessDetector(), [0.5] * 3, [0.5] * 3, pixel_threshold=0.5, prior=_grey_prior(),
                   config=config, normal_level=0.0, feature_scale=0.5)


def _square_defect(size: int = 64, lo: int = 16, hi: int = 40) -> tuple[np.ndarray, np.ndarray]:
    image = np.full((size, size, 3), 128, np.uint8)
    truth = np.zeros((size, size), bool)
    truth[lo:hi, lo:hi] = True
    image[truth] = 230
    return image, truth


def test_lambda_is_lambda0_over_the_anomaly_share_of_the_image():
    refiner = _synthetic_refiner(lambda0=0.02, min_area_fraction=0.001)
    small = np.zeros((64, 64), bool)
    small[:8, :8] = True  # 64 px of 4096
    large = np.zeros((64, 64), bool)
    large[:32, :16] = True  # 512 px
    assert refiner.lambda_for(small) == pytest.approx(0.02 / (64 / 4096))
    assert refiner.lambda_for(large) == pytest.approx(0.02 / (512 / 4096))
    assert refiner.lambda_for(small) / refiner.lambda_for(large) == pytest.approx(8.0)
    tiny = np.zeros((64, 64), bool)
    tiny[0, 0] = True  # 1 px: the share is floored at min_area_fraction
    assert refiner.lambda_for(tiny) == pytest.approx(0.02 / 0.001)
    batch = refiner._prepare([_square_defect()[0]] * 2, [small, large])
    assert batch.lam.tolist() == pytest.approx([refiner.lambda_for(small), refiner.lambda_for(large)])


def test_objective_terms_are_sums_over_the_region_divided_by_the_image_area():
    refiner = _synthetic_refiner()
    image, truth = _square_defect()
    batch = refiner._prepare([image], [truth])
    terms = refiner.objective(batch.x_n, batch.x, batch.region, batch.lam, batch.readout)
    a = batch.x - batch.x_n
    n = torch.sqrt(a.pow(2).sum(1, keepdim=True) + refiner.config.norm_smoothing ** 2)
    eps = refiner.config.log_eps
    zero = np.log(refiner.config.norm_smoothing + np.sqrt(refiner.config.norm_smoothing ** 2 + eps))
    expected = ((torch.log(n + torch.sqrt(n ** 2 + eps)) - zero) * batch.region).sum() / (64 * 64)
    assert terms["sparsity"].item() == pytest.approx(expected.item(), rel=1e-4)
    # the feature term: image mean of the full-resolution map divided by the feature scale
    _, full = refiner.detector.head.postprocess(refiner.detector.lowres_map(batch.x_n))
    assert terms["feature"].item() == pytest.approx((full.mean() / 0.5).item(), rel=1e-4)


def test_feature_scale_is_fixed_per_bundle_not_the_threshold_passed_in(bundle, trained_tiny, tiny_demo_root,
                                                                         tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    train = [s for s in load_samples(tiny_demo_root, "train") if s.label == 0][:6]
    images, _ = load_images(train, 64)
    section = prepare_bundle(copy, trained_tiny, images, RefineConfig(mog_components=2, mog_pixels=5000))
    assert section.feature_scale > 0 and section.feature_scale_rule
    low = Refiner.from_bundle(copy, pixel_threshold=0.5, **FIXED)
    high = Refiner.from_bundle(copy, pixel_threshold=5.0, **FIXED)
    assert low.feature_scale == high.feature_scale == pytest.approx(section.feature_scale)
    x = low._normalise(images[:2])
    for refiner in (low, high):
        region = torch.ones(2, 1, 64, 64)
        refiner.terms = refiner.objective(x, x, region, torch.zeros(2), refiner.readout_weights(2, 64, 64))
    assert torch.allclose(low.terms["feature"], high.terms["feature"])


def test_masks_grow_beyond_the_start_mask():
    """The coarse mask covers the middle of a bright square only; the solver must take the rest of it."""
    image, truth = _square_defect()
    coarse = np.zeros_like(truth)
    coarse[24:32, 24:32] = True  # 64 of the 576 defect pixels
    refiner = _synthetic_refiner(start_dilation_px=0, region_dilation_px=14, inpaint="mean", lambda0=0.002,
                                 max_iterations=150, mask_tau=0.1, collapse_fraction=0.0)
    (result,) = refiner.refine_masks([image], [coarse])
    start = refiner._prepare([image], [coarse])
    start_mask = refiner._masks(start.x, start.x_n, start.region, start.tau, start.relative)[0]
    grown = result.mask & ~dilate(coarse, 0) & truth
    assert start_mask.sum() <= coarse.sum()
    assert grown.sum() > 4 * coarse.sum()  # most of the square is found outside the start mask
    assert (result.mask & truth).sum() / truth.sum() > 0.6
    assert (result.mask & ~truth).sum() < 0.2 * truth.sum()  # and the grey background stays out


def test_tau_calibration_is_a_high_quantile_of_the_repair_noise_of_good_images():
    refiner = _synthetic_refiner(max_iterations=30, mask_tau_quantiles=(0.5, 0.95))
    rng = np.random.default_rng(1)
    goods = [np.clip(128 + rng.normal(0, 6, (64, 64, 3)), 0, 255).astype(np.uint8) for _ in range(3)]
    shape = np.zeros((64, 64), bool)
    shape[10:20, 30:44] = True
    taus, evidence = calibrate_tau(refiner, goods, [shape], refiner.config)
    assert evidence["good_images"] == 3 and set(taus) == {0.5, 0.95} and taus[0.5] < taus[0.95]
    tau = taus[0.95]
    assert 0 < tau < 0.5  # RGB units of [0, 1]: noise of sigma 6 grey levels, not a defect
    # the same measurement, by hand: 95% of the region's pixels are at or below tau after refining those images
    masks = [np.roll(shape, s, axis=(0, 1)) for s in [(0, 0)] * 3]
    norms = np.concatenate([n[r] for n, r in refiner.repair_norms(goods, masks, refiner.config)])
    assert 0.85 < (norms <= tau).mean() < 1.0
    # noisier good surfaces calibrate a higher tau
    noisy = [np.clip(128 + rng.normal(0, 20, (64, 64, 3)), 0, 255).astype(np.uint8) for _ in range(3)]
    assert calibrate_tau(refiner, noisy, [shape], refiner.config)[0][0.95] > tau
    # the tuning defects pick the candidate: a bright square is found at the low-noise tau
    image, truth = _square_defect()
    amap = np.where(dilate(truth, 2), 1.0, 0.0)  # a coarse map above the 0.5 threshold around the square
    no_guard = dataclasses.replace(refiner.config, collapse_fraction=0.0, max_iterations=60, lambda0=0.002,
                                   mask_relative_candidates=(0.0,), keep_interior_candidates=(0,),
                                   mask_trim_candidates=(0,))
    chosen, ious, key, held_out = best_tau(refiner, [image], [truth], [amap], no_guard, {0.95: tau, 0.999: 2.0})
    assert chosen == (tau, 0.0, 0, 0) and key == "0.95/0.0/0/0"
    assert ious["0.95/0.0/0/0"] > 0.5 and ious["0.999/0.0/0/0"] == 0.0
    assert held_out == ious[key]  # one image: nothing to hold out


def test_spur_trim_cuts_thin_bridges_off_a_compact_defect_and_keeps_a_crack_whole():
    yy, xx = np.mgrid[:64, :64]
    spot = (yy - 20) ** 2 + (xx - 20) ** 2 <= 8 ** 2
    bridge = np.zeros((64, 64), bool)
    bridge[20, 28:50] = True  # 1 px wide, attached to the spot
    crack = np.zeros((64, 64), bool)
    crack[45:60, 10] = True  # 1 px wide, a component of its own
    crack[59, 10:30] = True
    mask = spot | bridge | crack
    trimmed = trim_spurs(mask, 2)
    assert (trimmed & spot).sum() >= 0.95 * spot.sum()  # the spot stays
    assert not trimmed[20, 32:50].any()  # the bridge goes
    assert (trimmed[crack]).all() and not (trimmed & ~(spot | bridge | crack)).any()  # the crack stays whole
    assert (trim_spurs(mask, 0) == mask).all()
    # a crack with a thicker bit: the opening keeps the bit (less than half the component), so it stays whole too
    thick_crack = np.zeros((64, 64), bool)
    thick_crack[40:46, 40:46] = True
    thick_crack[5:7, 10:60] = True
    thick_crack[7:40, 42] = True
    assert np.array_equal(trim_spurs(thick_crack, 2), thick_crack)
    assert np.array_equal(trim_spurs(thick_crack.astype(np.uint8), 2), thick_crack)  # 0/1 masks too


def test_tuning_picks_the_spur_trim_when_the_solver_marks_an_edge_next_to_a_spot():
    """A bright 1-px line touches a bright square: the solver repairs both (both are bright), the truth is the
    square alone, so the tuner's mask rule cuts the line (a trim radius > 0); with the line gone, no trim is kept,
    nor when the trim's gain is below mask_trim_margin."""
    refiner = _synthetic_refiner(max_iterations=60, lambda0=0.002, collapse_fraction=0.0)
    image, truth = _square_defect(lo=26, hi=34)
    with_edge = image.copy()
    with_edge[30, 34:46] = 230  # the edge: inside the refined region, not in the truth
    amap = np.where(dilate(truth, 2), 1.0, 0.0)
    cfg = dataclasses.replace(refiner.config, mask_relative_candidates=(0.0,), keep_interior_candidates=(0,),
                              mask_trim_candidates=(0, 2))
    (_, _, _, trim), ious, key, _ = best_tau(refiner, [with_edge], [truth], [amap], cfg, {0.9: 0.2})
    assert trim == 2 and key == "0.9/0.0/0/2" and ious["0.9/0.0/0/2"] > ious["0.9/0.0/0/0"]
    (_, _, _, trim), ious, _, _ = best_tau(refiner, [image], [truth], [amap], cfg, {0.9: 0.2})
    assert trim == 0 and ious["0.9/0.0/0/2"] <= ious["0.9/0.0/0/0"]
    # a trim must win by the margin; the rule returned (and scored) is then the untrimmed one
    strict = dataclasses.replace(cfg, mask_trim_margin=1.0)
    (_, _, _, trim), _, key, _ = best_tau(refiner, [with_edge], [truth], [amap], strict, {0.9: 0.2})
    assert trim == 0 and key == "0.9/0.0/0/0"


def test_a_class_spur_trim_reaches_its_images_at_run_time():
    """Two images of two classes in one batch: only the class tuned with a trim loses the edge line."""
    config = dataclasses.replace(RefineConfig(), **{**FIXED, "max_iterations": 60, "lambda0": 0.002,
                                                    "collapse_fraction": 0.0, "mask_tau": 0.2})
    refiner = Refiner(_BrightnessDetector(), [0.5] * 3, [0.5] * 3, pixel_threshold=0.5, prior=_grey_prior(),
                      config=config, normal_level=0.0, feature_scale=0.5,
                      class_settings={"plain": {"mask_trim_px": 0}, "trimmed": {"mask_trim_px": 2}})
    image, truth = _square_defect(lo=26, hi=34)
    image[30, 34:46] = 230
    amap = np.where(dilate(truth, 2), 1.0, 0.0)
    plain, trimmed = refiner.refine([image, image], [amap, amap], class_names=["plain", "trimmed"])
    assert plain.mask[30, 38:44].all() and not trimmed.mask[30, 38:44].any()
    assert trimmed.mask[truth].mean() > 0.8  # the square stays (an opening rounds its corners)


def test_relative_mask_rule_follows_each_defects_contrast():
    """One tau cannot serve a faint and a strong defect: at a tau above the faint one's contrast it is lost; at a
    low tau the strong one keeps its faint halo. tau near the noise + a relative part gets both."""
    norm = np.zeros((40, 80))
    norm[10:20, 5:15] = 0.06  # faint defect: ||a|| 0.06
    faint = norm > 0
    norm[10:20, 45:55] = 0.6  # strong defect
    halo = np.zeros_like(faint)
    halo[7:23, 42:58] = True
    halo[10:20, 45:55] = False
    norm[halo] = 0.08  # the repair's faint halo around the strong defect
    strong = norm >= 0.6
    region_faint = np.zeros_like(faint)
    region_faint[:, :40] = True
    region_strong = ~region_faint
    assert not mask_from_norm(norm, region_faint, 0.1, 0.0, 0.99).any()  # tau 0.1: the faint defect is gone
    assert (mask_from_norm(norm, region_strong, 0.03, 0.0, 0.99) == (strong | halo)).all()  # tau 0.03: halo kept
    # tau 0.03 + relative 0.5: each region's mask follows its own peak
    assert (mask_from_norm(norm, region_faint, 0.03, 0.5, 0.99) == faint).all()
    assert (mask_from_norm(norm, region_strong, 0.03, 0.5, 0.99) == strong).all()
    # and the solver applies the per-class relative part it was given
    refiner = _synthetic_refiner(mask_relative=0.5)
    assert refiner._prepare([np.zeros((64, 64, 3), np.uint8)], [np.ones((64, 64), bool)]).relative.tolist() == [0.5]


def test_breakeven_check_prefers_the_truth_below_its_lambda0():
    refiner = _synthetic_refiner()
    cfg = dataclasses.replace(refiner.config, inpaint="mean")
    image, truth = _square_defect()
    check = breakeven_lambda0(refiner, image, truth, truth, cfg)
    assert check["true_feature"] < check["no_defect_feature"] and check["breakeven_lambda0"] > 0
    # recompute both objectives with the solver's own objective at lambda0 below / above the break-even
    region = dilate(dilate(truth, cfg.start_dilation_px) | dilate(truth, 1), cfg.region_dilation_px)
    r = torch.from_numpy(region[None, None].astype(np.float32))
    true_x_n = image.copy()
    true_x_n[dilate(truth, 1)] = 128  # the "mean" fill of the grey ring
    x, x_true = refiner._normalise(image[None]), refiner._normalise(true_x_n[None])
    readout = refiner.readout_weights(1, 64, 64)
    for factor, truth_wins in ((0.5, True), (2.0, False)):
        lam = torch.tensor([refiner.lambda_for(truth, dataclasses.replace(cfg, lambda0=check["breakeven_lambda0"]
                                                                              * factor))])
        with torch.no_grad():
            none = refiner.objective(x, x, r, lam, readout)["total"].item()
            true = refiner.objective(x_true, x, r, lam, readout)["total"].item()
        assert (true < none) == truth_wins


def collapse_guard(mask: np.ndarray, core: np.ndarray | None, fraction: float) -> np.ndarray:
    """finish_mask with no kept interior and no trim: the collapse guard alone."""
    return finish_mask(mask, core, np.zeros_like(mask), dataclasses.replace(RefineConfig(), collapse_fraction=fraction))


def test_collapse_guard_keeps_the_confident_core():
    core = np.zeros((8, 8), bool)
    core[2:6, 2:6] = True
    empty = np.zeros_like(core)
    assert np.array_equal(collapse_guard(empty, core, 0.25), core)
    kept = np.zeros_like(core)
    kept[2:4, 2:6] = True  # half the core: the refined mask stands
    assert np.array_equal(collapse_guard(kept, core, 0.25), kept)
    assert np.array_equal(collapse_guard(empty, None, 0.25), empty)


def test_collapse_guard_judges_the_mask_before_the_spur_trim():
    """Thin parts that the trim cuts still count for the guard: a trim is a clean-up, not a collapse."""
    mask = np.zeros((40, 40), bool)
    mask[4:16, 4:16] = True  # the defect's body, 144 px
    core = np.zeros_like(mask)
    core[24:34, 20:30] = True  # 100 px, covered only by thin lines attached to the body
    mask[16:34, 10] = True
    for row in range(24, 34, 2):
        mask[row, 10:30] = True
    assert np.count_nonzero(mask & core) >= 0.25 * core.sum()
    cfg = dataclasses.replace(RefineConfig(), collapse_fraction=0.25)
    trimmed = trim_spurs(mask, 2)
    assert np.count_nonzero(trimmed & core) < 0.25 * core.sum()  # after the trim it would look collapsed
    out = finish_mask(mask, core, np.zeros_like(mask), cfg, trim_px=2)
    assert np.array_equal(out, trimmed) and not (out & core).any()


def test_confident_core_is_the_coarse_mask_when_no_pixel_is_confident():
    """A defect the map only just flagged has no pixel above 1.5x the threshold: the guard then keeps the coarse
    mask, so a refined mask that explained the defect away cannot return nothing."""
    amap = np.zeros((8, 8), np.float32)
    amap[1:3, 1:3] = 1.2  # flagged (threshold 1), not confident
    assert np.array_equal(confident_core(amap, 1.0, 1.5), amap > 1.0)
    assert np.array_equal(collapse_guard(np.zeros_like(amap, bool), confident_core(amap, 1.0, 1.5), 0.25), amap > 1.0)
    amap[5, 5] = 2.0  # one confident pixel: the core is it alone
    assert np.array_equal(confident_core(amap, 1.0, 1.5), amap > 1.5)
    assert not confident_core(np.zeros((4, 4)), 1.0, 1.5).any()  # nothing flagged: nothing to keep


def test_shift_fill_copies_texture_from_a_matching_offset():
    stripes = np.zeros((48, 48, 3), np.uint8)
    stripes[:, ::4] = 200  # vertical stripes, period 4
    damaged = stripes.copy()
    mask = np.zeros((48, 48), bool)
    mask[20:28, 20:28] = True
    damaged[mask] = 90
    filled = shift_fill(damaged, mask, ring_px=3, search_px=16)
    assert np.array_equal(filled[mask], stripes[mask])  # texture restored exactly (offset multiple of 4 in x)
    assert np.array_equal(filled[~mask], damaged[~mask])


def test_median_fill_removes_a_spot_and_keeps_the_gradient_under_it():
    ramp = np.repeat(np.linspace(40, 220, 64).round().astype(np.uint8)[None, :, None], 64, axis=0).repeat(3, axis=2)
    spotted = ramp.copy()
    spotted[30:34, 40:44] = 0  # a 4x4 dark spot on a brightness gradient
    mask = np.zeros((64, 64), bool)
    mask[22:42, 32:52] = True  # an over-covering start mask, as the coarse map gives
    filled = inpaint(spotted, mask, "median", radius_px=5, median_px=9)
    assert np.array_equal(filled[~mask], spotted[~mask])
    residual = np.abs(spotted.astype(int) - filled.astype(int)).max(axis=2)
    assert residual[30:34, 40:44].min() > 100  # the spot is what x - x_n holds...
    residual[30:34, 40:44] = 0
    assert residual.max() <= 6  # ...and little else: the ramp (2.9 grey levels a pixel) stays where it is
    telea = np.abs(spotted.astype(int) - inpaint(spotted, mask, "telea", radius_px=5).astype(int)).max(axis=2)
    telea[30:34, 40:44] = 0
    assert telea[mask].mean() > 10 * residual[mask].mean()  # a diffusion fill flattens the ramp over the mask
    for bad in (8, 1, 101):  # even, too small, beyond MAX_MEDIAN_PX
        with pytest.raises(ConfigError, match="median_px"):
            RefineConfig(median_px=bad)


def test_class_settings_are_stored_and_used_per_image(bundle, trained_tiny, tiny_demo_root, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    train = [s for s in load_samples(tiny_demo_root, "train") if s.label == 0][:6]
    images, _ = load_images(train, 64)
    prepare_bundle(copy, trained_tiny, images, RefineConfig(mog_components=2, mog_pixels=5000))
    write_class_settings(copy, {"nut": {"lambda0": 0.5, "mask_tau": 0.07, "inpaint": "shift"}},
                         {"nut": {"images": ["a.png", "b.png"]}})
    write_class_settings(copy, {"fabric": {"lambda0": 0.01}}, {"fabric": {"images": ["c.png"]}})  # merged
    parts = load_refine_parts(copy, 1.0)
    assert set(parts.class_settings) == {"nut", "fabric"}
    assert tuning_images(copy) == {str(Path(n).resolve()) for n in ("a.png", "b.png", "c.png")}
    refiner = Refiner.from_parts(parts, dataclasses.replace(parts.config, **FIXED))
    # a threshold passed in (grad-refine --pixel-threshold, grad-bench refine) travels with the parts and wins
    assert parts.pixel_threshold_given and refiner.threshold_given
    assert not Refiner.from_parts(dataclasses.replace(parts, pixel_threshold_given=False)).threshold_given
    assert refiner.config_for("nut").lambda0 == 0.5 and refiner.config_for("nut").inpaint == "shift"
    assert refiner.config_for("capsule") == refiner.config == refiner.config_for(None)  # two tuned classes
    single = Refiner.from_parts(dataclasses.replace(parts, class_settings={"nut": parts.class_settings["nut"]}),
                                dataclasses.replace(parts.config, **FIXED))
    assert single.config_for(None).lambda0 == 0.5  # one tuned class: images of unknown class use it
    coarse = np.zeros((64, 64), bool)
    coarse[20:30, 20:30] = True
    batch = refiner._prepare([images[0]] * 2, [coarse] * 2, [refiner.config_for("nut"), refiner.config_for("fabric")])
    assert batch.tau.tolist() == [0.07, refiner.config.mask_tau]
    assert batch.lam[0] / batch.lam[1] == pytest.approx(0.5 / 0.01)


def test_cpu_settings_flush_denormals():
    _synthetic_refiner()
    assert torch.tensor([1e-42], dtype=torch.float32).item() == 0.0  # denormal flushed to zero


def test_tuned_class_coarse_threshold_makes_the_coarse_mask_unless_a_threshold_is_passed_in():
    """A unified bundle has one calibrated pixel threshold; a class whose maps run lower gets its own."""
    image, truth = _square_defect()
    amap = np.where(truth, 0.6, 0.0).astype(np.float32)  # above the bundle's 0.5, below the class's 0.8
    refiner = _synthetic_refiner(max_iterations=2)
    refiner.class_configs = {"high": dataclasses.replace(refiner.config, coarse_threshold=0.8),
                             "low": dataclasses.replace(refiner.config, coarse_threshold=0.3)}
    assert refiner.coarse_threshold("high") == 0.8 and refiner.coarse_threshold("low") == 0.3
    assert refiner.coarse_threshold(None) == 0.5  # two tuned classes, unknown class: the bundle's threshold
    high, low, none = refiner.refine([image] * 3, [amap] * 3, ["high", "low", None])
    assert not high.coarse_mask.any() and high.status == "empty_region"
    assert (low.coarse_mask == truth).all() and (none.coarse_mask == truth).all()
    refiner.threshold_given = True  # --pixel-threshold: the given threshold wins
    assert refiner.coarse_threshold("high") == 0.5


def test_interior_of_a_large_coarse_mask_is_kept_and_small_masks_are_untouched():
    large = np.zeros((64, 64), bool)
    large[8:48, 8:48] = True  # 40 x 40
    small = np.zeros((64, 64), bool)
    small[50:58, 50:58] = True  # 8 x 8: no pixel deeper than 8 px
    inside = interior(large | small, 8)
    assert inside.any() and (inside <= large).all() and not (inside & small).any()
    assert inside[28, 28] and not inside[9, 28]  # the centre stays, the outline is left to the solver
    assert not interior(large, 0).any()
    # the solver adds it to whatever the optimisation found (here: a coarse mask whose start shows no defect)
    image = np.full((64, 64, 3), 128, np.uint8)
    kept = _synthetic_refiner(max_iterations=2, keep_interior_px=8, collapse_fraction=0.0, mask_tau=0.5)
    (result,) = kept.refine_masks([image], [large])
    assert (result.mask >= interior(large, 8)).all() and result.mask[28, 28]
    plain = _synthetic_refiner(max_iterations=2, collapse_fraction=0.0, mask_tau=0.5)
    assert not plain.refine_masks([image], [large])[0].mask[28, 28]


def test_tuning_scores_the_mask_the_solver_returns():
    """pixel_mask + finish_mask are the one rule of the run time and grad-refine tune: small components dropped,
    collapse guard, kept interior."""
    norm = np.zeros((32, 32))
    norm[4:12, 4:12] = 1.0  # 64 px
    norm[20, 20] = 1.0  # 1 px speck
    region = np.ones((32, 32), bool)
    cfg = dataclasses.replace(RefineConfig(), mask_min_component_px=4, collapse_fraction=0.0)
    mask = pixel_mask(norm, region, 0.5, 0.0, cfg)
    assert mask.sum() == 64 and not mask[20, 20]
    keep = np.zeros_like(region)
    keep[28, 28] = True
    assert (finish_mask(mask, None, keep, cfg) == (mask | keep)).all()


def test_set_of_a_class_setting_applies_to_every_tuned_class():
    """grad-refine --set inpaint=shift must not be silently replaced by each class's tuned inpaint."""
    from pathlib import Path

    from gradad.refine.bundle_files import RefineParts
    from gradad.refine.cli import with_set_over_classes
    from gradad.refine.config import RefineConfig

    parts = RefineParts(Path("model.pt"), None, RefineConfig(), 1.0, [0.5] * 3, [0.5] * 3, 0.0, 1.0,
                        {"nut": {"inpaint": "telea", "lambda0": 0.1}, "fabric": {"mask_tau": 0.2}})
    changed = with_set_over_classes(parts, ("inpaint=shift", "max_iterations=5"))
    assert changed.class_settings == {"nut": {"lambda0": 0.1}, "fabric": {"mask_tau": 0.2}}
    assert parts.class_settings["nut"]["inpaint"] == "telea"  # the bundle's parts are not modified
    assert with_set_over_classes(parts, ("max_iterations=5",)) is parts


def test_start_mask_tightens_strong_detections_and_keeps_weak_ones():
    amap = np.zeros((8, 8), np.float32)
    amap[2:6, 2:6] = 1.5  # a blob just above the threshold 1...
    amap[3:5, 3:5] = 6.0  # ...around a strong centre
    assert np.array_equal(start_mask(amap, 1.0, 0.0), amap > 1.0)  # 0: the coarse mask
    assert np.array_equal(start_mask(amap, 1.0, 0.5), amap > 3.0)  # half the peak: the centre only
    weak = np.where(amap > 0, 1.2, 0.0)
    assert np.array_equal(start_mask(weak, 1.0, 0.6), weak > 1.0)  # 0.6 x 1.2 < threshold: unchanged
    assert start_mask(amap, 1.0, 0.99).any()  # a flagged map always keeps its peak


def test_a_class_whose_tuning_kept_the_coarse_mask_gets_it_back_unrefined():
    """use_f2pad false: the mask is the runtime's coarse mask (map > the class's threshold), no pixel is changed,
    status coarse_kept; the other class in the same batch is refined as usual."""
    config = dataclasses.replace(RefineConfig(), **{**FIXED, "max_iterations": 5})
    refiner = Refiner(_BrightnessDetector(), [0.5] * 3, [0.5] * 3, pixel_threshold=0.5, prior=_grey_prior(),
                      config=config, normal_level=0.0, feature_scale=0.5,
                      class_settings={"kept": {"use_f2pad": False}, "refined": {}})
    image, truth = _square_defect()
    amap = np.where(dilate(truth, 6), 1.0, 0.0).astype(np.float32)
    kept, refined = refiner.refine([image, image], [amap, amap], class_names=["kept", "refined"])
    assert kept.status == "coarse_kept" and kept.iterations == 0
    assert (kept.mask == (amap > 0.5)).all() and (kept.coarse_mask == (amap > 0.5)).all()
    assert not kept.region.any() and (kept.repaired == image).all()
    assert refined.status != "coarse_kept" and refined.iterations > 0
    # nothing flagged stays "empty_region" whatever the class says
    (empty,) = refiner.refine([image], [np.zeros_like(amap)], class_names=["kept"])
    assert empty.status == "empty_region" and not empty.mask.any()


def test_tuning_keeps_the_coarse_mask_for_a_class_where_f2pad_does_not_beat_it():
    """A coarse map that is exactly the defect cannot be beaten (IoU 1): the class keeps its coarse masks. A coarse
    map that over-covers a bright square is beaten by F2PAD's tight mask: the class uses F2PAD. The evidence
    records both IoUs."""
    from gradad.refine.tuning import tune_class

    refiner = _synthetic_refiner(max_iterations=40, lambda0=0.002, collapse_fraction=0.0,
                                 start_peak_candidates=(0.0,), mask_tau_images=1,
                                 mask_relative_candidates=(0.0,), keep_interior_candidates=(0,),
                                 mask_trim_candidates=(0,))
    image, truth = _square_defect(lo=26, hi=38)
    rng = np.random.default_rng(0)
    good = np.clip(128 + rng.normal(0, 3, image.shape), 0, 255).astype(np.uint8)  # a little texture for tau
    exact = np.where(truth, 1.0, 0.0).astype(np.float32)
    settings, evidence = tune_class(refiner, [image], [truth], [exact], [good])
    assert settings["use_f2pad"] is False and evidence["coarse_iou"] == 1.0
    assert evidence["f2pad_iou"] <= evidence["coarse_iou"]
    loose = np.where(dilate(truth, 10), 1.0, 0.0).astype(np.float32)
    settings, evidence = tune_class(refiner, [image], [truth], [loose], [good])
    assert "use_f2pad" not in settings and evidence["use_f2pad"] is True  # stored only when false
    assert evidence["f2pad_iou"] > evidence["coarse_iou"] + 0.1


def test_held_out_rule_iou_scores_each_tuning_defect_with_the_rule_the_others_chose():
    """Two rules, each perfect on one defect and useless on the other: each mean 0.4 in-sample, but a rule chosen
    without a defect is the wrong one for it, so the held-out IoU is far lower; a rule that is best everywhere
    keeps its in-sample IoU; the trim margin applies within each choice."""
    from gradad.refine.tuning import held_out_rule_iou

    choices = {"a": (0.1, 0.0, 0, 0), "b": (0.2, 0.0, 0, 0)}
    per_image = {"a": [0.9, 0.0, 0.3], "b": [0.0, 0.9, 0.3]}
    assert held_out_rule_iou(per_image, choices, 0.0) == pytest.approx((0.0 + 0.0 + 0.3) / 3)
    steady = {"a": [0.6, 0.5, 0.7], "b": [0.1, 0.2, 0.3]}
    assert held_out_rule_iou(steady, choices, 0.0) == pytest.approx(0.6)
    trimmed = {"a": (0.1, 0.0, 0, 0), "t": (0.1, 0.0, 0, 2)}  # "t" wins by 0.05: kept only under a smaller margin
    table = {"a": [0.5, 0.5, 0.5], "t": [0.55, 0.55, 0.55]}
    assert held_out_rule_iou(table, trimmed, 0.01) == pytest.approx(0.55)
    assert held_out_rule_iou(table, trimmed, 0.1) == pytest.approx(0.5)
    one = {"a": [0.5], "t": [0.55]}  # one image: the rule the margin keeps, not the best score
    assert held_out_rule_iou(one, trimmed, 0.1) == pytest.approx(0.5)
    assert held_out_rule_iou(one, trimmed, 0.01) == pytest.approx(0.55)


def test_best_tau_scores_each_tuning_defect_with_the_rule_chosen_without_it():
    """Two tuning defects on the real refiner: a small spot with an edge line touching it wants the spur trim, a
    large plain square loses a little to it. Together they choose the trim; held out, the spot is scored with the
    rule the square alone chooses (untrimmed) and the square with the trim, so the held-out IoU is below the
    chosen rule's own."""
    refiner = _synthetic_refiner(max_iterations=60, lambda0=0.002, collapse_fraction=0.0)
    spot, spot_truth = _square_defect(lo=26, hi=34)
    spot[30, 34:46] = 230  # the edge line: inside the refined region, not in the truth
    square, square_truth = _square_defect(lo=16, hi=40)
    spot_map, square_map = (np.where(dilate(t, 2), 1.0, 0.0) for t in (spot_truth, square_truth))
    cfg = dataclasses.replace(refiner.config, mask_relative_candidates=(0.0,), keep_interior_candidates=(0,),
                              mask_trim_candidates=(0, 2), mask_trim_margin=0.0)
    alone = [best_tau(refiner, [image], [truth], [amap], cfg, {0.9: 0.2})
             for image, truth, amap in ((spot, spot_truth, spot_map), (square, square_truth, square_map))]
    assert [c.key for c in alone] == ["0.9/0.0/0/2", "0.9/0.0/0/0"]
    both = best_tau(refiner, [spot, square], [spot_truth, square_truth], [spot_map, square_map], cfg, {0.9: 0.2})
    assert both.key == "0.9/0.0/0/2"
    expected = (alone[0].ious["0.9/0.0/0/0"] + alone[1].ious["0.9/0.0/0/2"]) / 2
    assert both.held_out_iou == pytest.approx(expected, abs=1e-3)
    assert both.held_out_iou < both.ious[both.key] - 0.005


def test_f2pad_is_kept_off_when_only_its_in_sample_tuning_iou_beats_the_coarse_mask(monkeypatch):
    """The class's F2PAD decision weighs the held-out IoU of the mask rule, not the best rule's own IoU."""
    import gradad.refine.tuning as tuning

    image, truth = _square_defect(lo=26, hi=38)
    loose = np.where(dilate(truth, 6), 1.0, 0.0).astype(np.float32)
    coarse = float(np.logical_and(loose > 0.5, truth).sum() / np.logical_or(loose > 0.5, truth).sum())
    refiner = _synthetic_refiner(max_iterations=1, start_peak_candidates=(0.0,))
    for held_out, use in ((coarse - 0.05, False), (coarse + 0.05, True), (coarse + 4e-5, True)):
        monkeypatch.setattr(tuning, "_tune_at", lambda *a, h=held_out: ({"mask_tau": 0.1},
                                                                         {"held_out_iou": h}, coarse + 0.2))
        settings, evidence = tuning.tune_class(refiner, [image, image], [truth, truth], [loose, loose], [])
        assert evidence["use_f2pad"] is use and evidence["f2pad_iou"] == pytest.approx(coarse + 0.2, abs=1e-4)
        assert evidence["f2pad_held_out_iou"] == pytest.approx(held_out, abs=1e-4)
        assert settings.get("use_f2pad", True) is use


def test_tuning_refines_with_a_fixed_iteration_count_not_the_wall_clock_budget():
    """Under a wall-clock budget the iterations reached depend on the machine's load, and the tuned settings with
    them; tuning runs tune_iterations (capped by max_iterations) with no budget, so two tunings agree."""
    from gradad.refine.tuning import tune_class, tuning_config

    cfg = tuning_config(RefineConfig(time_budget_s=1.5, tune_iterations=7, max_iterations=1200))
    assert cfg.time_budget_s == 0.0 and cfg.max_iterations == 7
    assert tuning_config(RefineConfig(tune_iterations=7, max_iterations=3)).max_iterations == 3
    plain = RefineConfig(tune_iterations=0)
    assert tuning_config(plain) is plain  # 0: the run-time budget, as before
    from gradad.errors import ConfigError

    with pytest.raises(ConfigError, match="tune_iterations"):
        RefineConfig(tune_iterations=-1)
    # a tiny budget that would stop the solver after its first iteration does not reach the tuning
    refiner = _synthetic_refiner(time_budget_s=1e-6, tune_iterations=8, lambda0=0.002, collapse_fraction=0.0,
                                 start_peak_candidates=(0.0,), mask_tau_images=1, mask_relative_candidates=(0.0,),
                                 keep_interior_candidates=(0,), mask_trim_candidates=(0,))
    image, truth = _square_defect(lo=26, hi=38)
    good = np.clip(128 + np.random.default_rng(0).normal(0, 3, image.shape), 0, 255).astype(np.uint8)
    loose = np.where(dilate(truth, 10), 1.0, 0.0).astype(np.float32)
    first = tune_class(refiner, [image], [truth], [loose], [good])
    again = tune_class(refiner, [image], [truth], [loose], [good])
    assert first[0] == again[0] and first[1]["f2pad_iou"] == again[1]["f2pad_iou"]
    assert first[1]["use_f2pad"] is True
