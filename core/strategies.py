"""Keypoint strategies: from the student's CAMs and the labels to the batch's puzzle tasks.

A task is (image, keypoint, target). Image-level strategies make one task per image with all its
labels as target; channel-wise ones (the Class-Specific Instances) make one task per
(image, positive class) with a one-hot target.

A strategy is one registered `Strategy` object: its keypoint function, how its tasks are formed, its
display name and its marker in visualize_cams.py. The built-in ones are registered below. A plug-in
strategy is one file in the repo's `strategies/` folder that imports this module and calls
`register_strategy`; core/plugins.py imports every such file, explicitly, before the registry is read
(core/config.py for the `--strategy` choices and every tool, core/localisation.py for the hit rates), so
training, the hit rates, visualize_cams.py and the tools that read a run's strategy from its checkpoint
all see it without any edit here (docs/extending.md). This module imports no plug-in: no import cycle.
"""
from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from core.keypoints import argmax_cuts, topk_mean_cuts, topk_weighted_cuts, upsample_maps
from tools.errors import UserError


@dataclass(frozen=True)
class KeypointContext:
    """What a keypoint function may read besides the maps: the run's keypoint flags."""

    k: int  # --k
    min_distance: int  # --min_distance
    keypoint_rule: str  # --keypoint_rule: reference | clean
    radius: int  # cTopk's distance filter in input pixels (128 at 512 px)


# the keypoint flags' defaults (--k, --min_distance, --keypoint_rule; the parser reads them from here) and the
# reference's cTopk radius at its 512 px
KEYPOINT_DEFAULTS = KeypointContext(k=5, min_distance=20, keypoint_rule="reference", radius=128)

# (N, H, W) float maps upsampled to the input size -> (N, 2) long (y, x) cuts, each in [1, size - 1]
KeypointFunction = Callable[[Tensor, KeypointContext], Tensor]
INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
CONTRACT = "docs/extending.md#the-keypoint-function"


class KeypointError(UserError):
    """A strategy's keypoint function raised or broke its contract: one line naming the strategy and the rule."""


@dataclass(frozen=True)
class Marker:
    """How visualize_cams.py draws a strategy's keypoint."""

    label: str  # legend text
    shape: str  # a cv2 marker without its prefix: cross, tilted_cross, star, diamond, square, triangle_up/down
    colour: tuple[int, int, int]  # RGB


@dataclass(frozen=True)
class Strategy:
    name: str
    summary: str
    puzzle: bool  # whether there is an auxiliary task at all
    per_class: bool  # one task per (image, positive class) with a one-hot target
    # The cut of each task from its map upsampled to the input (per class, or merged over the image's
    # classes on the h x w grid for an image-level strategy); None = the image centre (Puzzle-CAM).
    keypoints: KeypointFunction | None
    patch_network: str  # default network for the tiles: student | teacher
    # How the tiles meet the patch network (--tile_calls): "batch" = all tiles of a batch in one call,
    # ordered by quadrant (Puzzle-CAM); "task" = one call of 4 tiles per task (the OASS scripts). It
    # decides the BatchNorm grouping of the tiles (core/batchnorm.py).
    tile_calls: str = "task"
    display_name: str = ""  # in logs and tables (default: the name)
    marker: Marker | None = None  # None: not drawn by visualize_cams.py
    module: str = __name__  # the module that registered it: a plug-in's file, for error messages

    @property
    def title(self) -> str:
        return self.display_name or self.name

    @property
    def cuts_at_keypoint(self) -> bool:
        """Whether its cut depends on the CAM: it then has a hit rate and a tile split worth drawing."""
        return self.puzzle and self.keypoints is not None

    @property
    def plugin(self) -> bool:
        """Registered by a module other than this one (a file of strategies/, or a test)."""
        return self.module != __name__

    def keypoint_error(self, rule: str) -> KeypointError:
        return KeypointError(f"strategy {self.name} ({self.module}): {rule}; fix its keypoint function ({CONTRACT})")


STRATEGIES: dict[str, Strategy] = {}


