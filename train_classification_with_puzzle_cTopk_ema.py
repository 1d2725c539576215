"""OASS, cTopk: one task per positive class, cut at the mean of its top-k CAM peaks; EMA teacher; CSI head.

Keypoint: core/keypoints.py topk_mean_cuts (rule A, method.md section 3; core/strategies.py build_tasks).
Losses: core/step.py loss_terms (classification_loss, puzzle_losses and their weights).
"""
from core.trainer import main

DEFAULTS = {"description": __doc__, "strategy": "ctopk", "head": "csi", "alpha_re": 3.0, "alpha_schedule_re": 0.05,
            "alpha_p": 0.5}

if __name__ == "__main__":
    main(DEFAULTS)
