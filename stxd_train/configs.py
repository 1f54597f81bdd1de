"""The run configs of `stxd-train` (teacher and student YAMLs) and their sections, without torch.

`stxd-train fit`, `teacher` and `config` resolve and check a config with this module alone, so a bad field is
reported before torch is imported. The modules that use these classes (the engine, the distiller, the data and
the training commands) import them from here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

from pipelines.config import require
from pipelines.errors import ConfigError
from stxd_cache.teacher.config import AugmentConfig, TeacherConfig
from stxd_train.students.config import StudentConfig

if TYPE_CHECKING:
    from stxd_train.distill.response import GTMatch

T = TypeVar("T")


#: Top-level keys that `stxd-train teacher` and `fit` write into a run's `config.yaml` next to the run config
#: itself: what the run trained on (`teacher_online` only for a fit with a live teacher).
RUN_KEYS = ("kind", "dataroot", "version", "cache", "teacher_online")


AmpMode = Literal["auto", "off", "bf16", "fp16"]
AMP_MODES: tuple[str, ...] = ("auto", "off", "bf16", "fp16")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The loop's knobs; the caller turns them into `Trainer` arguments and hooks (see the package docs)."""

    max_steps: int = field(default=10_000, metadata={"help": "optimizer steps of the run (and schedule horizon)"})
    checkpoint_every: int = field(default=1000, metadata={"help": "steps between saves of checkpoints/last.pt"})
    keep_checkpoints: bool = field(default=False, metadata={"help": "also keep checkpoints/step_XXXXXX.pt"})
    log_every: int = field(default=50, metadata={"help": "steps between lines of metrics.jsonl"})
    seed: int = field(default=0, metadata={"help": "seed of the model init, dropout and data order"})
    amp: AmpMode = field(default="auto", metadata={
        "help": "auto: bf16 autocast on CUDA with bf16 support, else off; off; bf16; fp16 (with a GradScaler)"})

    def __post_init__(self) -> None:
        checks = [
            (self.max_steps >= 1, "max_steps", self.max_steps, "at least 1"),
            (self.checkpoint_every >= 1, "checkpoint_every", self.checkpoint_every, "at least 1"),
            (self.log_every >= 1, "log_every", self.log_every, "at least 1"),
            (self.seed >= 0, "seed", self.seed, "a non-negative integer"),
            (self.amp in AMP_MODES, "amp", self.amp, f"one of {', '.join(AMP_MODES)}"),
        ]
        require("train config", checks)


Schedule = Literal["onecycle", "cosine"]
SCHEDULES: tuple[str, ...] = ("onecycle", "cosine")

_DEFAULT_PCT_START = {"onecycle": 0.4, "cosine": 0.0}


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW with a warm-up and a cosine decay; `grad_clip` is handed to the `Trainer`."""

    lr: float = field(default=2e-4, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW decoupled weight decay (not on norms, biases)"})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "AdamW (beta1, beta2)"})
    schedule: Schedule = field(default="cosine", metadata={
        "help": "onecycle: cosine warm-up then cosine decay; cosine: linear warm-up then cosine decay"})
    warmup_steps: int | None = field(default=None, metadata={"help": "warm-up length in steps (or pct_start)"})
    pct_start: float | None = field(default=None, metadata={
        "help": "warm-up length as a fraction of max_steps (or warmup_steps); default 0.4 onecycle, 0 cosine"})
    start_lr_ratio: float = field(default=0.1, metadata={"help": "learning rate at step 0, as a fraction of lr"})
    min_lr_ratio: float = field(default=1e-3, metadata={"help": "learning rate after max_steps, as a fraction of lr"})
    grad_clip: float = field(default=35.0, metadata={"help": "max global gradient norm; 0 turns clipping off"})

    def __post_init__(self) -> None:
        if self.warmup_steps is not None and self.pct_start is not None:
            raise ConfigError(f"optim: can't provide both warmup_steps ({self.warmup_steps}) and pct_start "
                              f"({self.pct_start}). Choose one.")
        checks = [
            (math.isfinite(self.lr) and self.lr > 0, "lr", self.lr, "a number > 0"),
            (self.weight_decay >= 0, "weight_decay", self.weight_decay, "a number >= 0"),
            (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", self.betas,
             "two numbers in [0, 1)"),
            (self.schedule in SCHEDULES, "schedule", self.schedule, f"one of {', '.join(SCHEDULES)}"),
            (self.warmup_steps is None or self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, ">= 0"),
            (self.pct_start is None or 0 <= self.pct_start < 1, "pct_start", self.pct_start, "in [0, 1)"),
            (0 < self.start_lr_ratio <= 1, "start_lr_ratio", self.start_lr_ratio, "in (0, 1]"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "in [0, 1]"),
            (self.grad_clip >= 0, "grad_clip", self.grad_clip, "a max norm > 0, or 0 for no clipping"),
        ]
        require("optim config", checks)

    def warmup_for(self, max_steps: int) -> int:
        """Warm-up length in steps for a run of `max_steps` steps."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        pct = self.pct_start if self.pct_start is not None else _DEFAULT_PCT_START[self.schedule]
        return round(pct * max_steps)


