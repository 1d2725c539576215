"""OASS, Max strategy: cut each image at the argmax of its merged CAM; student tiles."""
from core.trainer import main

DEFAULTS = {"description": __doc__, "strategy": "max", "alpha_re": 3.0, "alpha_schedule_re": 0.05, "alpha_p": 0.5}

if __name__ == "__main__":
    main(DEFAULTS)
