"""OASS, Max: cut each image at the argmax of its merged CAM; student tiles, all labels; CSI head.

Keypoint: core/keypoints.py argmax_cuts on the merged, upsampled CAM (core/strategies.py build_tasks).
Losses: core/step.py loss_terms (classification_loss, puzzle_losses and their weights).
"""
from core.trainer import main

# --demo only: from the demo backbone the faithful Max stays at chance, and only Puzzle-CAM's head and tile calls
# together let it learn (the measurements: docs/miniature.md, Max).
DEMO_RECIPE = {"head": "gap", "tile_calls": "batch"}
DEFAULTS = {"description": __doc__, "strategy": "max", "head": "csi", "alpha_re": 3.0, "alpha_schedule_re": 0.05,
            "alpha_p": 0.5, "demo_recipe": DEMO_RECIPE}

if __name__ == "__main__":
    main(DEFAULTS)