TERMS = ("cd", "td", "rd", "mse")
RD_SPACES = ("encoded", "decoded")
FG_MASKS = ("none", "gt", "teacher")


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """Which distillation terms a fit adds to the detection loss, and their weights and knobs."""

    terms: tuple[str, ...] = field(default=(), metadata={"help": "any of cd, td, rd, mse; empty: no distillation"})
    alpha_cd: float = field(default=1.0, metadata={"help": "weight of the correlation loss"})
    alpha_td: float = field(default=1.0, metadata={"help": "weight of the temporal loss"})
    alpha_rd: float = field(default=1.0, metadata={"help": "weight of the response loss"})
    alpha_mse: float = field(default=1.0, metadata={"help": "weight of the feature MSE baseline"})
    lambda_c: float = field(default=0.005, metadata={"help": "CD weight of the off-diagonal correlations"})
    tau: float = field(default=0.1, metadata={"help": "TD softmax temperature"})
    gamma: float = field(default=0.5, metadata={"help": "RD quality exponent: q = score^(1-γ) · IoU^γ"})
    k: int = field(default=2, metadata={"help": "TD past frames K, at most the cache's k_max"})
    tokens: int = field(default=0, metadata={"help": "TD token grid P; 0: the cache's; else a divisor of it"})
    adapter_channels: tuple[int, ...] = field(default=(), metadata={
        "help": "hidden widths of the 1×1-conv adapter (with BN and ReLU); empty: a single 1×1 conv"})
    rd_space: Literal["encoded", "decoded"] = field(default="encoded", metadata={
        "help": "RD regression space. encoded: the head's own codes (cell offsets, z, log sizes, sin and cos, "
                "velocity) weighted by its code_weights × bbox_weight, as its box loss weighs them (velocity 0.2); "
                "decoded: the paper's reading, decoded boxes re-encoded (metres, atan2 round trip of the student's "
                "yaw) with unit weights, so that RD outweighs the box loss and pulls hardest on the velocity"})
    rd_class_aware: bool = field(default=True, metadata={
        "help": "RD quality: the IoU counts only GT boxes of the teacher box's class, so that a box of the wrong "
                "class on an object does not teach its class; false: any class (the paper's reading)"})
    rd_drop_flipped: bool = field(default=True, metadata={
        "help": "RD quality: q = 0 when the matched GT box's heading is more than 90° from the teacher box's; a "
                "box and its 180° turn have BEV IoU 1, so the IoU cannot catch a flip; false: the paper's reading"})
    fg_mask: Literal["none", "gt", "teacher"] = field(default="gt", metadata={
        "help": "per-cell weights of CD, TD and MSE on the student grid. gt: 1 inside GT footprints and on the "
                "head's heatmap Gaussians around GT centres; teacher: the teacher's boxes re-drawn as a heatmap "
                "(a Gaussian of peak score around each centre); none: every cell alike (the paper's reading)"})
    fg_background_weight: float = field(default=0.1, metadata={
        "help": "with fg_mask gt or teacher, the weight of background cells in [0, 1] (foreground: 1); 0.1 is a "
                "starting value, not tuned"})
    warmup_steps: int = field(default=0, metadata={
        "help": "steps over which every distillation weight ramps linearly from 0 (first step) to its alpha_* "
                "(logged terms include the ramp); 0: full weights from the first step, the paper's reading"})

    def __post_init__(self) -> None:
        unknown = sorted(set(self.terms) - set(TERMS))
        require("distill", [
            (not unknown and len(set(self.terms)) == len(self.terms), "terms", list(self.terms),
             f"distinct names among {', '.join(TERMS)}"),
            (min(self.alpha_cd, self.alpha_td, self.alpha_rd, self.alpha_mse) >= 0, "alpha_*",
             (self.alpha_cd, self.alpha_td, self.alpha_rd, self.alpha_mse), "weights >= 0"),
            (self.lambda_c >= 0, "lambda_c", self.lambda_c, ">= 0"),
            (self.tau > 0, "tau", self.tau, "> 0"),
            (0 <= self.gamma <= 1, "gamma", self.gamma, "in [0, 1]"),
            (self.k >= 1, "k", self.k, "at least 1 past frame"),
            (self.tokens >= 0, "tokens", self.tokens, ">= 0"),
            (all(c >= 1 for c in self.adapter_channels), "adapter_channels", self.adapter_channels, "widths >= 1"),
            (self.rd_space in RD_SPACES, "rd_space", self.rd_space, f"one of {', '.join(RD_SPACES)}"),
            (self.fg_mask in FG_MASKS, "fg_mask", self.fg_mask, f"one of {', '.join(FG_MASKS)}"),
            (0 <= self.fg_background_weight <= 1, "fg_background_weight", self.fg_background_weight, "in [0, 1]"),
            (self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "a number of steps >= 0"),
        ])

    @property
    def enabled(self) -> bool:
        return bool(self.terms)

    @property
    def gt_match(self) -> GTMatch:
        """How RD's quality matches teacher boxes with GT boxes (`rd_class_aware`, `rd_drop_flipped`)."""
        from stxd_train.distill.response import GTMatch

        return GTMatch(class_aware=self.rd_class_aware, drop_flipped=self.rd_drop_flipped)

    def warmup_factor(self, step: int | None) -> float:
        """The factor of every distillation weight at optimizer step `step` (0 for the first):
        min(1, step / warmup_steps); 1 without a warm-up or when the step is unknown (None)."""
        if self.warmup_steps == 0 or step is None:
            return 1.0
        return min(1.0, max(step, 0) / self.warmup_steps)


