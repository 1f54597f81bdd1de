"""SampleIndex: order, history, sweeps, cameras, GT, and clear errors for bad roots and splits."""

from __future__ import annotations

import colorsys
import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.errors import DatasetError, SplitError
from pipelines.nuscenes import SampleIndex, load_nuscenes
from pipelines.synth.palette import class_of_hue


def test_order_and_previous_keyframes(nusc, train_index, synth_cfg) -> None:
    assert len(train_index) == len(synth_cfg.split_scenes[0]) * synth_cfg.samples_per_scene
    for prev, cur in itertools.pairwise(train_index):
        if prev.scene_token == cur.scene_token:
            assert cur.timestamp > prev.timestamp
            assert cur.frame_index == prev.frame_index + 1
            assert cur.prev_tokens[0] == prev.token
            assert cur.prev_tokens[1:] == prev.prev_tokens[: len(cur.prev_tokens) - 1]
        else:
            assert cur.frame_index == 0 and cur.prev_tokens == ()
    assert max(len(s.prev_tokens) for s in train_index) == 3
    assert train_index.index_of(train_index[5].token) == 5
    with pytest.raises(DatasetError, match="not-a-token"):
        train_index.index_of("not-a-token")


def test_sweeps_carry_lags_and_transforms(train_index, synth_cfg) -> None:
    sample = train_index[2]
    # every earlier LiDAR frame of the scene, sweeps and keyframes alike, nearest first
    assert len(sample.sweeps) == min(10, (sample.frame_index + 1) * (synth_cfg.sweeps + 1) - 1)
    lags = [s.time_lag for s in sample.sweeps]
    assert np.all(np.diff(lags) > 0) and lags[0] == pytest.approx(synth_cfg.sweep_lags_us[0] * 1e-6)
    for sweep in sample.sweeps:
        rot = sweep.to_keyframe_lidar[:3, :3]
        assert np.allclose(rot @ rot.T, np.eye(3), atol=1e-9)
        assert not np.allclose(sweep.to_keyframe_lidar, np.eye(4))  # the ego moved or turned


def test_gt_boxes_are_in_the_lidar_frame(nusc, val_index) -> None:
    from pipelines.boxes import points_in_boxes
    from pipelines.lidar import load_points

    sample = val_index[1]
    ann_tokens = [t for t in nusc.get("sample", sample.token)["anns"]]
    assert len(sample.gt.boxes) == len(ann_tokens)
    points = load_points(sample.lidar.path)
    counts = points_in_boxes(points[:, :3], sample.gt.boxes).sum(axis=1)
    assert np.array_equal(counts, sample.gt.num_lidar_pts)
    bottoms = sample.gt.boxes[:, 2] - sample.gt.boxes[:, 5] / 2   # every object stands on the ground
    assert np.allclose(bottoms, -1.84, atol=1e-3)
    assert sample.gt.visibility.min() >= 1 and sample.gt.visibility.max() <= 4


def test_projected_centres_show_the_object_colour(val_index) -> None:
    """Each well-visible GT centre, projected with lidar2img, lands on a pixel of its class colour."""
    checked, hits = 0, 0
    for sample in val_index:
        gt = sample.gt
        near = np.hypot(gt.boxes[:, 0], gt.boxes[:, 1]) < 30.0
        for i in np.flatnonzero(near & (gt.visibility == 4) & (gt.num_lidar_pts > 30)):
            centre = np.append(gt.boxes[i, :3], 1.0)
            for cam in sample.cameras:
                u, v, z, _ = cam.lidar2img @ centre
                if z <= 0.5:
                    continue
                u, v = u / z, v / z
                if not (2 <= u < cam.size[0] - 2 and 2 <= v < cam.size[1] - 2):
                    continue
                patch = np.asarray(Image.open(cam.path))[int(v) - 1:int(v) + 2, int(u) - 1:int(u) + 2]
                r, g, b = np.median(patch.reshape(-1, 3), axis=0) / 255.0
                hue, sat, _ = colorsys.rgb_to_hsv(r, g, b)
                checked += 1
                hits += sat > 0.3 and class_of_hue(hue * 360.0) == gt.names[i]
                break
    assert checked >= 10
    assert hits / checked >= 0.9, (hits, checked)


def test_bad_roots_and_splits_give_clear_errors(synth_root: Path, nusc, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_nuscenes(tmp_path / "nowhere", "v1.0-synth")
    with pytest.raises(DatasetError, match=r"versions present: v1.0-synth"):
        load_nuscenes(synth_root, "v1.0-trainval")
    with pytest.raises(SplitError, match="synth_val") as err:
        SampleIndex.from_nuscenes(nusc, ["synth_test"])
    assert "mini_val" in str(err.value)
