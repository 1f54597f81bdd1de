"""Camera samples for the students: geometry kept consistent under augmentation, temporal frames, the cache
join, and DataLoader workers under spawn."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pipelines.cameras import load_cameras
from pipelines.errors import ConfigError, SensorFileError
from pipelines.geometry import invert
from pipelines.grid import BEVGrid
from pipelines.nuscenes import SampleIndex
from stxd_cache.extract import extract
from stxd_train.data import CameraAugmentConfig, CameraDataset, collate
from stxd_train.fit import open_training_cache
from tiny import extract_job

GRID = BEVGrid.square(25.6, 8)


def test_item_matches_the_data_layer_without_augmentation(train_index) -> None:
    sample = train_index[1]
    item = CameraDataset(train_index, image_size=(100, 56), grid=GRID)[1]
    ref = load_cameras(sample, size=(100, 56))
    assert item.token == sample.token and item.images.shape == (1, 6, 3, 56, 100)
    np.testing.assert_allclose(item.images[0].numpy(), ref.images, atol=1e-5)
    np.testing.assert_allclose(item.lidar2img[0].numpy(), ref.lidar2img, rtol=1e-5, atol=1e-3)
    # GT: boxes with LiDAR points whose centre is on the grid.
    gt = sample.gt
    keep = (gt.num_lidar_pts >= 1) & GRID.contains(gt.boxes[:, :2])
    np.testing.assert_allclose(item.gt_boxes.numpy(), gt.boxes[keep], rtol=1e-6)
    assert item.gt_labels.tolist() == gt.labels[keep].tolist()


def _project(l2i: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cam = np.c_[points, np.ones(len(points))] @ l2i.T
    return cam[:, :2] / cam[:, 2:3], cam[:, 2]


def test_scale_and_crop_keep_lidar2img_consistent(train_index) -> None:
    """A 3D point shows the same colour in the augmented image (at its new projection) as in the plain one."""
    plain = CameraDataset(train_index, image_size=(200, 112), grid=GRID)[2]
    aug_cfg = CameraAugmentConfig(scale=(1.3, 1.3))
    aug = CameraDataset(train_index, image_size=(200, 112), grid=GRID, augment=aug_cfg, seed=3)[2]
    assert not torch.allclose(plain.lidar2img, aug.lidar2img)
    rng = np.random.default_rng(0)
    pts = np.c_[rng.uniform(-15, 15, 4000), rng.uniform(3, 30, 4000), rng.uniform(-1.8, 0.5, 4000)]   # LiDAR: y ahead
    diffs = []
    for cam in (0, 3):
        l2i_p, l2i_a = plain.lidar2img[0, cam].double().numpy(), aug.lidar2img[0, cam].double().numpy()
        uv_p, z = _project(l2i_p, pts if cam == 0 else pts * [1, -1, 1])
        uv_a, _ = _project(l2i_a, pts if cam == 0 else pts * [1, -1, 1])
        inside = [(uv >= 2).all(1) & (uv < [198, 110]).all(1) for uv in (uv_p, uv_a)]
        ok = (z > 1) & inside[0] & inside[1]
        assert ok.sum() > 100
        a = plain.images[0, cam].numpy()[:, uv_p[ok, 1].astype(int), uv_p[ok, 0].astype(int)]
        b = aug.images[0, cam].numpy()[:, uv_a[ok, 1].astype(int), uv_a[ok, 0].astype(int)]
        diffs.append(np.median(np.abs(a - b)))
    # Same scene content under the new projection (normalised units; the plain projection on the augmented
    # image gives ~0.4).
    assert max(diffs) < 0.1


def test_previous_frames_and_ego_motion(train_index) -> None:
    dataset = CameraDataset(train_index, image_size=(64, 32), grid=GRID, queue=2)
    first = next(i for i, s in enumerate(train_index) if s.frame_index == 0)
    third = next(i for i, s in enumerate(train_index) if s.frame_index == 2)
    item = dataset[first]
    assert item.frame_valid.tolist() == [True, False, False]
    assert item.images[1:].abs().sum() == 0
    item = dataset[third]
    assert item.frame_valid.tolist() == [True, True, True]
    cur, prev = train_index[third], train_index[train_index.index_of(train_index[third].prev_tokens[0])]
    np.testing.assert_allclose(item.prev2cur[1].numpy(), invert(cur.lidar2global) @ prev.lidar2global, atol=1e-4)
    np.testing.assert_allclose(item.prev2cur[0].numpy(), np.eye(4), atol=1e-6)
    # The ego moved between the keyframes (the synthetic ego drives along a road).
    assert np.linalg.norm(item.prev2cur[1, :2, 3].numpy()) > 0.1


def test_an_index_with_too_few_previous_keyframes_is_refused(nusc) -> None:
    short = SampleIndex.from_nuscenes(nusc, ["synth_train"], k_prev=1, max_sweeps=0)
    CameraDataset(short, image_size=(64, 32), grid=GRID, queue=1)
    with pytest.raises(ConfigError, match="k_prev >= 2"):
        CameraDataset(short, image_size=(64, 32), grid=GRID, queue=2)


def test_cache_join(train_index, cache: Path, synth_root: Path, teacher_ckpt: Path, tmp_path: Path) -> None:
    dataset = CameraDataset(train_index, image_size=(64, 32), grid=GRID, cache=open_training_cache(cache, grid=GRID))
    batch = collate([dataset[0], dataset[3]])
    assert batch.cache is not None and batch.cache.bev.shape[0] == 2
    assert batch.cache.past_valid.shape == (2, 2) and batch.cache.count.dtype == torch.int64
    from stxd_cache.store import open_cache

    record = open_cache(cache).read(open_cache(cache).index_of(train_index[3].token))
    np.testing.assert_array_equal(batch.cache.bev[1].numpy(), record.bev)
    # A cache of the val split only lacks every training token: refused when the dataset is built.
    val_only = tmp_path / "val.zarr"
    extract(dataclasses.replace(extract_job(synth_root, teacher_ckpt, val_only), splits=("synth_val",)))
    with pytest.raises(ConfigError, match=rf"lacks {len(train_index)} of the {len(train_index)} samples"):
        CameraDataset(train_index, image_size=(64, 32), grid=GRID, cache=open_training_cache(val_only, grid=GRID))


def test_missing_image_fails_when_the_dataset_is_built(train_index) -> None:
    """A missing image anywhere in the split is named before any sample is loaded."""
    sample = train_index[5]
    cams = (dataclasses.replace(sample.cameras[0], path="/nonexistent/CAM_FRONT/x.jpg"), *sample.cameras[1:])
    samples = list(train_index)
    samples[5] = dataclasses.replace(sample, cameras=cams)
    broken = SampleIndex(samples, dataroot=train_index.dataroot, version=train_index.version,
                         splits=train_index.splits)
    with pytest.raises(SensorFileError, match=r"1 camera image\(s\) .* missing, first " + re.escape("/nonexistent/")):
        CameraDataset(broken, image_size=(64, 32), grid=GRID)


def test_spawn_workers_give_the_same_batches(train_index, cache: Path) -> None:
    """The dataset (with its cache) pickles into spawned workers and yields what the main process yields."""
    aug = CameraAugmentConfig(scale=(0.9, 1.1), brightness=0.2)
    dataset = CameraDataset(train_index, image_size=(64, 32), grid=GRID, queue=1, augment=aug,
                            cache=open_training_cache(cache, grid=GRID))
    # One whole batch, read to its end: the worker is idle, not mid-send, when it is shut down.
    loader = DataLoader(dataset, batch_size=2, sampler=[0, 1], num_workers=1, collate_fn=collate,
                        multiprocessing_context="spawn")
    (batch,) = list(loader)
    local = collate([dataset[0], dataset[1]])
    assert batch.tokens == local.tokens
    assert torch.equal(batch.images, local.images) and torch.equal(batch.lidar2img, local.lidar2img)
    assert torch.equal(batch.cache.tokens, local.cache.tokens)


def test_unknown_velocities_are_nan_targets(train_index) -> None:
    """The student learns no velocity for an object whose velocity the devkit cannot estimate."""
    import dataclasses

    sample = train_index[1]
    valid = sample.gt.velocity_valid.copy()
    valid[0] = False
    unknown = dataclasses.replace(sample, gt=dataclasses.replace(sample.gt, velocity_valid=valid))
    item = CameraDataset([unknown], image_size=(64, 32), grid=GRID)[0]
    keep = (sample.gt.num_lidar_pts >= 1) & GRID.contains(sample.gt.boxes[:, :2])
    assert keep[0] and keep.sum() > 1
    boxes = item.gt_boxes.numpy()
    assert np.isnan(boxes[0, 7:9]).all() and np.isfinite(boxes[1:]).all() and np.isfinite(boxes[:, :7]).all()
