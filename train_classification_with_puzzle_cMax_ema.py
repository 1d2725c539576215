"""OASS, cMax: one task per positive class, cut at that class's CAM argmax; EMA-teacher tiles."""
from core.trainer import main

DEFAULTS = {"description": __doc__, "strategy": "cmax", "alpha_re": 3.0, "alpha_schedule_re": 0.05, "alpha_p": 0.5}

if __name__ == "__main__":
    main(DEFAULTS)
