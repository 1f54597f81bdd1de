"""The student registry: name → `StudentEntry` (its config section, its checks, the past frames it needs and its
factory), and `build_student`, the one place where a `StudentConfig` becomes modules.

Importing this module imports no torch (the factories import their modules when called), so that
`StudentConfig` checks a config through its entry before any model library loads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipelines.errors import ConfigError

if TYPE_CHECKING:
    from stxd_cache.teacher.center_head import CenterHead
    from stxd_train.students.common import CameraStudent, ImageEncoder
    from stxd_train.students.config import StudentConfig


def _image_encoder(cfg: StudentConfig) -> ImageEncoder:
    from stxd_train.students.common import ImageEncoder
    from stxd_train.students.resnet import ResNet, load_pretrained

    b = cfg.backbone
    backbone = ResNet(depth=b.depth, num_stages=b.num_stages, out_indices=b.out_indices,
                      base_channels=b.base_channels, frozen_stages=b.frozen_stages, norm_eval=b.norm_eval)
    if b.weights:
        load_pretrained(backbone, b.weights)
    return ImageEncoder(backbone=backbone, out_channels=cfg.embed_dims, levels=b.fpn_levels)


def _head(cfg: StudentConfig) -> CenterHead:
    from stxd_cache.teacher.center_head import CenterHead

    h = cfg.head
    return CenterHead(in_channels=cfg.embed_dims, tasks=h.tasks, share_conv_channels=h.share_conv_channels,
                      head_conv_channels=h.head_conv_channels, num_heatmap_convs=h.num_heatmap_convs,
                      target=cfg.target, loss=cfg.loss, decode=cfg.decode)


def _bevformer(cfg: StudentConfig) -> CameraStudent:
    from stxd_train.students.bevformer import BEVFormer

    e = cfg.bevformer
    return BEVFormer(image_encoder=_image_encoder(cfg), head=_head(cfg), grid=cfg.grid, embed_dims=cfg.embed_dims,
                     num_layers=e.num_layers, num_heads=e.num_heads, num_points=e.num_points,
                     tsa_points=e.tsa_points, pillar_heights=e.pillar_heights, ffn_channels=e.ffn_channels,
                     queue=e.queue, dropout=e.dropout)


def _uvtr(cfg: StudentConfig) -> CameraStudent:
    from stxd_train.students.uvtr import UVTR

    u = cfg.uvtr
    return UVTR(image_encoder=_image_encoder(cfg), head=_head(cfg), grid=cfg.grid, embed_dims=cfg.embed_dims,
                depth_bins=u.depth_bins, depth_range=u.depth_range, heights=u.heights, sweeps=u.sweeps,
                bev_convs=u.bev_convs)


#: A failed check: (ok, field, value found, what is expected), as `pipelines.config.require` takes them.
Check = tuple[bool, str, Any, str]


@dataclass(frozen=True)
class StudentEntry:
    """Everything stxd knows about one student besides its modules."""

    section: str
    """The `StudentConfig` field that holds its settings (its YAML section)."""
    build: Callable[[StudentConfig], CameraStudent]
    """The factory: the student's modules from the whole config."""
    queue: Callable[[Any], int]
    """The previous keyframes whose images it reads, from its section."""
    checks: Callable[[StudentConfig], list[Check]] = lambda cfg: []
    """Checks of the whole config that only this student needs."""


def _bevformer_checks(cfg: StudentConfig) -> list[Check]:
    heads = cfg.bevformer.num_heads
    return [(cfg.embed_dims % heads == 0, "embed_dims", cfg.embed_dims,
             f"a positive multiple of bevformer.num_heads ({heads})")]


#: Student name → entry. A new student is one entry here and its section in `StudentConfig`;
#: tests/stxd_train/test_students.py covers every entry.
STUDENTS: dict[str, StudentEntry] = {
    "bevformer": StudentEntry(section="bevformer", build=_bevformer, queue=lambda section: section.queue,
                              checks=_bevformer_checks),
    "uvtr": StudentEntry(section="uvtr", build=_uvtr, queue=lambda section: section.sweeps),
}


def student_entry(name: str) -> StudentEntry:
    """The registry entry of student `name`; a `ConfigError` naming the registered students otherwise."""
    try:
        return STUDENTS[name]
    except KeyError:
        raise ConfigError(f"unknown student {name!r}; the registry has {', '.join(sorted(STUDENTS))}") from None


def build_student(cfg: StudentConfig) -> CameraStudent:
    """The student `cfg.name` on the CPU (move it yourself)."""
    return student_entry(cfg.name).build(cfg)
