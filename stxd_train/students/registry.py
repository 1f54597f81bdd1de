"""The student registry: a plain dict from name to factory, and `build_student`, the one place where a
`StudentConfig` becomes modules."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

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


#: Student name → factory. A new student is one entry here; tests/stxd_train/test_students.py covers it.
STUDENTS: dict[str, Callable[[StudentConfig], CameraStudent]] = {"bevformer": _bevformer, "uvtr": _uvtr}


def build_student(cfg: StudentConfig) -> CameraStudent:
    """The student `cfg.name` on the CPU (move it yourself)."""
    try:
        factory = STUDENTS[cfg.name]
    except KeyError:
        raise ConfigError(f"unknown student {cfg.name!r}; the registry has {', '.join(sorted(STUDENTS))}") from None
    return factory(cfg)
