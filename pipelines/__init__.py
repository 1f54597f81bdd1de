"""Shared data layer of stxd: nuScenes sample index, sensors, grids, boxes, evaluation, synthetic data."""

__version__ = "0.1.0"
