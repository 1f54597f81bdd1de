"""LiDAR samples for the teacher: multi-sweep points and GT boxes per keyframe, with the global
augmentations CenterPoint trains with (flip, rotation, scaling) applied consistently to both."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from pipelines.lidar import load_sweeps
from pipelines.nuscenes import SampleIndex
from stxd_cache.teacher.config import AugmentConfig


@dataclass(frozen=True)
class LidarSample:
    """One keyframe for the teacher.

    points: (N, 5) [x, y, z, intensity, time_lag] in the keyframe LiDAR frame, inside the point range.
    gt_boxes: (M, 9) [x, y, z, w, l, h, yaw, vx, vy]; gt_labels: (M,) int64.
    """

    token: str
    points: torch.Tensor
    gt_boxes: torch.Tensor
    gt_labels: torch.Tensor


class LidarDataset(Dataset[LidarSample]):
    """Keyframes of a `SampleIndex` as teacher inputs; picklable, so DataLoader workers may fork or spawn."""

    def __init__(self, index: SampleIndex, *, num_sweeps: int, point_range: Sequence[float],
                 augment: AugmentConfig | None = None, seed: int = 0, min_points: int = 1) -> None:
        self.index = index
        self.num_sweeps = num_sweeps
        self.point_range = tuple(float(v) for v in point_range)
        self.augment = augment
        self.seed = seed
        self.min_points = min_points
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Augmentations depend on (seed, epoch, item) only, so resumed runs see the same data."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: int) -> LidarSample:
        """Item `key % len(self)`; a key of `epoch * len(self) + i` (an epoch-tagging sampler) also sets the
        epoch of the augmentation, so DataLoader worker processes need no shared state."""
        epoch, i = divmod(int(key), len(self.index))
        epoch = epoch or self.epoch
        sample = self.index[i]
        points = load_sweeps(sample, num_sweeps=self.num_sweeps)
        gt = sample.gt
        keep = gt.num_lidar_pts >= self.min_points
        boxes, labels = gt.training_boxes()[keep], gt.labels[keep].copy()
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, epoch, i])
            points, boxes = _augment(points, boxes, self.augment, rng)
        lo, hi = np.asarray(self.point_range[:3]), np.asarray(self.point_range[3:])
        points = points[np.all((points[:, :3] >= lo) & (points[:, :3] <= hi), axis=1)]
        inside = np.all((boxes[:, :2] >= lo[:2]) & (boxes[:, :2] <= hi[:2]), axis=1)
        return LidarSample(token=sample.token, points=torch.from_numpy(np.ascontiguousarray(points)),
                           gt_boxes=torch.from_numpy(boxes[inside].astype(np.float32)),
                           gt_labels=torch.from_numpy(labels[inside].astype(np.int64)))


def _augment(points: np.ndarray, boxes: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator
             ) -> tuple[np.ndarray, np.ndarray]:
    """Flip, rotate and scale points (N, 5) and boxes (M, 9) together; returns new arrays."""
    points, boxes = points.copy(), boxes.copy()
    if cfg.flip:
        for axis in (0, 1):   # flip about the x axis (negate y), then about the y axis (negate x)
            if rng.random() < 0.5:
                other = 1 - axis
                points[:, other] *= -1
                boxes[:, other] *= -1
                boxes[:, 7 + other] *= -1
                boxes[:, 6] = -boxes[:, 6] if other == 1 else np.pi - boxes[:, 6]
    angle = rng.uniform(-cfg.rotation, cfg.rotation)
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s], [s, c]], dtype=np.float32)
    points[:, :2] = points[:, :2] @ rot.T
    boxes[:, :2] = boxes[:, :2] @ rot.T
    boxes[:, 7:9] = boxes[:, 7:9] @ rot.T
    boxes[:, 6] += angle
    factor = rng.uniform(*cfg.scale)
    points[:, :3] *= factor
    boxes[:, :6] *= factor
    boxes[:, 7:9] *= factor
    boxes[:, 6] = np.arctan2(np.sin(boxes[:, 6]), np.cos(boxes[:, 6]))
    return points, boxes


@dataclass(frozen=True)
class LidarBatch:
    """A list-based batch: point clouds differ in size, so nothing is padded."""

    tokens: list[str]
    points: list[torch.Tensor]
    gt_boxes: list[torch.Tensor]
    gt_labels: list[torch.Tensor]


def collate(samples: Sequence[LidarSample]) -> LidarBatch:
    return LidarBatch(tokens=[s.token for s in samples], points=[s.points for s in samples],
                      gt_boxes=[s.gt_boxes for s in samples], gt_labels=[s.gt_labels for s in samples])