def register_strategy(strategy: Strategy) -> Strategy:
    """Add `strategy` to STRATEGIES (registration order is the order of logs and figures).

    Registering the same name again from the same module replaces it (a re-imported plug-in); a name
    taken by another module is refused, so a plug-in cannot silently shadow a built-in strategy.
    """
    if not strategy.name or not strategy.name.replace("_", "").isalnum():
        raise ValueError(f"a strategy name must be letters, digits and _, got {strategy.name!r}")
    if strategy.puzzle and strategy.patch_network not in ("student", "teacher"):
        raise ValueError(f"strategy {strategy.name}: patch_network must be student or teacher")
    if strategy.tile_calls not in ("task", "batch"):
        raise ValueError(f"strategy {strategy.name}: tile_calls must be task or batch")
    known = STRATEGIES.get(strategy.name)
    if known is not None and known.module != strategy.module:
        raise ValueError(f"strategy {strategy.name!r} of {strategy.module} is already registered by {known.module}")
    STRATEGIES[strategy.name] = strategy
    return strategy


# ----------------------------------------------------------------------------- the built-in strategies
def argmax_keypoints(maps: Tensor, ctx: KeypointContext) -> Tensor:
    return argmax_cuts(maps, ctx.keypoint_rule)


def topk_mean_keypoints(maps: Tensor, ctx: KeypointContext) -> Tensor:
    return topk_mean_cuts(maps, ctx.k, ctx.min_distance, ctx.keypoint_rule, ctx.radius)


def topk_weighted_keypoints(maps: Tensor, ctx: KeypointContext) -> Tensor:
    return topk_weighted_cuts(maps, ctx.k, ctx.min_distance, ctx.keypoint_rule)


for _builtin in (
    Strategy("none", "plain classification (class loss only)", False, False, None, "student",
             display_name="plain"),
    Strategy("puzzle", "Puzzle-CAM: centre cut, student tiles, all labels", True, False, None, "student",
             tile_calls="batch", display_name="Puzzle-CAM", marker=Marker("centre", "triangle_up", (200, 200, 200))),
    Strategy("max", "argmax of the merged CAM, student tiles, all labels", True, False, argmax_keypoints, "student",
             display_name="Max", marker=Marker("Max", "cross", (255, 255, 255))),
    Strategy("cmax", "argmax of each class's CAM, EMA-teacher tiles, one-hot", True, True, argmax_keypoints,
             "teacher", display_name="cMax", marker=Marker("cMax", "tilted_cross", (255, 0, 255))),
    Strategy("ctopk", "mean of each class's top-k CAM peaks, EMA teacher, one-hot", True, True,
             topk_mean_keypoints, "teacher", display_name="cTopk", marker=Marker("cTopk", "square", (0, 255, 255))),
    Strategy("ctopk_w", "CAM-weighted mean of the top-k peaks, EMA teacher, one-hot", True, True,
             topk_weighted_keypoints, "teacher", display_name="cTopk-w",
             marker=Marker("cTopk-w", "diamond", (0, 255, 0))),
):
    register_strategy(_builtin)


@dataclass
class Tasks:
    image_index: torch.Tensor  # (N,) long: the image each task cuts
    keypoints: torch.Tensor  # (N, 2) long (y, x) cut positions in input pixels, each in [1, size - 1]
    targets: torch.Tensor  # (N, C) float
    # 0-dim long on the keypoints' device: how many of the strategy's cuts lay outside [1, size - 1] (those
    # are clamped in `keypoints`); None for the fixed centre. Read it where the caller syncs anyway.
    outside: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.image_index.shape[0])

    def check_inside(self, strategy: Strategy) -> None:
        """Raise KeypointError if a cut lay outside [1, size - 1] (reads the count: a host sync)."""
        count = int(self.outside) if self.outside is not None else 0
        if count:
            raise strategy.keypoint_error(outside_rule(count, len(self)))


def outside_rule(count: int, total: int) -> str:
    """The range rule, as a violation of it is reported."""
    return (f"its (y, x) cuts must lie in [1, size - 1] (a cut at 0 or at the full size leaves a tile empty), "
            f"{count} of {total} did not")


