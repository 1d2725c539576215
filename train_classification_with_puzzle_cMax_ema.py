"""OASS, cMax: one task per positive class, cut at that class's CAM argmax; EMA-teacher tiles; CSI head.

Keypoint: core/keypoints.py argmax_cuts on each class's upsampled CAM (core/strategies.py build_tasks).
Losses: core/step.py loss_terms (classification_loss, puzzle_losses and their weights).
"""
from core.trainer import main

DEFAULTS = {"description": __doc__, "strategy": "cmax", "head": "csi", "alpha_re": 3.0, "alpha_schedule_re": 0.05,
            "alpha_p": 0.5}

if __name__ == "__main__":
    main(DEFAULTS)
