"""OASS, cTopk-w: as cTopk with a CAM-weighted mean of the peaks; EMA teacher."""
from core.trainer import main

DEFAULTS = {"description": __doc__, "strategy": "ctopk_w", "alpha_re": 3.0, "alpha_schedule_re": 0.05, "alpha_p": 0.5}

if __name__ == "__main__":
    main(DEFAULTS)
