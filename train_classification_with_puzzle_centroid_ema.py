"""OASS with a plug-in keypoint: the CAM-weighted centroid of each class's CAM; EMA teacher; CSI head.

Keypoint: strategies/centroid.py centroid_keypoints (the worked example of docs/extending.md).
Losses and loss weights: those of the cTopk-w script (core/step.py loss_terms).
"""
import strategies.centroid  # noqa: F401  registers --strategy centroid before the parser is built
from core.trainer import main

DEFAULTS = {"description": __doc__, "strategy": "centroid", "head": "csi", "alpha_re": 3.0, "alpha_schedule_re": 0.05,
            "alpha_p": 0.5}

if __name__ == "__main__":
    main(DEFAULTS)
