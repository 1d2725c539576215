"""Batched keypoint detectors vs independent oracles (scikit-image, scipy, numpy, hand values)."""
from __future__ import annotations

import warnings

import cv2
import keypoint_oracles as oracles
import numpy as np
import pytest
import torch
from scipy.ndimage import maximum_filter
from skimage.feature import peak_local_max

from core.builder import make_cams
from core.keypoints import (
    _window_max,
    argmax_cuts,
    peak_mask,
    top_k_peaks,
    topk_mean_cuts,
    topk_weighted_cuts,
    upsample_maps,
)
from core.strategies import STRATEGIES, build_tasks


def smooth_maps(seed: int, n: int, grid: int, scale: int, quantise: float = 0.0) -> torch.Tensor:
    """Random grids upsampled bilinearly like a CAM; quantising creates exact plateaus and ties."""
    generator = torch.Generator().manual_seed(seed)
    maps = upsample_maps(torch.rand(n, grid, grid, generator=generator), (grid * scale, grid * scale))
    if quantise:
        maps = torch.round(maps / quantise) * quantise
    return maps


def skimage_peaks(image: np.ndarray, r: int, k: float = np.inf) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # skimage warns for min_distance=0
        return peak_local_max(image, min_distance=r, num_peaks=k)


def skimage_candidates(image: np.ndarray, r: int) -> np.ndarray:
    """Every candidate before spacing: min_distance=1 turns ensure_spacing off, the footprint and
    the border width keep the (2r+1) window and the r-pixel border of min_distance=r."""
    if r == 0:
        return skimage_peaks(image, 0)
    footprint = np.ones((2 * r + 1, 2 * r + 1), dtype=bool)
    return peak_local_max(image, min_distance=1, footprint=footprint, exclude_border=r)


def mask_of(coords: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(coords.T)] = True
    return mask


# ----------------------------------------------------------------------------- upsample / argmax


def test_upsample_bilinear_half_pixel_centres():
    maps = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    # align_corners=False: output pixel i samples source (i + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25,
    # clamped to [0, 1]; row 1 is 0.75 * row(src 0) + 0.25 * row(src 1).
    expected = torch.tensor([
        [0.0, 0.25, 0.75, 1.0],
        [0.5, 0.75, 1.25, 1.5],
        [1.5, 1.75, 2.25, 2.5],
        [2.0, 2.25, 2.75, 3.0],
    ])
    out = upsample_maps(maps, (4, 4))
    assert out.shape == (1, 4, 4)
    torch.testing.assert_close(out[0], expected)


# ----------------------------------------------------------------------------- peak mask


