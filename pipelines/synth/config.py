"""The knobs of the synthetic dataset writer."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipelines.config import require


@dataclass(frozen=True, kw_only=True)
class SynthConfig:
    """What `stxd-data synth` generates. The same values and seed give byte-identical output."""

    scenes: int = field(default=10, metadata={"help": "number of scenes (one log and one map each)"})
    samples_per_scene: int = field(default=20, metadata={"help": "keyframes per scene, 0.5 s apart"})
    seed: int = field(default=0, metadata={"help": "seed that fully determines the dataset"})
    image_size: tuple[int, int] = field(default=(400, 224), metadata={"help": "camera image width, height"})
    sweeps: int = field(default=4, metadata={"help": "LiDAR sweeps between two keyframes (nuScenes: 9)"})
    azimuth_steps: int = field(default=1084, metadata={"help": "LiDAR firings per revolution"})
    val_fraction: float = field(default=0.2, metadata={"help": "fraction of scenes in synth_val"})
    version: str = field(default="v1.0-synth", metadata={"help": "table folder name"})
    jpeg_quality: int = field(default=90, metadata={"help": "camera JPEG quality"})

    def __post_init__(self) -> None:
        checks = [
            (self.scenes >= 1, "scenes", self.scenes, "at least 1"),
            (self.samples_per_scene >= 2, "samples_per_scene", self.samples_per_scene, "at least 2"),
            (self.seed >= 0, "seed", self.seed, "a non-negative integer"),
            (all(16 <= v <= 1600 for v in self.image_size), "image_size", self.image_size,
             "width and height between 16 and 1600"),
            (0 <= self.sweeps <= 19, "sweeps", self.sweeps, "between 0 and 19"),
            (64 <= self.azimuth_steps <= 4096, "azimuth_steps", self.azimuth_steps, "between 64 and 4096"),
            (0.0 <= self.val_fraction < 1.0, "val_fraction", self.val_fraction, "in [0, 1)"),
            (bool(self.version) and "/" not in self.version, "version", self.version, "a folder name"),
            (1 <= self.jpeg_quality <= 100, "jpeg_quality", self.jpeg_quality, "between 1 and 100"),
        ]
        require("synth config", checks)

    @property
    def keyframe_interval_us(self) -> int:
        """Keyframes are 0.5 s apart, as in nuScenes."""
        return 500_000

    @property
    def sweep_lags_us(self) -> tuple[int, ...]:
        """How long before its keyframe each sweep is taken, nearest first, evenly spaced."""
        n = self.sweeps + 1
        return tuple(round(j * self.keyframe_interval_us / n) for j in range(1, n))

    @property
    def split_scenes(self) -> tuple[list[int], list[int]]:
        """Scene indices of synth_train and synth_val: the last scenes go to val.

        With a single scene, that scene is in both splits so that both names stay usable.
        """
        n_val = max(1, round(self.scenes * self.val_fraction)) if self.scenes > 1 else 0
        scenes = list(range(self.scenes))
        if n_val == 0:
            return scenes, scenes
        return scenes[: self.scenes - n_val], scenes[self.scenes - n_val:]
