"""Rigid transforms: 4×4 matrices from nuScenes translation + quaternion records, and yaw helpers."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pyquaternion import Quaternion


def transform_matrix(translation: Sequence[float], rotation: Sequence[float]) -> np.ndarray:
    """(4, 4) float64 matrix mapping child-frame points into the parent frame.

    `rotation` is a nuScenes quaternion `[w, x, y, z]`.
    """
    out = np.eye(4)
    out[:3, :3] = Quaternion(list(rotation)).rotation_matrix
    out[:3, 3] = np.asarray(translation, dtype=np.float64)
    return out


def invert(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a rigid (4, 4) transform."""
    out = np.eye(4)
    rot = matrix[:3, :3]
    out[:3, :3] = rot.T
    out[:3, 3] = -rot.T @ matrix[:3, 3]
    return out


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a (4, 4) transform to `points: (N, 3)`; returns a new (N, 3) array."""
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def yaw_of(matrix: np.ndarray) -> float:
    """Heading (rad, about +z, 0 along +x) of a transform's x axis."""
    return float(np.arctan2(matrix[1, 0], matrix[0, 0]))


def quaternion_from_yaw(yaw: float) -> list[float]:
    """nuScenes `[w, x, y, z]` quaternion of a rotation by `yaw` about +z."""
    return [float(np.cos(yaw / 2.0)), 0.0, 0.0, float(np.sin(yaw / 2.0))]
