"""Keypoint detectors on class activation maps, batched on tensors.

Every function takes a batch of N maps (N, H, W) -- one per image for the `Max`
strategy, one per (image, positive class) for the channel-wise ones -- and works
on any device with no per-map Python loop and no numpy round trip. Keypoints are
(y, x) in the maps' pixels (input pixels once the CAMs are upsampled).

The three ``*_cuts`` functions return int64 (N, 2) cut positions, every
coordinate in [1, size - 1] so that no quadrant of the puzzle split is empty.
``keypoint_rule="reference"`` reproduces the official OASS scripts' rules to the
pixel on a given map (docs/method.md section 3): integer means, the 128-px filter
of cTopk with its y/x slip, cTopk-w's per-term truncation, and "a coordinate of
0 -> centre". The maps themselves come from ``upsample_maps`` (torch bilinear),
which agrees with the scripts' cv2.resize INTER_LINEAR to one float32 ulp, not
bit for bit: where two pixels tie within that ulp (plateaus), a keypoint can
move (docs/fidelity.md).
``"clean"`` is our variant: float (weighted) means floored once, no distance
filter, clamped into [1, size - 1]. The centre is (H // 2, W // 2).

The peak detector reproduces scikit-image 0.26
``peak_local_max(image, min_distance=r)`` with its defaults (checked against its
source and by experiment):

* candidate = a pixel equal to the maximum of its (2r+1)x(2r+1) window, the
  window clipped at the image edges (scipy ``maximum_filter(mode='nearest')``
  gives the same maximum);
* threshold: strictly greater than the map's minimum (``threshold_abs=None``);
* "trivial" map (every pixel equals its window maximum): skimage returns no
  peak. For r >= 1 that only happens for a constant map (neighbours lie in each
  other's windows, so they must be equal), which has no pixel above its
  minimum: the threshold already covers the rule, so it is not computed;
* ``exclude_border=True``: rows/cols ``< r`` or ``>= size - r`` are dropped;
* r == 0: skimage warns and returns every pixel above the minimum (no trivial
  rule, no border, no spacing);
* spacing (``ensure_spacing``, Chebyshev norm): candidates are walked by
  descending value, ties in raster order (stable sort of ``np.nonzero``); each
  kept peak rejects the later candidates at Chebyshev distance **strictly less
  than** r (two equal peaks exactly r apart are both kept). For r <= 1 no
  spacing is applied, which the strict rule gives as well.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "KEYPOINT_RULES",
    "argmax_cuts",
    "peak_mask",
    "top_k_peaks",
    "topk_mean_cuts",
    "topk_weighted_cuts",
    "upsample_maps",
]

KEYPOINT_RULES = ("reference", "clean")

_NEG_INF = float("-inf")


# ----------------------------------------------------------------------------- checks


def _check_maps(maps: Tensor) -> Tensor:
    """Return maps as a floating tensor of shape (N, H, W) with H, W >= 1."""
    if not isinstance(maps, Tensor) or maps.dim() != 3:
        shape = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise ValueError(f"maps must be a tensor of shape (N, H, W), got {shape}")
    if maps.shape[1] < 1 or maps.shape[2] < 1:
        raise ValueError(f"maps must have a non-empty spatial size, got {tuple(maps.shape)}")
    # -inf fills and comparisons need a floating dtype.
    return maps if maps.is_floating_point() else maps.float()


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_rule(keypoint_rule: str) -> str:
    if keypoint_rule not in KEYPOINT_RULES:
        raise ValueError(f"keypoint_rule must be one of {KEYPOINT_RULES}, got {keypoint_rule!r}")
    return keypoint_rule


def _centres(maps: Tensor) -> Tensor:
    """(N, 2) long image centres (H // 2, W // 2): the fallback cut."""
    _, height, width = maps.shape
    centre = torch.tensor([height // 2, width // 2], dtype=torch.long, device=maps.device)
    return centre.expand(maps.shape[0], 2)


def _sizes(maps: Tensor) -> Tensor:
    """(2,) long (H, W) on the maps' device, to compare cuts against."""
    return torch.tensor(maps.shape[1:], dtype=torch.long, device=maps.device)


def _unravel(flat_index: Tensor, width: int) -> Tensor:
    """Flat raster indices (...) -> (..., 2) long (y, x)."""
    return torch.stack((flat_index // width, flat_index % width), dim=-1)


# ----------------------------------------------------------------------------- public API


def upsample_maps(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinearly resize (N, h, w) maps to (N, H, W), align_corners=False like the reference.

    The reference's cv2.resize INTER_LINEAR computes the same formula; the results differ by up to one
    float32 ulp of the maps' scale (tests/test_keypoints.py), which can break near-ties differently.
    """
    maps = _check_maps(maps)
    if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size):
        raise ValueError(f"size must be two positive integers (H, W), got {size!r}")
    if maps.shape[0] == 0:
        return maps.new_zeros((0, *size))
    return F.interpolate(maps[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def _sliding_max(x: Tensor, radius: int, dim: int) -> Tensor:
    """Max over [i - radius, i + radius] along `dim`, the window clipped at the ends.

    Doubling (sparse-table) scheme: maxima over windows of width 1, 2, 4, ... are
    built from two shifted copies, and two overlapping power-of-two windows cover
    the 2r+1 window. That is O(log r) elementwise passes instead of O(r) reads per
    pixel (cheaper than max_pool2d at the reference's r=20 on CPU). -inf padding gives the
    same maximum as scipy's mode='nearest' (edge pixels are inside the window).
    """
    if radius == 0:
        return x
    length = x.shape[dim]
    pad_shape = list(x.shape)
    pad_shape[dim] = radius
    pad = x.new_full(pad_shape, _NEG_INF)
    running = torch.cat((pad, x, pad), dim=dim)
    width = 2 * radius + 1
    span = 1  # running[j] = max(padded[j : j + span])
    while 2 * span <= width:
        keep = running.shape[dim] - span
        running = torch.maximum(running.narrow(dim, 0, keep), running.narrow(dim, span, keep))
        span *= 2
    return torch.maximum(running.narrow(dim, 0, length), running.narrow(dim, width - span, length))


def _window_max(maps: Tensor, radius: int) -> Tensor:
    """Separable (2r+1)x(2r+1) maximum filter: rows then columns."""
    return _sliding_max(_sliding_max(maps, radius, dim=1), radius, dim=2)


def peak_mask(maps: Tensor, min_distance: int) -> Tensor:
    """(N, H, W) bool: skimage ``peak_local_max(map, min_distance)`` candidates, before spacing.

    See the module docstring for the exact rules (window maximum, strictly above
    the map's minimum, border of width ``min_distance`` excluded).
    """
    maps = _check_maps(maps)
    radius = _check_int("min_distance", min_distance, 0)
    n, height, width = maps.shape
    if n == 0:
        return torch.zeros(maps.shape, dtype=torch.bool, device=maps.device)
    above_min = maps > maps.flatten(1).amin(dim=1).view(n, 1, 1)
    if radius == 0:
        # skimage: a one-pixel footprint reduces to `image > threshold`; no trivial rule, no border.
        return above_min
    mask = maps == _window_max(maps, radius)
    mask &= above_min  # also enforces skimage's "trivial image" rule (see module docstring)
    mask[:, :radius] = False
    mask[:, max(height - radius, 0):] = False
    mask[:, :, :radius] = False
    mask[:, :, max(width - radius, 0):] = False
    return mask


def _window_indices(index: Tensor, offsets: Tensor, height: int, width: int) -> Tensor:
    """(N, len(offsets)**2) flat indices of the square window around each flat `index`.

    Coordinates are clamped to the image: a clamped pixel is still inside the
    window, so the repeats only write -inf twice. This touches O(N r^2) pixels
    instead of building an (N, H, W) mask per round.
    """
    ys = (index // width)[:, None] + offsets
    xs = (index % width)[:, None] + offsets
    ys, xs = ys.clamp(0, height - 1), xs.clamp(0, width - 1)
    return (ys[:, :, None] * width + xs[:, None, :]).flatten(1)


def top_k_peaks(maps: Tensor, k: int, min_distance: int) -> tuple[Tensor, Tensor, Tensor]:
    """The k highest spaced peaks of each map, highest first, as skimage would return them.

    Returns ``coords`` (N, k, 2) long (y, x), ``values`` (N, k) the maps' values
    there, and ``valid`` (N, k) bool. A map with fewer than k peaks has its
    trailing entries invalid, with coords and values set to 0.

    skimage walks the candidates by descending value (ties in raster order) and
    each kept peak rejects the later ones within Chebyshev distance < min_distance.
    The next kept peak is therefore always the maximum of the candidates not yet
    rejected, first in raster order on ties -- exactly what ``argmax`` returns --
    so k batched rounds of argmax + window suppression give the same list.
    """
    maps = _check_maps(maps)
    k = _check_int("k", k, 1)
    radius = _check_int("min_distance", min_distance, 0)
    n, height, width = maps.shape
    scores = maps.masked_fill(~peak_mask(maps, radius), _NEG_INF).reshape(n, height * width)
    # Offsets of the suppression window: skimage rejects at Chebyshev distance < min_distance.
    reach = max(radius - 1, 0)
    offsets = torch.arange(-reach, reach + 1, device=maps.device)
    picks, bests = [], []
    for round_ in range(k):
        index = scores.argmax(dim=1)  # first maximal value on ties = raster order
        picks.append(index)
        bests.append(scores.gather(1, index[:, None])[:, 0])
        if round_ == k - 1:
            break
        scores.scatter_(1, _window_indices(index, offsets, height, width), _NEG_INF)
    best = torch.stack(bests, dim=1)
    valid = best > _NEG_INF
    coords = _unravel(torch.stack(picks, dim=1), width) * valid[..., None]
    values = torch.where(valid, best, torch.zeros((), dtype=best.dtype, device=best.device))
    return coords, values, valid


# ----------------------------------------------------------------------------- cut positions


def _reference_cuts(maps: Tensor, cuts: Tensor, no_point: Tensor) -> Tensor:
    """The reference's fallback: the centre when there is no point or a coordinate is 0.

    Coordinates < 0 or >= size also get the centre. The reference never produces
    them from CAMs (values >= 0); only maps with negative values could, through
    rule B's weights, and a cut there would leave the image.
    """
    outside = ((cuts <= 0) | (cuts >= _sizes(maps))).any(dim=1)
    return torch.where((no_point | outside)[:, None], _centres(maps), cuts)


def _clean_cuts(maps: Tensor, cuts: Tensor, no_point: Tensor) -> Tensor:
    """Our variant's fallback: the centre only when there is no point, otherwise clamp into [1, size - 1]."""
    clamped = torch.minimum(cuts.clamp_min(1), _sizes(maps) - 1)
    return torch.where(no_point[:, None], _centres(maps), clamped)


def argmax_cuts(maps: Tensor, keypoint_rule: str = "reference") -> Tensor:
    """(N, 2) long cut at each map's maximum, the first in raster order on ties (Max, cMax).

    reference: a maximum on row 0 or column 0 (which includes every all-zero map,
    whose argmax is pixel 0) -> the centre. clean: the centre when the maximum is
    <= 0 (no activation), otherwise the argmax clamped into [1, size - 1].
    """
    maps = _check_maps(maps)
    rule = _check_rule(keypoint_rule)
    flat = maps.flatten(1)
    index = flat.argmax(dim=1)  # torch documents: first maximal value on ties, like np.argmax
    cuts = _unravel(index, maps.shape[2])
    if rule == "reference":
        return _reference_cuts(maps, cuts, torch.zeros_like(index, dtype=torch.bool))
    return _clean_cuts(maps, cuts, flat.gather(1, index[:, None])[:, 0] <= 0)


def topk_mean_cuts(maps: Tensor, k: int, min_distance: int, keypoint_rule: str = "reference",
                   radius: int = 128) -> Tensor:
    """(N, 2) long cut at the mean of the highest peaks (rule A, cTopk).

    reference: with at most k peaks, keep those within Euclidean distance < radius
    of the map's argmax; with more than k, look at the top k only and test
    (py - ay)^2 + (py - ax)^2 < radius^2 -- the official script compares the
    peak's y with the argmax's x in that branch, reproduced here. The cut is the
    integer floor mean of the kept peaks; no peak, none kept or a 0 coordinate ->
    centre. clean: the floor of the mean of the top min(k, #peaks) peaks, no
    distance filter, clamped; no peak -> centre.
    """
    maps = _check_maps(maps)
    k = _check_int("k", k, 1)
    rule = _check_rule(keypoint_rule)
    radius = _check_int("radius", radius, 0)
    if rule == "clean":
        coords, _, keep = top_k_peaks(maps, k, min_distance)
    else:
        # k + 1 rounds: whether a (k+1)-th peak exists decides the branch (and the slip)
        coords, _, valid = top_k_peaks(maps, k + 1, min_distance)
        more_than_k = valid[:, k:k + 1]
        coords, valid = coords[:, :k], valid[:, :k]
        anchor = _unravel(maps.flatten(1).argmax(dim=1), maps.shape[2])[:, None, :]  # (N, 1, 2)
        peak_y, peak_x = coords[..., 0], coords[..., 1]
        x_term = torch.where(more_than_k, peak_y, peak_x)  # the reference's slip
        squared = (peak_y - anchor[..., 0]) ** 2 + (x_term - anchor[..., 1]) ** 2
        keep = valid & (squared < radius * radius)
    count = keep.sum(dim=1)
    sums = (coords * keep[..., None]).sum(dim=1)
    # floor of a mean of integers == integer floor division of their sum: exact, no float
    means = torch.div(sums, count.clamp_min(1)[:, None], rounding_mode="floor")
    finish = _reference_cuts if rule == "reference" else _clean_cuts
    return finish(maps, means, count == 0)


def topk_weighted_cuts(maps: Tensor, k: int, min_distance: int, keypoint_rule: str = "reference") -> Tensor:
    """(N, 2) long cut at the value-weighted mean of the top min(k, #peaks) peaks (rule B, cTopk-w).

    reference, step by step as the official script computes it (numpy 2 types):
    S = sum of the peak values accumulated one by one in the maps' dtype
    (float32 for CAMs; highest value first -- the order of both of the
    reference's branches up to ties, which do not change the sum); every term
    py_i * w_i / S is evaluated in float64 and truncated toward zero before the
    terms are summed. No peak or a 0 coordinate -> centre; a non-positive S
    (impossible for CAMs, whose peaks are > 0) -> centre instead of a division
    by zero. clean: sum(w_i p_i) / sum(w_i) in float64 floored once and
    clamped; the plain mean when the weights do not sum to a positive number;
    no peak -> centre.
    """
    maps = _check_maps(maps)
    k = _check_int("k", k, 1)
    rule = _check_rule(keypoint_rule)
    coords, values, valid = top_k_peaks(maps, k, min_distance)
    no_peak = ~valid[:, 0]
    if rule == "clean":
        return _clean_cuts(maps, _clean_weighted_means(coords, values, valid), no_peak)
    total = values.new_zeros(values.shape[0])
    for rank in range(k):  # sequential, in the values' dtype; invalid entries add an exact 0
        total = total + values[:, rank]
    usable = total > 0
    divisor = torch.where(usable, total, torch.ones_like(total)).to(torch.float64)[:, None, None]
    terms = coords.to(torch.float64) * values.to(torch.float64)[..., None] / divisor
    cuts = torch.trunc(terms).long().sum(dim=1)  # int() of every term, then the sum
    return _reference_cuts(maps, cuts, no_peak | ~usable)


def _clean_weighted_means(coords: Tensor, values: Tensor, valid: Tensor) -> Tensor:
    """(N, 2) long floor of the value-weighted mean of the valid peaks (plain mean if unusable weights)."""
    counts = valid.to(torch.float64)
    weights = values.to(torch.float64) * counts
    usable = weights.sum(dim=1, keepdim=True) > 0
    weights = torch.where(usable, weights, counts)
    total = weights.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    means = (weights[..., None] * coords.to(torch.float64)).sum(dim=1) / total
    return means.floor().long()
