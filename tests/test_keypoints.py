"""Batched keypoint detectors vs independent oracles (scikit-image, scipy, numpy, hand values)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.ndimage import maximum_filter
from skimage.feature import peak_local_max

from core.keypoints import (
    _window_max,
    argmax_keypoints,
    peak_mask,
    peak_mean_keypoints,
    top_k_peaks,
    upsample_maps,
)


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


def test_argmax_matches_numpy_and_falls_back_to_centre():
    generator = torch.Generator().manual_seed(3)
    maps = torch.rand(5, 7, 10, generator=generator)
    maps[1] = 0.0  # all-zero CAM
    maps[2] = -maps[2]  # max < 0
    maps[3] = 0.0
    maps[3, 2, 6] = maps[3, 5, 1] = 0.7  # tie: first in raster order wins
    out = argmax_keypoints(maps)
    assert out.dtype == torch.float32 and out.shape == (5, 2)
    for i in (0, 3, 4):
        y, x = np.unravel_index(np.argmax(maps[i].numpy()), (7, 10))
        assert out[i].tolist() == [float(y), float(x)]
    assert out[3].tolist() == [2.0, 6.0]
    assert out[1].tolist() == [3.0, 5.0] and out[2].tolist() == [3.0, 5.0]


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
    peak_mean_keypoints(maps, 3, 2, weighted=True)
    assert torch.equal(maps, before)
    transposed = maps.transpose(1, 2)  # dense but not contiguous
    for got, expected in zip(top_k_peaks(transposed, 4, 2), top_k_peaks(transposed.contiguous(), 4, 2)):
        assert torch.equal(got, expected)


# ----------------------------------------------------------------------------- peak means


def crafted_map() -> torch.Tensor:
    m = torch.zeros(21, 21)
    m[5, 5], m[5, 15], m[15, 10] = 1.0, 0.5, 0.25
    return m


def test_peak_mean_plain_and_weighted_by_hand():
    maps = crafted_map()[None]

    def check(k: int, weighted: bool, expected_yx: tuple[float, float]) -> None:
        out = peak_mean_keypoints(maps, k, 2, weighted=weighted)
        torch.testing.assert_close(out, torch.tensor([expected_yx]))

    # peaks (5,5)=1, (5,15)=.5, (15,10)=.25. k=3 plain: y = (5 + 5 + 15) / 3, x = (5 + 15 + 10) / 3
    check(3, False, (25 / 3, 10.0))
    # k=3 weighted, w = (1, .5, .25) / 1.75: y = (5 + 2.5 + 3.75) / 1.75, x = (5 + 7.5 + 2.5) / 1.75
    check(3, True, (11.25 / 1.75, 15 / 1.75))
    # k=2 keeps the two highest: plain (5, 10); weighted x = (5 * 1 + 15 * .5) / 1.5
    check(2, False, (5.0, 10.0))
    check(2, True, (5.0, 12.5 / 1.5))
    # k larger than the number of peaks: the mean of the peaks found
    check(9, False, (25 / 3, 10.0))


def test_peak_mean_fallbacks_never_nan():
    maps = torch.zeros(4, 15, 11)
    maps[1] = 2.0  # constant
    maps[2, 0, 5] = 1.0  # only peak in the border
    maps[3] = -2.0
    maps[3, 3, 3], maps[3, 10, 7] = 1.0, -1.0  # peak values sum to 0: plain mean instead
    for weighted in (False, True):
        out = peak_mean_keypoints(maps, 5, 2, weighted=weighted)
        assert torch.isfinite(out).all()
        assert out[:3].tolist() == [[7.0, 5.0]] * 3  # centre (H // 2, W // 2)
        assert out[3].tolist() == [6.5, 5.0]


def test_peak_mean_batch_equals_single_maps():
    spike = torch.zeros(1, 64, 64)
    spike[0, 10, 20] = 0.9
    constant = torch.full((1, 64, 64), 0.5)
    maps = torch.cat([smooth_maps(7, 3, grid=8, scale=8), torch.zeros(1, 64, 64), constant, spike])
    for weighted in (False, True):
        batch = peak_mean_keypoints(maps, 5, 4, weighted=weighted)
        single = torch.cat([peak_mean_keypoints(m[None], 5, 4, weighted=weighted) for m in maps])
        assert torch.equal(batch, single)
        assert batch[3:].tolist() == [[32.0, 32.0], [32.0, 32.0], [10.0, 20.0]]


def test_peak_mean_matches_skimage_mean():
    maps = smooth_maps(11, 4, grid=8, scale=8)
    plain = peak_mean_keypoints(maps, 5, 6, weighted=False)
    weighted = peak_mean_keypoints(maps, 5, 6, weighted=True)
    for m, p, w in zip(maps.numpy(), plain.numpy(), weighted.numpy()):
        ref = skimage_peaks(m, 6, 5).astype(np.float64)
        weights = m[tuple(ref.astype(int).T)].astype(np.float64)
        np.testing.assert_allclose(p, ref.mean(0), rtol=1e-6)
        np.testing.assert_allclose(w, (weights[:, None] * ref).sum(0) / weights.sum(), rtol=1e-5)


# ----------------------------------------------------------------------------- arguments


def test_argument_validation():
    maps = torch.zeros(1, 8, 8)
    with pytest.raises(ValueError, match="k must"):
        top_k_peaks(maps, 0, 2)
    with pytest.raises(ValueError, match="k must"):
        peak_mean_keypoints(maps, 2.5, 2, weighted=False)
    with pytest.raises(ValueError, match="min_distance must"):
        peak_mask(maps, -1)
    with pytest.raises(ValueError, match="min_distance must"):
        peak_mean_keypoints(maps, 5, -3, weighted=True)
    with pytest.raises(ValueError, match="shape"):
        argmax_keypoints(torch.zeros(8, 8))
    with pytest.raises(ValueError, match="size"):
        upsample_maps(maps, (0, 4))


def test_empty_batch():
    maps = torch.zeros(0, 16, 16)
    assert argmax_keypoints(maps).shape == (0, 2)
    assert peak_mean_keypoints(maps, 5, 2, weighted=True).shape == (0, 2)
    coords, values, valid = top_k_peaks(maps, 5, 2)
    assert coords.shape == (0, 5, 2) and values.shape == (0, 5) and valid.shape == (0, 5)
