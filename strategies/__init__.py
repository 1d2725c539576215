"""Plug-in keypoint strategies: each module here registers one with core.strategies.register_strategy.

core/strategies.py imports every module of this folder (names not starting with _) when it is
imported, so a strategy added here is known to training, the hit rates, visualize_cams.py and every
tool that reads a run's strategy from its checkpoint. The worked example is centroid.py
(docs/extending.md).
"""