@dataclass(frozen=True, kw_only=True)
class CameraAugmentConfig:
    """Training-time image augmentation; the intrinsics follow every geometric change.

    Each image is resized by a random factor in `scale` times the base resize to `image_size`, then a window
    of `image_size` is cut at a random position (zero padded where the scaled image is smaller). All cameras
    and frames of one item share the factor and the window, so the rig stays consistent over time; the
    photometric factors are drawn per frame.
    """

    scale: tuple[float, float] = field(default=(1.0, 1.0), metadata={"help": "random resize factor range"})
    brightness: float = field(default=0.0, metadata={"help": "max relative brightness change"})
    contrast: float = field(default=0.0, metadata={"help": "max relative contrast change"})
    saturation: float = field(default=0.0, metadata={"help": "max relative saturation change"})

    def __post_init__(self) -> None:
        require("camera augment", [
            (0 < self.scale[0] <= self.scale[1], "scale", self.scale, "0 < low <= high, e.g. [0.9, 1.1]"),
            (0 <= self.brightness < 1, "brightness", self.brightness, "in [0, 1)"),
            (0 <= self.contrast < 1, "contrast", self.contrast, "in [0, 1)"),
            (0 <= self.saturation < 1, "saturation", self.saturation, "in [0, 1)"),
        ])

    @property
    def geometric(self) -> bool:
        return self.scale != (1.0, 1.0)


