"""OASS, Max: cut each image at the argmax of its merged CAM; student tiles, all labels; CSI head.

Keypoint: core/keypoints.py argmax_cuts on the merged, upsampled CAM (core/strategies.py build_tasks).
Losses: core/losses.py classification_loss and puzzle_losses, weighted in core/step.py forward_losses.
"""
from core.trainer import main

# --demo only (README, Results): from random weights the faithful Max, whose tile losses train the student's class
# maps through per-image BatchNorm calls beside the CSI head, stayed near chance in every recipe we tried; the
# demo trains Max's keypoints and tasks with Puzzle-CAM's head, tile calls and step size instead.
DEMO_RECIPE = {"head": "gap", "reference_gpus": 1, "tile_calls": "batch", "lr": 0.01}
DEFAULTS = {"description": __doc__, "strategy": "max", "head": "csi", "alpha_re": 3.0, "alpha_schedule_re": 0.05,
            "alpha_p": 0.5, "demo_recipe": DEMO_RECIPE}

if __name__ == "__main__":
    main(DEFAULTS)
