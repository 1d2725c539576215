"""Cut images into four tiles at per-task keypoints and stitch the tiles' class maps back.

Every function handles all tasks of a batch at once with index tensors; nearest resizing follows
PyTorch's own `F.interpolate(mode="nearest")` index rule exactly, so a centre cut reproduces
Puzzle-CAM's fixed 2x2 tiling bit for bit.
"""
from __future__ import annotations

import torch


def nearest_source_index(dst: torch.Tensor, in_size: torch.Tensor, out_size: torch.Tensor) -> torch.Tensor:
    """Source index that PyTorch's nearest interpolation reads for output index `dst`.

    The rule is min(floor(dst * float32(in / out)), in - 1), computed in float32 as ATen does.
    All arguments broadcast against each other.
    """
    scale = in_size.to(torch.float32) / out_size.to(torch.float32)
    src = torch.floor(dst.to(torch.float32) * scale).long()
    return torch.minimum(src, in_size.long() - 1)


def _quadrant_indices(cut: torch.Tensor, size: int, tile: int) -> torch.Tensor:
    """Source positions along one axis for the near (< cut) and far (>= cut) tile: (N, 2, tile)."""
    dst = torch.arange(tile, device=cut.device)[None, :]
    cut = cut[:, None]
    near = nearest_source_index(dst, cut, torch.full_like(cut, tile))
    far = cut + nearest_source_index(dst, size - cut, torch.full_like(cut, tile))
    return torch.stack([near, far], dim=1)


def split_at_keypoints(images: torch.Tensor, image_index: torch.Tensor, cuts: torch.Tensor) -> torch.Tensor:
    """Cut image `image_index[n]` at `cuts[n]` = (y, x) into 4 quadrants, each resized (nearest) to H/2 x W/2.

    Returns (4N, C, H/2, W/2), task-major, quadrants in the order top-left, top-right, bottom-left,
    bottom-right.
    """
    _, channels, height, width = images.shape
    tile_h, tile_w = height // 2, width // 2
    rows = _quadrant_indices(cuts[:, 0], height, tile_h)  # (N, 2, tile_h): top, bottom
    cols = _quadrant_indices(cuts[:, 1], width, tile_w)  # (N, 2, tile_w): left, right
    # quadrant q = 2 * vertical + horizontal
    row_idx = rows[:, [0, 0, 1, 1], :, None]  # (N, 4, tile_h, 1)
    col_idx = cols[:, [0, 1, 0, 1], None, :]  # (N, 4, 1, tile_w)
    pixels = images.permute(0, 2, 3, 1)  # gather whole pixels (all channels) at once
    tiles = pixels[image_index[:, None, None, None], row_idx, col_idx]  # (N, 4, tile_h, tile_w, C)
    return tiles.reshape(-1, tile_h, tile_w, channels).permute(0, 3, 1, 2)


def _stitch_indices(cut: torch.Tensor, size: int, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each output position along one axis: which side of the cut (0/1) and the source index in the tile."""
    pos = torch.arange(size, device=cut.device)[None, :]
    cut = cut[:, None]
    far = pos >= cut
    dst = torch.where(far, pos - cut, pos)
    out = torch.where(far, size - cut, cut)
    src = nearest_source_index(dst, torch.full_like(out, tile), out)
    return far.long(), src


def stitch_tiles(tile_maps: torch.Tensor, grid_cuts: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Inverse of `split_at_keypoints` on class maps: resize each tile's map (nearest) to its share
    of the `size` grid cut at `grid_cuts[n]` = (y, x) and assemble the four into one (N, C, h, w) map.
    """
    height, width = size
    _, channels, tile_h, tile_w = tile_maps.shape
    maps = tile_maps.reshape(-1, 4, channels, tile_h, tile_w).permute(0, 1, 3, 4, 2)  # (N, 4, th, tw, C)
    bottom, src_row = _stitch_indices(grid_cuts[:, 0], height, tile_h)  # (N, h)
    right, src_col = _stitch_indices(grid_cuts[:, 1], width, tile_w)  # (N, w)
    quadrant = 2 * bottom[:, :, None] + right[:, None, :]  # (N, h, w)
    task = torch.arange(maps.shape[0], device=maps.device)[:, None, None]
    stitched = maps[task, quadrant, src_row[:, :, None], src_col[:, None, :]]  # (N, h, w, C)
    return stitched.permute(0, 3, 1, 2)


def grid_cuts_from_pixel_cuts(cuts: torch.Tensor, stride: int = 16) -> torch.Tensor:
    """The feature-grid cut for a pixel cut, as the reference: (y // stride, x // stride), 0 replaced by 1.

    A pixel cut below `stride` still leaves its top/left quadrant one grid row/column.
    """
    return torch.div(cuts, stride, rounding_mode="floor").clamp_min(1)
