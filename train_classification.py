"""Baseline: multi-label classification with the class loss only."""
from core.trainer import main

DEFAULTS = {"description": __doc__, "strategy": "none"}

if __name__ == "__main__":
    main(DEFAULTS)
