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
    test_fraction: float = field(default=0.0, metadata={
        "help": "fraction of scenes in the held-out synth_test (0: no synth_test split is written)"})
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
            (0.0 <= self.test_fraction < 1.0, "test_fraction", self.test_fraction, "in [0, 1)"),
            (bool(self.version) and "/" not in self.version, "version", self.version, "a folder name"),
            (1 <= self.jpeg_quality <= 100, "jpeg_quality", self.jpeg_quality, "between 1 and 100"),
        ]
        require("synth config", checks)
        if self.test_fraction > 0.0:
            n_val, n_test = self._split_sizes()
            # Unlike synth_val with a single scene, synth_test never shares a scene: it is the held-out split.
            require("synth config", [
                (self.scenes - n_val - n_test >= 1, "test_fraction", self.test_fraction,
                 f"a value that leaves synth_train at least one of the {self.scenes} scenes (synth_val takes "
                 f"{n_val}, synth_test {n_test}); lower val_fraction or test_fraction, or raise scenes"),
            ])

    @property
    def keyframe_interval_us(self) -> int:
        """Keyframes are 0.5 s apart, as in nuScenes."""
        return 500_000

    @property
    def sweep_lags_us(self) -> tuple[int, ...]:
        """How long before its keyframe each sweep is taken, nearest first, evenly spaced."""
        n = self.sweeps + 1
        return tuple(round(j * self.keyframe_interval_us / n) for j in range(1, n))

    def _split_sizes(self) -> tuple[int, int]:
        """Scene counts of synth_val and synth_test: each fraction rounded, at least one scene when it is used."""
        n_val = max(1, round(self.scenes * self.val_fraction)) if self.scenes > 1 else 0
        n_test = max(1, round(self.scenes * self.test_fraction)) if self.test_fraction > 0.0 else 0
        return n_val, n_test

    @property
    def split_scenes(self) -> tuple[list[int], list[int]]:
        """Scene indices of synth_train and synth_val: train first, then val (then the test scenes, if any).

        With a single scene, that scene is in both splits so that both names stay usable.
        """
        n_val, n_test = self._split_sizes()
        scenes = list(range(self.scenes))
        if n_val == 0:
            return scenes, scenes
        n_train = self.scenes - n_val - n_test
        return scenes[:n_train], scenes[n_train:n_train + n_val]

    @property
    def test_scenes(self) -> list[int]:
        """Scene indices of the held-out synth_test: the last scenes; empty when `test_fraction` is 0."""
        _, n_test = self._split_sizes()
        return list(range(self.scenes - n_test, self.scenes))

    @property
    def splits(self) -> dict[str, list[int]]:
        """Every split written to `splits.json` with its scene indices; synth_test only with a `test_fraction`."""
        train, val = self.split_scenes
        splits = {"synth_train": train, "synth_val": val}
        if self.test_scenes:
            splits["synth_test"] = self.test_scenes
        return splits
