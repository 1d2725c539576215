"""CAM-centroid keypoint, the worked example of docs/extending.md.

Per (image, positive class): the CAM-weighted centroid of the class's map upsampled to the input,
sum(w * y) / sum(w) and sum(w * x) / sum(w), floored and clamped into [1, size - 1] so that no tile of
the puzzle split is empty. A map without activation (weights summing to 0 or less) is cut at the
centre, as the reference does when it finds no peak. Tiles go through the EMA teacher, one call per
task, as in the OASS scripts. The rule has no reference counterpart, so --keypoint_rule, --k and
--min_distance do not change it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from core.strategies import KeypointContext, Marker, Strategy, register_strategy


def centroid_keypoints(maps: Tensor, ctx: KeypointContext) -> Tensor:
    """(N, 2) long (y, x): each (N, H, W) map's CAM-weighted centroid, floored and clamped into [1, size - 1]."""
    n, height, width = maps.shape
    # float64: sums of 512 x 512 weights times coordinates up to 511 lose whole pixels in float32
    weights = maps.to(torch.float64)
    total = weights.sum(dim=(1, 2))
    ys = torch.arange(height, dtype=torch.float64, device=maps.device)
    xs = torch.arange(width, dtype=torch.float64, device=maps.device)
    usable = total > 0
    safe_total = torch.where(usable, total, torch.ones_like(total))  # no 0/0 for the maps without activation
    y = (weights.sum(dim=2) * ys).sum(dim=1) / safe_total
    x = (weights.sum(dim=1) * xs).sum(dim=1) / safe_total
    cuts = torch.stack((y, x), dim=1).floor().long()
    sizes = torch.tensor([height, width], dtype=torch.long, device=maps.device)
    cuts = torch.minimum(cuts.clamp_min(1), sizes - 1)
    centre = torch.tensor([height // 2, width // 2], dtype=torch.long, device=maps.device).expand(n, 2)
    return torch.where(usable[:, None], cuts, centre)


CENTROID = register_strategy(Strategy(
    name="centroid",
    summary="CAM-weighted centroid of each class's CAM, EMA-teacher tiles, one-hot",
    puzzle=True,
    per_class=True,
    keypoints=centroid_keypoints,
    patch_network="teacher",
    display_name="centroid",
    marker=Marker("centroid", "star", (255, 128, 0)),
    module=__name__,
))