def checked_cuts(strategy: Strategy, maps: Tensor, ctx: KeypointContext) -> Tensor:
    """The strategy's cuts of `maps`, their type, shape, dtype and device checked (metadata only: no sync).

    A plug-in's exception becomes a KeypointError naming the strategy and where it was raised; a built-in
    strategy's propagates as it is (a bug, with its traceback).
    """
    if not strategy.plugin:
        cuts = strategy.keypoints(maps, ctx)
    else:
        try:
            cuts = strategy.keypoints(maps, ctx)
        except Exception as exc:
            frames = traceback.extract_tb(exc.__traceback__)
            home = getattr(getattr(strategy.keypoints, "__code__", None), "co_filename", None)
            frame = ([f for f in frames if f.filename == home] or frames)[-1]  # the deepest line of the plug-in
            message = " ".join(str(exc).split())
            raise strategy.keypoint_error(f"its keypoint function raised {type(exc).__name__}: {message} (at "
                                          f"{Path(frame.filename).name}:{frame.lineno})") from exc
    if not isinstance(cuts, Tensor):
        raise strategy.keypoint_error(f"it must return a torch.Tensor of (y, x) cuts, got {type(cuts).__name__}")
    if tuple(cuts.shape) != (maps.shape[0], 2):
        raise strategy.keypoint_error(f"its cuts must have shape (N, 2), one (y, x) row per map, got "
                                      f"{tuple(cuts.shape)} for N = {maps.shape[0]}")
    if cuts.dtype not in INTEGER_DTYPES:
        raise strategy.keypoint_error(f"its cuts must be integer pixel positions (torch.int64), got {cuts.dtype}")
    if cuts.device != maps.device:
        raise strategy.keypoint_error(f"its cuts must be on the maps' device ({maps.device}), got {cuts.device}")
    return cuts


def inside_cuts(cuts: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """(cuts clamped into [1, size - 1] as int64, how many were outside as a 0-dim tensor): device ops only.

    A cut already inside is unchanged. One outside is clamped only so that the step that uses it stays
    inside the image until its caller reads the count and stops (the trainer does at its next sync).
    """
    cuts = cuts.long()
    inside = torch.stack((cuts[:, 0].clamp(1, height - 1), cuts[:, 1].clamp(1, width - 1)), dim=1)
    return inside, (inside != cuts).any(dim=1).sum()


def task_pairs(labels_cpu: torch.Tensor, per_class: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(image index, class index or None) of every task; computed on the CPU labels to avoid a device sync."""
    if per_class:
        image_index, class_index = labels_cpu.nonzero(as_tuple=True)
        return image_index, class_index
    return torch.arange(labels_cpu.shape[0]), None


def build_tasks(strategy: Strategy, cams: torch.Tensor, labels: torch.Tensor, labels_cpu: torch.Tensor,
                image_size: tuple[int, int], k: int = KEYPOINT_DEFAULTS.k,
                min_distance: int = KEYPOINT_DEFAULTS.min_distance,
                keypoint_rule: str = KEYPOINT_DEFAULTS.keypoint_rule, radius: int = KEYPOINT_DEFAULTS.radius) -> Tasks:
    """Tasks of a batch from its (detached) CAMs (B, C, h, w) and labels (B, C) on the CAMs' device.

    The keypoints are the cut positions themselves (core.keypoints' rules, `keypoint_rule`
    reference or clean). The strategy's contract is checked here: its result's shape, dtype and device on
    the host (a violation raises KeypointError), its range on the device (`Tasks.outside`, no sync).
    """
    device = cams.device
    image_index, class_index = task_pairs(labels_cpu, strategy.per_class)
    image_index = image_index.to(device, non_blocking=True)
    if class_index is not None:
        class_index = class_index.to(device, non_blocking=True)
        targets = F.one_hot(class_index, labels.shape[1]).to(labels.dtype)
    else:
        targets = labels
    height, width = image_size
    if strategy.keypoints is None:
        centre = torch.empty((len(image_index), 2), dtype=torch.long, device=device)
        centre[:, 0], centre[:, 1] = height // 2, width // 2  # filled on the device: no copy, no sync
        return Tasks(image_index, centre, targets)
    if class_index is not None:  # cMax / cTopk / cTopk-w: each positive class's map upsampled on its own
        maps = cams[image_index, class_index]
    else:  # Max: merge on the h x w grid (max over the positive classes), then one upsample
        maps = (cams * labels[:, :, None, None]).amax(dim=1)
    maps = upsample_maps(maps.float(), (height, width))
    cuts = checked_cuts(strategy, maps, KeypointContext(k, min_distance, keypoint_rule, radius))
    keypoints, outside = inside_cuts(cuts, height, width)
    return Tasks(image_index, keypoints, targets, outside)
