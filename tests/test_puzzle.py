import pytest
import torch
import torch.nn.functional as F

from core.puzzle import (
    grid_cuts_from_pixel_cuts,
    nearest_source_index,
    split_at_keypoints,
    stitch_tiles,
)


def puzzlecam_tiles(x: torch.Tensor) -> torch.Tensor:
    """Puzzle-CAM's fixed 2x2 tiling, piece-major: all top-left tiles of the batch, then top-right, ..."""
    h, w = x.shape[2] // 2, x.shape[3] // 2
    return torch.cat([p for rows in torch.split(x, h, dim=2) for p in torch.split(rows, w, dim=3)])


def puzzlecam_merge(tiles: torch.Tensor, batch: int) -> torch.Tensor:
    tl, tr, bl, br = torch.split(tiles, batch)
    return torch.cat([torch.cat([tl, tr], dim=3), torch.cat([bl, br], dim=3)], dim=2)


def task_major(piece_major: torch.Tensor, batch: int) -> torch.Tensor:
    return piece_major.reshape(4, batch, *piece_major.shape[1:]).transpose(0, 1).reshape(piece_major.shape)


def test_centre_cut_equals_puzzlecam_tiling():
    torch.manual_seed(0)
    images = torch.randn(3, 3, 64, 96)
    index = torch.arange(3)
    cuts = torch.tensor([[32, 48]] * 3)
    tiles = split_at_keypoints(images, index, cuts)
    assert torch.equal(tiles, task_major(puzzlecam_tiles(images), 3))

    tile_maps = torch.randn(12, 20, 2, 3)
    stitched = stitch_tiles(tile_maps, grid_cuts_from_pixel_cuts(cuts), (4, 6))
    piece_major = tile_maps.reshape(3, 4, 20, 2, 3).transpose(0, 1).reshape(12, 20, 2, 3)
    assert torch.equal(stitched, puzzlecam_merge(piece_major, 3))


@pytest.mark.parametrize("cut", [(16, 16), (20, 70), (47, 33), (48, 80), (31, 64)])
def test_split_matches_crop_and_interpolate(cut):
    torch.manual_seed(1)
    images = torch.randn(2, 3, 64, 96)
    y, x = cut
    tiles = split_at_keypoints(images, torch.tensor([1]), torch.tensor([cut]))
    crops = [images[1:, :, :y, :x], images[1:, :, :y, x:], images[1:, :, y:, :x], images[1:, :, y:, x:]]
    for q, crop in enumerate(crops):
        expected = F.interpolate(crop, size=(32, 48), mode="nearest")
        assert torch.equal(tiles[q : q + 1], expected), q


@pytest.mark.parametrize("grid_cut", [(1, 1), (2, 5), (3, 3), (1, 5)])
def test_stitch_matches_interpolate_and_concatenate(grid_cut):
    torch.manual_seed(2)
    tile_maps = torch.randn(4, 5, 2, 3)
    gy, gx = grid_cut
    h, w = 4, 6
    sizes = [(gy, gx), (gy, w - gx), (h - gy, gx), (h - gy, w - gx)]
    parts = [F.interpolate(tile_maps[q : q + 1], size=s, mode="nearest") for q, s in enumerate(sizes)]
    expected = torch.cat([torch.cat(parts[:2], dim=3), torch.cat(parts[2:], dim=3)], dim=2)
    assert torch.equal(stitch_tiles(tile_maps, torch.tensor([grid_cut]), (h, w)), expected)


def test_nearest_rule_equals_interpolate_for_many_sizes():
    for in_size in range(1, 70, 3):
        for out_size in (1, 7, 16, 32, 48, 64, 256, 255):
            src = torch.arange(in_size, dtype=torch.float32)[None, None]
            expected = F.interpolate(src, size=out_size, mode="nearest")[0, 0].long()
            got = nearest_source_index(torch.arange(out_size), torch.tensor(in_size), torch.tensor(out_size))
            assert torch.equal(got, expected), (in_size, out_size)


