"""OASS, Max: cut each image at the argmax of its merged CAM; student tiles, all labels; CSI head.

Keypoint: core/keypoints.py argmax_cuts on the merged, upsampled CAM (core/strategies.py build_tasks).
Losses: core/losses.py classification_loss and puzzle_losses, weighted in core/step.py forward_losses.
"""
from core.trainer import main

DEFAULTS = {"description": __doc__, "strategy": "max", "head": "csi", "alpha_re": 3.0, "alpha_schedule_re": 0.05,
            "alpha_p": 0.5,
            # --demo only. The reference trains the student on one-tile BatchNorm chunks and lets its 16
            # per-image tile calls of every iteration overwrite the running statistics (method.md section 6).
            # With 64-px tiles of a random-init network that leaves a model that cannot be evaluated (demo
            # val mAP ~17%, chance 14.5%); one-GPU grouping, with the batch calls alone updating the
            # statistics, learns (measured: 32% after one epoch).
            "demo_recipe": {"patch_bn_update": "off", "reference_gpus": 1}}

if __name__ == "__main__":
    main(DEFAULTS)
