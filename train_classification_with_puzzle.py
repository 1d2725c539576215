"""Baseline: Puzzle-CAM (fixed 2x2 centre cut, student tiles, all labels)."""
from core.trainer import main

DEFAULTS = {"description": __doc__, "strategy": "puzzle", "alpha_re": 4.0, "alpha_schedule_re": 0.5, "alpha_p": 1.0}

if __name__ == "__main__":
    main(DEFAULTS)
