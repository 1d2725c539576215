"""Baseline: Puzzle-CAM (fixed 2x2 centre cut, student tiles, all labels, GAP head).

Keypoint: the centre (core/strategies.py build_tasks). Losses: core/step.py loss_terms
(classification_loss, puzzle_losses: p_class + re, and their weights).
"""
from core.trainer import main

DEFAULTS = {"description": __doc__, "strategy": "puzzle", "head": "gap", "alpha_re": 4.0, "alpha_schedule_re": 0.5,
            "alpha_p": 1.0}

if __name__ == "__main__":
    main(DEFAULTS)
