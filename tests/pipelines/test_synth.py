"""The synthetic root: devkit loading, table consistency, objects, motion and determinism."""

from __future__ import annotations

import contextlib
import filecmp
import io
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipelines.classes import DETECTION_CLASSES
from pipelines.synth import SynthConfig, generate
from pipelines.synth.world import CLASS_SIZES


def test_devkit_loads_without_warnings(synth_root: Path, synth_cfg: SynthConfig) -> None:
    from nuscenes.nuscenes import NuScenes

    err = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(err):
        warnings.simplefilter("always")
        nusc = NuScenes(version=synth_cfg.version, dataroot=str(synth_root), verbose=False)
    assert [str(w.message) for w in caught] == []
    assert err.getvalue() == ""
    for table in nusc.table_names:
        assert len(getattr(nusc, table)) > 0, table
    assert len(nusc.scene) == synth_cfg.scenes
    assert len(nusc.sample) == synth_cfg.scenes * synth_cfg.samples_per_scene
    assert all((synth_root / m["filename"]).is_file() for m in nusc.map)


def test_prev_next_chains_are_consistent(nusc) -> None:
    for table in ("sample", "sample_data", "sample_annotation"):
        records = getattr(nusc, table)
        for r in records:
            if r["next"]:
                assert nusc.get(table, r["next"])["prev"] == r["token"]
            if r["prev"]:
                assert nusc.get(table, r["prev"])["next"] == r["token"]
    for inst in nusc.instance:
        chain, token = [], inst["first_annotation_token"]
        while token:
            chain.append(token)
            token = nusc.get("sample_annotation", token)["next"]
        assert len(chain) == inst["nbr_annotations"]
        assert chain[-1] == inst["last_annotation_token"]


def test_sensor_frames_per_keyframe(nusc, synth_cfg: SynthConfig) -> None:
    frames = Counter((sd["sample_token"], sd["channel"], sd["is_key_frame"]) for sd in nusc.sample_data)
    for sample in nusc.sample:
        assert len(sample["data"]) == 7
        assert frames[(sample["token"], "LIDAR_TOP", False)] == synth_cfg.sweeps
    lidar = [sd for sd in nusc.sample_data if sd["channel"] == "LIDAR_TOP"]
    step = np.diff(sorted(sd["timestamp"] for sd in lidar if sd["sample_token"] == nusc.sample[1]["token"]))
    assert np.all(np.abs(step - 500_000 / (synth_cfg.sweeps + 1)) <= 1)
    assert all(sd["ego_pose_token"] in nusc._token2ind["ego_pose"] for sd in nusc.sample_data)


def test_objects_classes_sizes_and_attributes(nusc) -> None:
    names = Counter(a["category_name"] for a in nusc.sample_annotation)
    from pipelines.classes import CATEGORY_TO_CLASS

    classes = Counter(CATEGORY_TO_CLASS[n] for n in names.elements())
    assert set(classes) == set(DETECTION_CLASSES)
    for name in DETECTION_CLASSES:
        sizes = np.array([a["size"] for a in nusc.sample_annotation if CATEGORY_TO_CLASS[a["category_name"]] == name])
        expected = np.array(CLASS_SIZES[name])
        assert np.all(np.abs(np.median(sizes[:, :2], axis=0) / expected[:2] - 1) < 0.15), name
    for ann in nusc.sample_annotation:
        attrs = [nusc.get("attribute", t)["name"] for t in ann["attribute_tokens"]]
        cls = CATEGORY_TO_CLASS[ann["category_name"]]
        if cls in ("barrier", "traffic_cone"):
            assert attrs == []
        else:
            assert len(attrs) == 1
            speed = np.linalg.norm(nusc.box_velocity(ann["token"])[:2])
            if np.isfinite(speed):
                if attrs[0] in ("vehicle.parked", "vehicle.stopped", "pedestrian.standing", "cycle.without_rider"):
                    assert speed < 0.05, (attrs, speed)
                if attrs[0] in ("vehicle.moving", "pedestrian.moving"):
                    assert speed > 0.5, (attrs, speed)
        assert ann["num_radar_pts"] == 0
    assert {a["visibility_token"] for a in nusc.sample_annotation} >= {"1", "4"}


def test_ego_turns_and_changes_speed(nusc) -> None:
    from pyquaternion import Quaternion

    turned, speed_changed = False, False
    for scene in nusc.scene:
        poses, token = [], scene["first_sample_token"]
        while token:
            sample = nusc.get("sample", token)
            poses.append(nusc.get("ego_pose", nusc.get("sample_data", sample["data"]["LIDAR_TOP"])["ego_pose_token"]))
            token = sample["next"]
        xy = np.array([p["translation"][:2] for p in poses])
        yaw = np.unwrap([Quaternion(p["rotation"]).yaw_pitch_roll[0] for p in poses])
        speed = np.linalg.norm(np.diff(xy, axis=0), axis=1) / 0.5
        turned |= np.ptp(yaw) > np.deg2rad(3)
        speed_changed |= np.ptp(speed) > 0.5
        assert np.all(speed < 15.0)
        assert all(p["translation"][2] == 0.0 for p in poses)
    assert turned and speed_changed


def _small(seed: int) -> SynthConfig:
    return SynthConfig(scenes=2, samples_per_scene=2, seed=seed, image_size=(64, 36), sweeps=1, azimuth_steps=256)


def _same_tree(a: Path, b: Path) -> bool:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files_a == files_b and all(filecmp.cmp(a / f, b / f, shallow=False) for f in files_a)


def test_same_seed_is_byte_identical_whatever_the_workers(tmp_path: Path) -> None:
    generate(_small(3), tmp_path / "a", workers=1)
    generate(_small(3), tmp_path / "b", workers=2)
    generate(_small(4), tmp_path / "c", workers=1)
    assert _same_tree(tmp_path / "a", tmp_path / "b")
    assert not _same_tree(tmp_path / "a", tmp_path / "c")


def test_refuses_to_overwrite_without_flag(tmp_path: Path) -> None:
    from pipelines.config import to_dict
    from pipelines.errors import DatasetError

    cfg = SynthConfig(scenes=1, samples_per_scene=2, image_size=(32, 18), sweeps=0, azimuth_steps=128)
    generate(cfg, tmp_path, workers=1)
    with pytest.raises(DatasetError, match="--overwrite"):
        generate(cfg, tmp_path, workers=1)
    marker = tmp_path / "v1.0-synth" / "sample.json"
    before = marker.stat().st_mtime_ns
    kept = generate(cfg, tmp_path, workers=1, reuse=True)
    assert marker.stat().st_mtime_ns == before and kept.samples == 2
    generate(cfg, tmp_path, workers=1, overwrite=True)
    assert marker.stat().st_mtime_ns > before
    with pytest.raises(DatasetError, match="--reuse"):
        generate(SynthConfig(**{**to_dict(cfg), "seed": 1, "image_size": (32, 18)}), tmp_path, workers=1, reuse=True)
