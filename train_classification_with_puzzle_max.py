"""OASS, Max: cut each image at the argmax of its merged CAM; student tiles, all labels; CSI head.

Keypoint: core/keypoints.py argmax_cuts on the merged, upsampled CAM (core/strategies.py build_tasks).
Losses: core/losses.py classification_loss and puzzle_losses, weighted in core/step.py forward_losses.
"""
from core.trainer import main

DEFAULTS = {"description": __doc__, "strategy": "max", "head": "csi", "alpha_re": 3.0, "alpha_schedule_re": 0.05,
            "alpha_p": 0.5}

if __name__ == "__main__":
    main(DEFAULTS)