@dataclass(frozen=True, kw_only=True)
class StudentDataConfig:
    """Which samples a student trains and evaluates on, and how its images are loaded."""

    train_splits: tuple[str, ...] = field(default=("synth_train",), metadata={"help": "training splits"})
    val_split: str = field(default="synth_val", metadata={"help": "split scored by `stxd-train eval`"})
    image_size: tuple[int, int] = field(default=(320, 176), metadata={"help": "(width, height) of the input images"})
    batch_size: int = field(default=2, metadata={"help": "samples per step and process"})
    num_workers: int = field(default=1, metadata={"help": "DataLoader worker processes"})
    min_points: int = field(default=1, metadata={"help": "GT boxes with fewer LiDAR points are not targets"})
    augment: CameraAugmentConfig = field(default_factory=CameraAugmentConfig, metadata={"help": "image augmentation"})

    def __post_init__(self) -> None:
        require("student data", [
            (len(self.train_splits) >= 1, "train_splits", self.train_splits, "at least one split"),
            (all(v >= 32 for v in self.image_size), "image_size", self.image_size, "two sizes >= 32 pixels"),
            (self.batch_size >= 1, "batch_size", self.batch_size, "at least 1"),
            (self.num_workers >= 0, "num_workers", self.num_workers, ">= 0"),
        ])


@dataclass(frozen=True, kw_only=True)
class StudentRunConfig:
    """configs/student/*.yaml: the student and how to train it."""

    model: StudentConfig
    data: StudentDataConfig = field(default_factory=StudentDataConfig)
    train: TrainConfig
    optim: OptimConfig = field(default_factory=OptimConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


@dataclass(frozen=True, kw_only=True)
class TeacherDataConfig:
    """Which samples the teacher trains and evaluates on, and how they are loaded."""

    train_splits: tuple[str, ...] = field(default=("synth_train",), metadata={"help": "training splits"})
    val_split: str = field(default="synth_val", metadata={"help": "split scored by `stxd-train eval`"})
    batch_size: int = field(default=2, metadata={"help": "samples per step"})
    num_workers: int = field(default=1, metadata={"help": "DataLoader worker processes"})
    min_points: int = field(default=1, metadata={"help": "GT boxes with fewer LiDAR points are not targets"})
    augment: AugmentConfig = field(default_factory=AugmentConfig, metadata={"help": "global augmentation"})

    def __post_init__(self) -> None:
        require("teacher data", [
            (self.batch_size >= 1, "batch_size", self.batch_size, ">= 1"),
            (self.num_workers >= 0, "num_workers", self.num_workers, ">= 0"),
            (bool(self.train_splits), "train_splits", self.train_splits, "at least one split"),
        ])


@dataclass(frozen=True, kw_only=True)
class TeacherRunConfig:
    """configs/teacher/*.yaml: the teacher architecture and how to train it."""

    model: TeacherConfig
    data: TeacherDataConfig = field(default_factory=TeacherDataConfig)
    train: TrainConfig
    optim: OptimConfig = field(default_factory=OptimConfig)


def load_run_config(cls: type[T], path: str | Path, overrides: Sequence[str] = (), *, kind: str) -> T:
    """The run config `cls` of `--config PATH` with its `--set` overrides.

    PATH is a recipe (configs/<kind>/*.yaml) or the `config.yaml` of a `kind` run, whose `RUN_KEYS` are dropped:
    `--config RUN/config.yaml --resume` then continues that run with exactly its config.
    """
    from pipelines.config import apply_overrides, from_dict, read_yaml
    from pipelines.errors import ConfigError

    data = read_yaml(path)
    found = data.get("kind")
    if found is not None:
        if found != kind:
            raise ConfigError(f"{path} is the config.yaml of a run of kind {found!r}, expected a {kind} config: pass "
                              f"a recipe such as configs/{kind}/*.yaml or the config.yaml of a {kind} run")
        data = {k: v for k, v in data.items() if k not in RUN_KEYS}
    return from_dict(cls, apply_overrides(data, overrides), where=str(path))
