"""Baseline: Puzzle-CAM (fixed 2x2 centre cut, student tiles, all labels, GAP head).

Keypoint: the centre (core/strategies.py build_tasks). Losses: core/losses.py classification_loss and
puzzle_losses (p_class + re), weighted in core/step.py forward_losses.
"""
from core.trainer import main

DEFAULTS = {"description": __doc__, "strategy": "puzzle", "head": "gap", "alpha_re": 4.0, "alpha_schedule_re": 0.5,
            "alpha_p": 1.0}

if __name__ == "__main__":
    main(DEFAULTS)