def test_split_then_stitch_round_trips_identity_cells():
    """Cutting a map exactly on grid lines and stitching the tiles of a per-pixel identity brings it back."""
    torch.manual_seed(3)
    h, w = 8, 12
    # cuts on the grid of an image whose "pixels" are the feature cells (stride 1)
    for gy, gx in [(4, 6), (2, 9), (7, 1), (3, 3)]:
        fmap = torch.randn(2, 5, h, w)
        tiles = split_at_keypoints(fmap, torch.tensor([0, 1]), torch.tensor([[gy, gx], [gy, gx]]))
        back = stitch_tiles(tiles, torch.tensor([[gy, gx], [gy, gx]]), (h, w))
        # nearest down- and up-sampling keeps the cells the tiles sampled; at the centre it is exact
        if (gy, gx) == (h // 2, w // 2):
            assert torch.equal(back, fmap)
        # every stitched value comes from the same quadrant of the original map
        top = back[:, :, :gy]
        assert set(top[:, :, :, :gx].flatten().tolist()) <= set(fmap[:, :, :gy, :gx].flatten().tolist())
        assert set(back[:, :, gy:, gx:].flatten().tolist()) <= set(fmap[:, :, gy:, gx:].flatten().tolist())


def test_split_and_stitch_carry_gradients():
    images = torch.randn(2, 3, 32, 32, requires_grad=True)
    tiles = split_at_keypoints(images, torch.tensor([0, 1, 1]), torch.tensor([[16, 16], [16, 20], [18, 16]]))
    tiles.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    maps = torch.randn(12, 4, 1, 1, requires_grad=True)
    stitch_tiles(maps, torch.tensor([[1, 1]] * 3), (2, 2)).sum().backward()
    assert torch.equal(maps.grad, torch.ones_like(maps))


def test_grid_cut_is_floor_division_with_zero_replaced_by_one():
    cuts = torch.tensor([[1, 1], [15, 16], [16, 15], [31, 32], [256, 256], [511, 1], [100, 479]])
    expected = [[1, 1], [1, 1], [1, 1], [1, 2], [16, 16], [31, 1], [6, 29]]
    assert grid_cuts_from_pixel_cuts(cuts).tolist() == expected
    assert grid_cuts_from_pixel_cuts(torch.tensor([[40, 7]]), stride=8).tolist() == [[5, 1]]


@pytest.mark.parametrize("cut", [(1, 1), (1, 95), (63, 1), (63, 95), (1, 48), (32, 95)])
def test_extreme_cuts_leave_one_pixel_quadrants(cut):
    """Cuts at 1 and at size - 1: the thin quadrants are one pixel wide, resized like any other."""
    torch.manual_seed(4)
    images = torch.randn(2, 3, 64, 96)
    y, x = cut
    tiles = split_at_keypoints(images, torch.tensor([0]), torch.tensor([cut]))
    crops = [images[:1, :, :y, :x], images[:1, :, :y, x:], images[:1, :, y:, :x], images[:1, :, y:, x:]]
    for q, crop in enumerate(crops):
        assert torch.equal(tiles[q : q + 1], F.interpolate(crop, size=(32, 48), mode="nearest")), q
    # the grid cut of an extreme pixel cut, stitched back on a 4 x 6 grid (stride 16)
    gy, gx = grid_cuts_from_pixel_cuts(torch.tensor([cut]))[0].tolist()
    tile_maps = torch.randn(4, 5, 2, 3)
    sizes = [(gy, gx), (gy, 6 - gx), (4 - gy, gx), (4 - gy, 6 - gx)]
    parts = [F.interpolate(tile_maps[q : q + 1], size=s, mode="nearest") for q, s in enumerate(sizes)]
    expected = torch.cat([torch.cat(parts[:2], dim=3), torch.cat(parts[2:], dim=3)], dim=2)
    assert torch.equal(stitch_tiles(tile_maps, torch.tensor([[gy, gx]]), (4, 6)), expected)
