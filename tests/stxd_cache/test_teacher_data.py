"""Teacher inputs: multi-sweep points and GT in the point range; augmentation moves both together."""

from __future__ import annotations

import numpy as np

from pipelines.boxes import points_in_boxes
from pipelines.lidar import load_sweeps
from stxd_cache.teacher.data import AugmentConfig, LidarDataset, _augment, collate

RANGE = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)


def test_points_and_boxes_in_range(train_index) -> None:
    ds = LidarDataset(train_index, num_sweeps=3, point_range=RANGE)
    item = ds[2]
    pts, boxes = item.points.numpy(), item.gt_boxes.numpy()
    assert pts.shape[1] == 5 and len(np.unique(pts[:, 4])) == 3
    assert np.all(np.abs(pts[:, :2]) <= 51.2) and np.all(np.abs(boxes[:, :2]) <= 51.2)
    assert len(boxes) == len(item.gt_labels) > 0
    batch = collate([ds[0], ds[1]])
    assert len(batch.points) == 2 and batch.tokens == [train_index[0].token, train_index[1].token]


def test_augmentation_keeps_points_in_their_boxes(train_index) -> None:
    sample = train_index[1]
    points = load_sweeps(sample, num_sweeps=1)
    boxes = sample.gt.boxes
    before = points_in_boxes(points[:, :3], boxes).sum(axis=1)
    speed = np.hypot(boxes[:, 7], boxes[:, 8])
    moving = speed > 1.0
    assert moving.sum() >= 2 and before.sum() > 1000
    cfg = AugmentConfig(rotation=0.5, scale=(0.9, 1.1))
    for seed in range(6):
        p, b = _augment(points, boxes, cfg, np.random.default_rng(seed))
        assert np.array_equal(points_in_boxes(p[:, :3], b).sum(axis=1), before)
        ratio = np.hypot(b[moving, 7], b[moving, 8]) / speed[moving]
        assert np.allclose(ratio, ratio[0], rtol=1e-5) and 0.9 <= ratio[0] <= 1.1
        heading = np.stack([np.cos(b[moving, 6]), np.sin(b[moving, 6])], axis=1)
        along = np.abs(np.sum(heading * b[moving, 7:9], axis=1)) / np.hypot(b[moving, 7], b[moving, 8])
        assert np.all(along > 0.99)   # vehicles still move along their heading
        assert np.array_equal(p[:, 3:], points[:, 3:])


def test_augmentation_is_deterministic_per_epoch(train_index) -> None:
    ds = LidarDataset(train_index, num_sweeps=1, point_range=RANGE, augment=AugmentConfig(), seed=3)
    ds.set_epoch(1)
    a = ds[0].points.numpy()
    ds.set_epoch(2)
    b = ds[0].points.numpy()
    ds.set_epoch(1)
    assert np.array_equal(ds[0].points.numpy(), a) and not np.array_equal(a, b)


def test_unknown_velocities_reach_the_loss_as_nan(train_index) -> None:
    """An object whose velocity the devkit cannot estimate is a NaN target (skipped by the head's loss), not 0."""
    import dataclasses


    sample = train_index[1]
    valid = sample.gt.velocity_valid.copy()
    valid[0] = False
    unknown = dataclasses.replace(sample, gt=dataclasses.replace(sample.gt, velocity_valid=valid))
    item = LidarDataset([unknown], num_sweeps=1, point_range=RANGE, min_points=0)[0]
    boxes = item.gt_boxes.numpy()
    assert np.isnan(boxes[0, 7:9]).all() and np.isfinite(boxes[1:]).all() and np.isfinite(boxes[:, :7]).all()
    assert np.array_equal(sample.gt.boxes[0, :7], boxes[0, :7])     # the stored GT itself is unchanged
    assert np.isfinite(sample.gt.boxes).all()
    augmented = LidarDataset([unknown], num_sweeps=1, point_range=RANGE, min_points=0,
                             augment=AugmentConfig(rotation=0.5))[0].gt_boxes.numpy()
    assert np.isnan(augmented[0, 7:9]).all() and np.isfinite(augmented[1:]).all()
