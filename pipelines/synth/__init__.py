"""Synthetic nuScenes-format datasets: a road world, a ray-cast 32-beam LiDAR, rendered cameras,
and the 13 devkit tables. The embedded default of the project and its test data."""

from pipelines.synth.config import SynthConfig
from pipelines.synth.writer import generate

__all__ = ["SynthConfig", "generate"]
