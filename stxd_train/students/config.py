"""Student configs: one frozen argument group per part; `build_student` (registry.py) turns them into modules.

The head sections (`head`, `target`, `loss`, `decode`) are the teacher's own config classes: students and
teacher share one CenterHead and one box encoding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipelines.config import require
from pipelines.grid import BEVGrid
from stxd_cache.teacher.config import DecodeConfig, HeadConfig, LossConfig, TargetConfig


@dataclass(frozen=True, kw_only=True)
class ImageBackboneConfig:
    """ResNet + FPN. `base_channels: 64` gives torchvision's shapes, so ImageNet weights load."""

    depth: int = field(default=18, metadata={"help": "ResNet depth: 18, 34, 50 or 101"})
    base_channels: int = field(default=64, metadata={"help": "stem width; 64 is torchvision's"})
    num_stages: int = field(default=4, metadata={"help": "ResNet stages kept (a truncated net is cheaper)"})
    out_indices: tuple[int, ...] = field(default=(2, 3), metadata={"help": "stages fed to the FPN (0-based)"})
    frozen_stages: int = field(default=-1, metadata={"help": "-1: none; 0: stem; i: stem and stages 1..i"})
    norm_eval: bool = field(default=False, metadata={"help": "keep BatchNorm statistics frozen"})
    weights: str | None = field(default=None, metadata={"help": "a local torchvision ResNet .pth, or null"})
    fpn_levels: int = field(default=1, metadata={"help": "FPN outputs the view transform samples"})

    def __post_init__(self) -> None:
        require("student config backbone", [
            (self.depth in (18, 34, 50, 101), "depth", self.depth, "18, 34, 50 or 101"),
            (self.base_channels > 0, "base_channels", self.base_channels, "a positive integer (64 for ImageNet)"),
            (1 <= self.num_stages <= 4, "num_stages", self.num_stages, "1..4"),
            (len(self.out_indices) >= 1 and all(0 <= i < self.num_stages for i in self.out_indices),
             "out_indices", self.out_indices, f"stage indices in 0..{self.num_stages - 1}"),
            (self.fpn_levels >= 1, "fpn_levels", self.fpn_levels, "at least 1"),
            # A stage after the last one fed to the FPN would be computed and never read, and DDP refuses its
            # parameters (they get no gradient).
            (not self.out_indices or max(self.out_indices) == self.num_stages - 1, "num_stages", self.num_stages,
             f"{max(self.out_indices, default=-1) + 1}, one past the last stage of out_indices "
             f"{list(self.out_indices)} (a later stage would be computed and never read); lower num_stages or add "
             f"the last stage to out_indices"),
        ])


@dataclass(frozen=True, kw_only=True)
class BEVFormerConfig:
    """The BEVFormer encoder: temporal self-attention, spatial cross-attention and an FFN per layer."""

    num_layers: int = field(default=3, metadata={"help": "encoder layers"})
    num_heads: int = field(default=4, metadata={"help": "attention heads"})
    num_points: int = field(default=2, metadata={"help": "sampling points per pillar height and head (SCA)"})
    tsa_points: int = field(default=4, metadata={"help": "sampling points per frame and head (TSA)"})
    pillar_heights: tuple[float, ...] = field(
        default=(-4.0, -2.5, -1.0, 0.5), metadata={"help": "z of the pillar reference points, LiDAR frame (m)"})
    ffn_channels: int = field(default=128, metadata={"help": "hidden width of the FFN"})
    queue: int = field(default=1, metadata={"help": "previous keyframes run without gradient for the TSA"})
    dropout: float = field(default=0.1, metadata={"help": "dropout in attention outputs and the FFN"})

    def __post_init__(self) -> None:
        require("student config bevformer", [
            (self.num_layers >= 1, "num_layers", self.num_layers, "at least 1"),
            (self.num_heads >= 1, "num_heads", self.num_heads, "at least 1"),
            (self.num_points >= 1 and self.tsa_points >= 1, "num_points", (self.num_points, self.tsa_points),
             "at least 1 (num_points and tsa_points)"),
            (len(self.pillar_heights) >= 1, "pillar_heights", self.pillar_heights, "at least one height"),
            (self.ffn_channels >= 1, "ffn_channels", self.ffn_channels, "at least 1"),
            (self.queue >= 0, "queue", self.queue, ">= 0 previous keyframes"),
            (0.0 <= self.dropout < 1.0, "dropout", self.dropout, "in [0, 1)"),
        ])


