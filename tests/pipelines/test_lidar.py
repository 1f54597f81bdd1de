"""LiDAR loading and multi-sweep aggregation: alignment with static geometry, lags, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipelines.boxes import points_in_boxes
from pipelines.errors import SensorFileError
from pipelines.lidar import load_points, load_sweeps
from pipelines.synth.rig import LIDAR_TRANSLATION


def test_ground_of_every_sweep_is_at_the_same_height(train_index) -> None:
    sample = train_index[3]
    points = load_sweeps(sample, num_sweeps=1 + len(sample.sweeps))
    lags = np.unique(points[:, 4])
    assert len(lags) == 1 + len(sample.sweeps)
    ground_z = -LIDAR_TRANSLATION[2]
    for lag in lags:
        pts = points[(points[:, 4] == lag) & (np.abs(points[:, 2] - ground_z) < 0.1)]
        assert len(pts) > 500
        assert abs(np.median(pts[:, 2]) - ground_z) < 0.005
        assert np.percentile(np.abs(pts[:, 2] - ground_z), 90) < 0.03


def test_parked_objects_line_up_across_sweeps(train_index) -> None:
    sample = train_index[3]
    points = load_sweeps(sample, num_sweeps=10)
    sweeps = points[points[:, 4] > 0]
    parked = np.array([a in ("vehicle.parked", "") for a in sample.gt.attributes])
    static = sample.gt.boxes[parked & (sample.gt.num_lidar_pts > 20)]
    assert len(static) >= 3
    tight, loose = static.copy(), static.copy()
    tight[:, 3:6] += 0.06
    loose[:, 3:5] += 1.0
    loose[:, 5] -= 0.2          # keep the ground out of the shell
    inside_tight = points_in_boxes(sweeps[:, :3], tight).sum(axis=1)
    inside_loose = points_in_boxes(sweeps[:, :3], loose).sum(axis=1)
    assert np.all(inside_tight >= 0.97 * inside_loose)
    assert inside_tight.sum() > 100


def test_range_filter_and_time_lag_channel(train_index, synth_cfg) -> None:
    sample = train_index[3]
    rng = [-20.0, -20.0, -3.0, 20.0, 20.0, 1.0]
    points = load_sweeps(sample, num_sweeps=3, point_range=rng)
    assert points.dtype == np.float32 and points.shape[1] == 5
    assert np.all(points[:, :3] >= rng[:3]) and np.all(points[:, :3] <= rng[3:])
    lags = np.unique(points[:, 4])
    assert np.allclose(lags, [0.0, *(lag * 1e-6 for lag in synth_cfg.sweep_lags_us[:2])], atol=1e-6)


def test_truncated_and_missing_files(tmp_path: Path) -> None:
    good = np.arange(50, dtype=np.float32)
    (tmp_path / "ok.pcd.bin").write_bytes(good.tobytes())
    assert load_points(tmp_path / "ok.pcd.bin").shape == (10, 5)
    (tmp_path / "cut.pcd.bin").write_bytes(good.tobytes()[:-6])
    with pytest.raises(SensorFileError, match=r"cut\.pcd\.bin has 194 bytes, not a multiple of 20"):
        load_points(tmp_path / "cut.pcd.bin")
    with pytest.raises(SensorFileError, match="missing"):
        load_points(tmp_path / "gone.pcd.bin")
    bad = good.copy()
    bad[7] = np.nan
    bad[13] = np.inf
    (tmp_path / "nan.pcd.bin").write_bytes(bad.tobytes())
    with pytest.raises(SensorFileError, match=r"nan\.pcd\.bin holds 2 non-finite values .* in 2 of its 10 points "
                                              r"\(first at point 1\)"):
        load_points(tmp_path / "nan.pcd.bin")
    (tmp_path / "empty.pcd.bin").write_bytes(b"")
    with pytest.raises(SensorFileError, match=r"empty\.pcd\.bin is empty \(0 bytes\)"):
        load_points(tmp_path / "empty.pcd.bin")
