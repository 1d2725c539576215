"""Baseline: multi-label classification with the class loss only (GAP head).

Loss: core/losses.py classification_loss. No puzzle task.
"""
from core.trainer import main

DEFAULTS = {"description": __doc__, "strategy": "none", "head": "gap"}

if __name__ == "__main__":
    main(DEFAULTS)
