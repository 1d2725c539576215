"""The OASS method: network, puzzle tasks, keypoint detectors, losses, EMA teacher."""