@dataclass(frozen=True, kw_only=True)
class UVTRConfig:
    """The UVTR view transform: depth-weighted lifting into a voxel grid, then a height collapse."""

    depth_bins: int = field(default=48, metadata={"help": "D: bins of the per-pixel depth distribution"})
    depth_range: tuple[float, float] = field(default=(1.0, 60.0), metadata={"help": "depth of the bins (m)"})
    heights: tuple[float, ...] = field(
        default=(-4.5, -3.5, -2.5, -1.5, -0.5, 0.5), metadata={"help": "z of the voxel layers, LiDAR frame (m)"})
    sweeps: int = field(default=0, metadata={"help": "previous keyframes fused after ego-motion alignment "
                                                     "(UVTR-CS); 0 is UVTR-C"})
    bev_convs: int = field(default=2, metadata={"help": "3x3 conv layers after the height collapse"})

    def __post_init__(self) -> None:
        lo, hi = self.depth_range
        require("student config uvtr", [
            (self.depth_bins >= 2, "depth_bins", self.depth_bins, "at least 2"),
            (0 < lo < hi, "depth_range", self.depth_range, "0 < near < far metres"),
            (len(self.heights) >= 1, "heights", self.heights, "at least one height"),
            (self.sweeps >= 0, "sweeps", self.sweeps, ">= 0 previous keyframes"),
            (self.bev_convs >= 0, "bev_convs", self.bev_convs, ">= 0"),
        ])


@dataclass(frozen=True, kw_only=True)
class StudentConfig:
    """A camera student: `name` picks the registry entry; only that entry's section is used."""

    name: str = field(metadata={"help": "registry name (stxd_train.students.registry): bevformer or uvtr"})
    grid_half_extent: float = field(default=51.2, metadata={"help": "the BEV grid covers ±this many metres"})
    grid_size: int = field(default=64, metadata={"help": "BEV cells per side"})
    embed_dims: int = field(default=64, metadata={"help": "channels of image features and of the BEV"})
    backbone: ImageBackboneConfig = field(default_factory=ImageBackboneConfig, metadata={"help": "ResNet + FPN"})
    bevformer: BEVFormerConfig = field(default_factory=BEVFormerConfig, metadata={"help": "`bevformer` encoder"})
    uvtr: UVTRConfig = field(default_factory=UVTRConfig, metadata={"help": "`uvtr` view transform"})
    head: HeadConfig = field(metadata={"help": "CenterHead tasks and widths (the teacher's head class)"})
    target: TargetConfig = field(default_factory=TargetConfig, metadata={"help": "training targets"})
    loss: LossConfig = field(default_factory=LossConfig, metadata={"help": "detection loss weights"})
    decode: DecodeConfig = field(default_factory=DecodeConfig, metadata={"help": "box decoding and NMS"})
    load_from: str | None = field(default=None, metadata={
        "help": "checkpoint that initialises the whole student before training: a stxd student.pt, an "
                "mmdetection3d detector (img_backbone/backbone, img_neck/neck) or a torchvision ResNet"})
    load_from_strict: bool = field(default=True, metadata={
        "help": "refuse a load_from file with tensors this student cannot use (false: skip and report them)"})

    def __post_init__(self) -> None:
        from stxd_train.students.registry import STUDENTS

        require("student config model", [
            (self.name in STUDENTS, "name", self.name, f"one of {', '.join(STUDENTS)}"),
            (self.grid_half_extent > 0, "grid_half_extent", self.grid_half_extent, "> 0 metres"),
            (self.grid_size >= 2, "grid_size", self.grid_size, "at least 2 cells"),
            (self.embed_dims >= 1, "embed_dims", self.embed_dims, "a positive number of channels"),
            (self.decode.nms != "circle" or len(self.decode.nms_radius) == len(self.head.tasks),
             "decode.nms_radius", self.decode.nms_radius, f"one radius per task ({len(self.head.tasks)})"),
        ])
        require(f"student config model ({self.name})", STUDENTS[self.name].checks(self))

    @property
    def grid(self) -> BEVGrid:
        """The student's BEV grid (and its head's)."""
        return BEVGrid.square(self.grid_half_extent, self.grid_size)

    @property
    def queue(self) -> int:
        """Previous keyframes whose images the student needs (its registry entry reads them from its section)."""
        from stxd_train.students.registry import STUDENTS

        entry = STUDENTS[self.name]
        return entry.queue(getattr(self, entry.section))
