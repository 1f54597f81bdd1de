"""The CenterPoint-style LiDAR teacher (spconv 2): config, voxeliser, sparse encoder, BEV backbone, head.

Exports are loaded lazily so that `from stxd_cache.teacher.center_head import CenterHead` (what camera
students use) and `stxd_cache.teacher.config` do not import spconv.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stxd_cache.teacher.bev_backbone import SECOND, SECONDFPN
    from stxd_cache.teacher.center_head import (
        CenterHead,
        CenterTargets,
        DecodedBoxes,
        TaskPreds,
        circle_nms,
        gaussian_radius,
        rotated_nms,
    )
    from stxd_cache.teacher.config import (
        BackboneConfig,
        DecodeConfig,
        EncoderConfig,
        HeadConfig,
        LossConfig,
        NeckConfig,
        TargetConfig,
        TeacherConfig,
        VoxelConfig,
    )
    from stxd_cache.teacher.model import CenterPoint, TeacherOutput, build_teacher
    from stxd_cache.teacher.sparse_encoder import SparseEncoder, conv_algo
    from stxd_cache.teacher.voxelize import Voxelizer

_EXPORTS = {
    "BackboneConfig": "config", "DecodeConfig": "config", "EncoderConfig": "config", "HeadConfig": "config",
    "LossConfig": "config", "NeckConfig": "config", "TargetConfig": "config", "TeacherConfig": "config",
    "VoxelConfig": "config",
    "CenterHead": "center_head", "CenterTargets": "center_head", "DecodedBoxes": "center_head",
    "TaskPreds": "center_head", "circle_nms": "center_head", "gaussian_radius": "center_head",
    "rotated_nms": "center_head",
    "SECOND": "bev_backbone", "SECONDFPN": "bev_backbone",
    "SparseEncoder": "sparse_encoder", "conv_algo": "sparse_encoder",
    "Voxelizer": "voxelize",
    "CenterPoint": "model", "TeacherOutput": "model", "build_teacher": "model",
}

__all__ = [
    "SECOND", "SECONDFPN", "BackboneConfig", "CenterHead", "CenterPoint", "CenterTargets", "DecodeConfig",
    "DecodedBoxes", "EncoderConfig", "HeadConfig", "LossConfig", "NeckConfig", "SparseEncoder", "TargetConfig",
    "TaskPreds", "TeacherConfig", "TeacherOutput", "VoxelConfig", "Voxelizer", "build_teacher", "circle_nms",
    "conv_algo", "gaussian_radius", "rotated_nms",
]
assert sorted(__all__) == sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return list(__all__)
