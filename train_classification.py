"""Baseline: multi-label classification with the class loss only (GAP head).

Loss: core/step.py loss_terms (classification_loss; the puzzle terms stay 0). No puzzle task.
"""
from core.trainer import main

DEFAULTS = {"description": __doc__, "strategy": "none", "head": "gap"}

if __name__ == "__main__":
    main(DEFAULTS)