@pytest.mark.parametrize("radius", [1, 2, 5, 10])
def test_window_max_matches_scipy_nearest(radius):
    image = torch.rand(2, 7, 13, generator=torch.Generator().manual_seed(radius))
    expected = np.stack([maximum_filter(m, size=2 * radius + 1, mode="nearest") for m in image.numpy()])
    assert np.array_equal(_window_max(image, radius).numpy(), expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("radius", [0, 1, 2, 3, 5])
@pytest.mark.parametrize("quantise", [0.0, 0.125])
def test_peak_mask_matches_skimage_candidates(seed, radius, quantise):
    maps = smooth_maps(seed, 4, grid=8, scale=8, quantise=quantise)
    mask = peak_mask(maps, radius)
    for m, got in zip(maps.numpy(), mask.numpy()):
        assert np.array_equal(got, mask_of(skimage_candidates(m, radius), m.shape))


def test_peak_mask_degenerate_maps():
    maps = torch.zeros(4, 12, 12)
    maps[1] = 0.3  # constant: trivial image, no peak
    maps[2, 1, 6] = 1.0  # only peak inside the r=2 border
    maps[3, :, 7:] = 1.0  # step edge: a plateau of equal maxima
    for radius in (0, 1, 2, 6):
        got = peak_mask(maps, radius).numpy()
        for m, g in zip(maps.numpy(), got):
            assert np.array_equal(g, mask_of(skimage_peaks(m, radius) if radius == 0
                                             else skimage_candidates(m, radius), m.shape))
    assert not peak_mask(maps, 2)[:3].any()
    assert not peak_mask(maps, 6).any()  # 2r >= size: everything is border


# ----------------------------------------------------------------------------- top-k peaks


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("radius", [0, 1, 2, 4, 8])
@pytest.mark.parametrize("quantise", [0.0, 0.0625])
def test_top_k_matches_skimage_in_order(seed, radius, quantise):
    maps = smooth_maps(seed, 4, grid=8, scale=8, quantise=quantise)
    for k in (1, 3, 5):
        coords, values, valid = top_k_peaks(maps, k, radius)
        for m, c, v, ok in zip(maps.numpy(), coords.numpy(), values.numpy(), valid.numpy()):
            ref = skimage_peaks(m, radius, k)
            assert ok.sum() == len(ref)
            assert np.array_equal(c[ok], ref)
            assert np.array_equal(v[ok], m[tuple(ref.T)])


@pytest.mark.parametrize("seed", [4, 5])
@pytest.mark.parametrize("radius", [1, 3, 6])
def test_top_k_whole_set_matches_skimage(seed, radius):
    maps = smooth_maps(seed, 3, grid=16, scale=4, quantise=0.05 if seed == 5 else 0.0)
    refs = [skimage_peaks(m, radius) for m in maps.numpy()]
    k = max(len(r) for r in refs) + 2
    coords, values, valid = top_k_peaks(maps, k, radius)
    for ref, c, v, ok in zip(refs, coords.numpy(), values.numpy(), valid.numpy()):
        assert np.array_equal(c[: len(ref)], ref)
        assert ok[: len(ref)].all() and not ok[len(ref):].any()
        assert (c[len(ref):] == 0).all() and (v[len(ref):] == 0).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_top_k_realistic_cam_size(seed):
    # 32x32 CAM, x16 bilinear to 512x512: the reference's setting (r=20, k=5); 2x2 near-plateaus.
    generator = torch.Generator().manual_seed(seed)
    cams = torch.relu(torch.randn(3, 32, 32, generator=generator))
    cams = cams / (cams.flatten(1).amax(1).view(3, 1, 1) + 1e-5)
    maps = upsample_maps(cams, (512, 512))
    coords, _, valid = top_k_peaks(maps, 5, 20)
    for m, c, ok in zip(maps.numpy(), coords.numpy(), valid.numpy()):
        assert np.array_equal(c[ok], skimage_peaks(m, 20, 5))


def test_spacing_is_strict_and_ties_follow_raster_order():
    maps = torch.zeros(4, 15, 15)
    maps[0, 7, 4] = maps[0, 7, 6] = 1.0  # equal peaks exactly r=2 apart: both kept
    maps[1, 7, 4] = maps[1, 7, 5] = 1.0  # 1 apart: only the first in raster order
    maps[2, 9, 3] = maps[2, 3, 9] = maps[2, 3, 3] = 1.0  # ties: raster order
    maps[3, 6:8, 6:8] = 1.0  # 2x2 plateau: one peak for r=2, its top-left pixel
    coords, _, valid = top_k_peaks(maps, 4, 2)
    expected = [[[7, 4], [7, 6]], [[7, 4]], [[3, 3], [3, 9], [9, 3]], [[6, 6]]]
    for m, c, ok, exp in zip(maps.numpy(), coords.numpy(), valid.numpy(), expected):
        assert c[ok].tolist() == exp
        assert c[ok].tolist() == skimage_peaks(m, 2, 4).tolist()
    # with r=1 (no spacing in skimage) the whole plateau comes back, in raster order
    coords, _, valid = top_k_peaks(maps[3:], 5, 1)
    assert coords[0][valid[0]].tolist() == [[6, 6], [6, 7], [7, 6], [7, 7]]


def test_top_k_does_not_modify_input_and_accepts_strided_maps():
    maps = smooth_maps(0, 2, grid=8, scale=4)
    before = maps.clone()
    top_k_peaks(maps, 3, 2)
    topk_weighted_cuts(maps, 3, 2)
    topk_mean_cuts(maps, 3, 2)
    assert torch.equal(maps, before)
    transposed = maps.transpose(1, 2)  # dense but not contiguous
    for got, expected in zip(top_k_peaks(transposed, 4, 2), top_k_peaks(transposed.contiguous(), 4, 2)):
        assert torch.equal(got, expected)


# ----------------------------------------------------------------------------- cut rules vs literal per-map oracles

REFERENCE_ORACLES = {
    "argmax": lambda cam, k, r, radius: oracles.argmax_reference(cam),
    "mean": lambda cam, k, r, radius: oracles.rule_a_reference(cam, k, r, radius),
    "weighted": lambda cam, k, r, radius: oracles.rule_b_reference(cam, k, r),
}
CLEAN_ORACLES = {
    "argmax": lambda cam, k, r, radius: oracles.argmax_clean(cam),
    "mean": lambda cam, k, r, radius: oracles.rule_a_clean(cam, k, r),
    "weighted": lambda cam, k, r, radius: oracles.rule_b_clean(cam, k, r),
}


def batched_cuts(rule_name: str, maps: torch.Tensor, k: int, r: int, radius: int, keypoint_rule: str) -> torch.Tensor:
    if rule_name == "argmax":
        return argmax_cuts(maps, keypoint_rule)
    if rule_name == "mean":
        return topk_mean_cuts(maps, k, r, keypoint_rule, radius)
    return topk_weighted_cuts(maps, k, r, keypoint_rule)


def cam_like_maps(seed: int, n: int, grid: int, size: int, quantise: float = 0.0) -> torch.Tensor:
    """ReLU of Gaussian noise normalised to max ~1 (like make_cams), upsampled bilinearly by torch."""
    generator = torch.Generator().manual_seed(seed)
    cams = torch.relu(torch.randn(n, grid, grid, generator=generator))
    cams = cams / (cams.flatten(1).amax(1).view(n, 1, 1) + 1e-5)
    if quantise:
        cams = torch.round(cams / quantise) * quantise  # exact ties between peaks
    return upsample_maps(cams, (size, size))


def bump_maps(seed: int, n: int, grid: int, size: int) -> torch.Tensor:
    """1-8 Gaussian bumps per grid x grid map, normalised to max 1, upsampled: a handful of peaks each."""
    generator = torch.Generator().manual_seed(seed)
    axis = torch.arange(grid, dtype=torch.float32)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    maps = torch.zeros(n, grid, grid)
    for i in range(n):
        count = int(torch.randint(1, 9, (1,), generator=generator))
        centres = torch.rand(count, 2, generator=generator) * (grid - 1)
        heights = 0.2 + 0.8 * torch.rand(count, generator=generator)
        widths = 1 + 2 * torch.rand(count, generator=generator)
        for (cy, cx), height, sigma in zip(centres, heights, widths):
            maps[i] += height * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
    maps = maps / maps.flatten(1).amax(1).view(n, 1, 1)
    return upsample_maps(maps, (size, size))


def spikes(size: int, points: dict[tuple[int, int], float]) -> torch.Tensor:
    """A zero map with single-pixel peaks: each is a skimage peak when inside the border."""
    m = torch.zeros(size, size)
    for (y, x), value in points.items():
        m[y, x] = value
    return m


def map_bank() -> list[tuple[torch.Tensor, int, int, int]]:
    """(maps, k, min_distance, radius) groups: the reference's 512-px setting and smaller ones."""
    degenerate = torch.zeros(4, 128, 128)
    degenerate[1] = 0.4  # constant: no peak
    degenerate[2, 2, 60] = 1.0  # the only maximum lies in the border: no peak
    degenerate[3, 64:, :] = 0.5  # a half-plane plateau
    return [
        (cam_like_maps(0, 6, grid=32, size=512), 5, 20, 128),  # many peaks: the > k branch
        (bump_maps(1, 16, grid=32, size=512), 5, 20, 128),  # 1-6 peaks: both branches
        (bump_maps(2, 16, grid=16, size=128), 2, 5, 32),
        (torch.cat([cam_like_maps(seed, 8, grid, 128) for seed, grid in enumerate((2, 3, 4, 6, 8, 12))]), 5, 5, 32),
        (cam_like_maps(7, 12, grid=6, size=96, quantise=0.25), 3, 4, 24),  # tied peak values
        (degenerate, 5, 5, 32),
    ]


@pytest.mark.parametrize("keypoint_rule", ["reference", "clean"])
@pytest.mark.parametrize("rule_name", ["argmax", "mean", "weighted"])
def test_cuts_equal_the_literal_per_map_rules(rule_name, keypoint_rule):
    oracle = (REFERENCE_ORACLES if keypoint_rule == "reference" else CLEAN_ORACLES)[rule_name]
    peak_counts = []
    for maps, k, r, radius in map_bank():
        cuts = batched_cuts(rule_name, maps, k, r, radius, keypoint_rule)
        assert cuts.dtype == torch.int64 and cuts.shape == (len(maps), 2)
        size = torch.tensor(maps.shape[1:])
        assert ((cuts >= 1) & (cuts <= size - 1)).all()
        for m, cut in zip(maps.numpy(), cuts.tolist()):
            assert cut == oracle(m, k, r, radius)
            peak_counts.append((len(oracles.find_peaks(m, r)), k))
    # the bank covers no peak, 1..k peaks and more than k peaks
    assert any(n == 0 for n, _ in peak_counts)
    assert any(0 < n <= k for n, k in peak_counts)
    assert any(n > k for n, k in peak_counts)


def test_the_reference_ctopk_slip_changes_realistic_keypoints():
    maps = cam_like_maps(0, 6, grid=32, size=512)
    changed = 0
    for m, cut in zip(maps.numpy(), topk_mean_cuts(maps, 5, 20).tolist()):
        assert cut == oracles.rule_a_reference(m, 5, 20)
        changed += cut != oracles.rule_a_reference(m, 5, 20, slip=False)
    assert changed > 0


def test_ctopk_slip_by_hand():
    # argmax (20, 100); two peaks near it (distance < 32); the far ones are lower
    near = {(20, 100): 1.0, (30, 100): 0.9, (25, 110): 0.8}
    far = {(100, 20): 0.3, (110, 40): 0.25, (90, 60): 0.2, (100, 100): 0.15}
    many = spikes(128, near | far)  # 7 peaks > k = 5: the reference tests (py - ay)^2 + (py - ax)^2
    few = spikes(128, near | {(100, 20): 0.3})  # 4 peaks <= k: the true distance
    cuts = topk_mean_cuts(torch.stack([many, few]), 5, 4, radius=32)
    # with the slip no top-5 peak is kept (every py is far from ax = 100 or from ay = 20): centre
    assert cuts.tolist() == [[64, 64], [25, 103]]  # (20 + 30 + 25) // 3, (100 + 100 + 110) // 3
    assert oracles.rule_a_reference(many.numpy(), 5, 4, 32) == [64, 64]
    assert oracles.rule_a_reference(many.numpy(), 5, 4, 32, slip=False) == [25, 103]  # what it meant
    # clean: no filter, plain mean of the top 5
    assert topk_mean_cuts(many[None], 5, 4, "clean").tolist() == [[57, 74]]  # 285 // 5, 370 // 5


def test_ctopk_w_truncates_every_term_before_summing():
    m = spikes(64, {(11, 11): 0.5, (21, 31): 0.5})
    # terms y: 11 * .5 / 1 = 5.5 -> 5, 21 * .5 = 10.5 -> 10; x: 5.5 -> 5, 15.5 -> 15
    assert topk_weighted_cuts(m[None], 5, 2).tolist() == [[15, 20]]
    assert oracles.rule_b_reference(m.numpy(), 5, 2) == [15, 20]
    assert oracles.rule_b_reference(m.numpy(), 5, 2, truncate_terms=False) == [16, 21]
    assert topk_weighted_cuts(m[None], 5, 2, "clean").tolist() == [[16, 21]]


def test_ctopk_w_sums_the_weights_in_float32():
    # 0.5 + 2**-25 rounds to 0.5 in float32 (a tie, to even): the first term is exactly 40 * 0.5 / 0.5.
    # With S summed in float64 it would be 40 * (1 - 2**-24) -> 39.
    tiny = 2.0**-25
    m = spikes(128, {(40, 40): 0.5, (80, 90): tiny})
    assert topk_weighted_cuts(m[None], 5, 4).tolist() == [[40, 40]]
    assert oracles.rule_b_reference(m.numpy(), 5, 4) == [40, 40]
    exact_total = 0.5 + tiny
    assert int(40 * 0.5 / exact_total) + int(80 * tiny / exact_total) == 39
    # more than k peaks: S is the float32 sum of the top k only (here k = 1: S = 0.5, one term 40)
    assert topk_weighted_cuts(m[None], 1, 4).tolist() == [[40, 40]]


def test_zero_coordinate_gives_the_centre():
    top_row = torch.zeros(3, 64, 64)
    top_row[0, 0, 7] = 1.0  # argmax on row 0
    top_row[1, 5, 0] = 1.0  # argmax on column 0
    assert argmax_cuts(top_row).tolist() == [[32, 32]] * 3  # the all-zero map: argmax (0, 0)
    assert argmax_cuts(top_row, "clean").tolist() == [[1, 7], [5, 1], [32, 32]]
    # cTopk with min_distance 0 (no border): five peaks on row 0 -> mean y = 0
    row = torch.zeros(1, 64, 64)
    row[0, 0, 3:8] = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    assert topk_mean_cuts(row, 5, 0).tolist() == [oracles.rule_a_reference(row[0].numpy(), 5, 0)] == [[32, 32]]
    assert topk_mean_cuts(row, 5, 0, "clean").tolist() == [[1, 5]]
    # cTopk-w: five equal peaks on row 4, every term 4 * 0.2 = 0.8 truncates to 0
    flat = spikes(64, {(4, x): 0.5 for x in (10, 20, 30, 40, 50)})[None]
    assert topk_weighted_cuts(flat, 5, 4).tolist() == [oracles.rule_b_reference(flat[0].numpy(), 5, 4)] == [[32, 32]]
    assert topk_weighted_cuts(flat, 5, 4, "clean").tolist() == [[4, 30]]


def test_cuts_of_a_batch_equal_cuts_of_single_maps():
    maps = torch.cat([cam_like_maps(3, 5, grid=8, size=128), torch.zeros(1, 128, 128)])
    for rule_name in REFERENCE_ORACLES:
        for keypoint_rule in ("reference", "clean"):
            batch = batched_cuts(rule_name, maps, 5, 5, 32, keypoint_rule)
            single = torch.cat([batched_cuts(rule_name, m[None], 5, 5, 32, keypoint_rule) for m in maps])
            assert torch.equal(batch, single)


def test_torch_bilinear_matches_cv2_inter_linear():
    generator = torch.Generator().manual_seed(5)
    cams = torch.relu(torch.randn(4, 32, 32, generator=generator))
    cams = cams / (cams.flatten(1).amax(1).view(4, 1, 1) + 1e-5)
    ours = upsample_maps(cams, (512, 512)).numpy()
    for cam, up in zip(cams.numpy(), ours):
        np.testing.assert_allclose(up, cv2.resize(cam, (512, 512), interpolation=cv2.INTER_LINEAR), rtol=0, atol=1e-6)
    non_square = upsample_maps(cams[:1, :24], (384, 512))[0].numpy()
    np.testing.assert_allclose(non_square, cv2.resize(cams[0, :24].numpy(), (512, 384)), rtol=0, atol=1e-6)


def plateau_and_smooth_cams(seed: int) -> list[tuple[torch.Tensor, torch.Tensor, int, int, int, int]]:
    """(cams, labels, size, k, min_distance, radius): 4x4 CAMs, whose maxima mostly lie on the border, where
    bilinear upsampling makes plateaus (exact ties that the two resizes break differently), and 16x16 CAMs
    (few ties), both at 16x like the reference's 32x32 -> 512."""
    generator = torch.Generator().manual_seed(seed)
    groups = []
    for grid, k, r, radius in ((4, 3, 4, 16), (16, 5, 10, 64)):
        cams = make_cams(torch.randn(24, 20, grid, grid, generator=generator))
        labels = (torch.rand(24, 20, generator=generator) < 0.15).float()
        labels[:, 3] = 1.0  # at least one positive class per image
        groups.append((cams, labels, 16 * grid, k, r, radius))
    return groups


REFERENCE_RULE = {"max": "argmax", "cmax": "argmax", "ctopk": "mean", "ctopk_w": "weighted"}


@pytest.mark.parametrize("name", ["max", "cmax", "ctopk", "ctopk_w"])
def test_task_keypoints_against_the_reference_calls_cv2_resize_and_peak_local_max(name):
    """Our keypoints (torch bilinear upsampling) against the official scripts' calls (cv2.resize INTER_LINEAR,
    skimage peak_local_max), per class. The two resizes agree to one float32 ulp of 1 (the CAMs lie in [0, 1]),
    and our rules reproduce the reference exactly on the cv2 maps; a keypoint moves only where that ulp breaks
    a tie: never on the 16x16 CAMs here, in some of the plateau-rich 4x4 ones (docs/fidelity.md)."""
    ulp = float(np.spacing(np.float32(1.0)))
    moved = {4: 0, 16: 0}
    tasks = {}
    for cams, labels, size, k, r, radius in plateau_and_smooth_cams(11):
        ours = build_tasks(STRATEGIES[name], cams, labels, labels, (size, size), k, r, "reference", radius).keypoints
        expected, cv2_maps = oracles.reference_task_keypoints(name, cams.numpy(), labels.numpy(), (size, size), k, r,
                                                              radius)
        cv2_maps = torch.from_numpy(np.stack(cv2_maps))
        tasks[size // 16] = len(expected)
        # the rules alone: our batched rule on the reference's own upsampled maps gives its keypoints exactly
        assert batched_cuts(REFERENCE_RULE[name], cv2_maps, k, r, radius, "reference").tolist() == expected
        merged = (cams * labels[:, :, None, None]).amax(dim=1) if name == "max" else cams[labels.bool()]
        assert (upsample_maps(merged, (size, size)) - cv2_maps).abs().max() <= ulp  # the resizes: 1 ulp apart
        for index, (cut, reference) in enumerate(zip(ours.tolist(), expected)):
            if cut == reference:
                continue
            moved[size // 16] += 1
            if name in ("max", "cmax"):  # an argmax moves only between two pixels tied to within that ulp
                cam = cv2_maps[index]
                assert cam[tuple(cut)] >= cam[tuple(reference)] - ulp
    # seed 11 moves 5/24 Max, 17/85 cMax, 12/85 cTopk, 18/85 cTopk-w keypoints of the 4x4 CAMs, none of the 16x16
    assert moved[16] == 0
    assert 0 < moved[4] <= tasks[4] // 3


# ----------------------------------------------------------------------------- arguments


def test_argument_validation():
    maps = torch.zeros(1, 8, 8)
    with pytest.raises(ValueError, match="k must"):
        top_k_peaks(maps, 0, 2)
    with pytest.raises(ValueError, match="k must"):
        topk_mean_cuts(maps, 2.5, 2)
    with pytest.raises(ValueError, match="min_distance must"):
        peak_mask(maps, -1)
    with pytest.raises(ValueError, match="min_distance must"):
        topk_weighted_cuts(maps, 5, -3)
    with pytest.raises(ValueError, match="radius must"):
        topk_mean_cuts(maps, 5, 2, radius=-1)
    with pytest.raises(ValueError, match="keypoint_rule"):
        argmax_cuts(maps, "exact")
    with pytest.raises(ValueError, match="shape"):
        argmax_cuts(torch.zeros(8, 8))
    with pytest.raises(ValueError, match="size"):
        upsample_maps(maps, (0, 4))


def test_empty_batch():
    maps = torch.zeros(0, 16, 16)
    for rule in ("reference", "clean"):
        for cuts in (argmax_cuts(maps, rule), topk_mean_cuts(maps, 5, 2, rule), topk_weighted_cuts(maps, 5, 2, rule)):
            assert cuts.shape == (0, 2) and cuts.dtype == torch.int64
    coords, values, valid = top_k_peaks(maps, 5, 2)
    assert coords.shape == (0, 5, 2) and values.shape == (0, 5) and valid.shape == (0, 5)
