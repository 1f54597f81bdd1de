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


def test_scene_groups_are_disjoint_train_then_val_then_test() -> None:
    from pipelines.config import load_config
    from pipelines.errors import ConfigError

    cfg = SynthConfig(scenes=60, val_fraction=0.167, test_fraction=0.333)
    assert cfg.splits == {"synth_train": list(range(30)), "synth_val": list(range(30, 40)),
                          "synth_test": list(range(40, 60))}
    assert cfg.split_scenes == (list(range(30)), list(range(30, 40))) and cfg.test_scenes == list(range(40, 60))
    # Without a test fraction the splits are those written before synth_test existed.
    assert SynthConfig(scenes=10).splits == {"synth_train": list(range(8)), "synth_val": [8, 9]}
    assert SynthConfig(scenes=10).test_scenes == []
    assert SynthConfig(scenes=1).splits == {"synth_train": [0], "synth_val": [0]}
    # A small fraction still holds out one scene, and never one that another split uses.
    assert SynthConfig(scenes=3, val_fraction=0.34, test_fraction=0.01).splits == {
        "synth_train": [0], "synth_val": [1], "synth_test": [2]}
    with pytest.raises(ConfigError, match=r"test_fraction.*leaves synth_train at least one of the 2 scenes"):
        SynthConfig(scenes=2, test_fraction=0.1)
    with pytest.raises(ConfigError, match="test_fraction"):
        SynthConfig(scenes=10, test_fraction=1.0)

    bench = load_config(SynthConfig, Path(__file__).parents[2] / "configs" / "data" / "synth_bench.yaml")
    groups = bench.splits
    assert len(groups["synth_train"]) >= 30 and len(groups["synth_val"]) >= 10 and len(groups["synth_test"]) >= 20
    assert len(groups["synth_test"]) * bench.samples_per_scene >= 400
    assert sorted(i for scenes in groups.values() for i in scenes) == list(range(bench.scenes))


def test_synth_test_split_is_written_and_indexed(tmp_path: Path) -> None:
    """With a test fraction, splits.json names three disjoint scene groups, each indexed by the data layer and
    checked by `stxd-data check`; the config stamp records the fraction, so `--reuse` tells the roots apart."""
    import json

    from pipelines.check import check_root
    from pipelines.config import to_dict
    from pipelines.errors import DatasetError
    from pipelines.nuscenes import SampleIndex

    cfg = SynthConfig(scenes=3, samples_per_scene=2, image_size=(32, 18), sweeps=0, azimuth_steps=128,
                      val_fraction=0.34, test_fraction=0.34)
    generate(cfg, tmp_path, workers=1)
    splits = json.loads((tmp_path / "v1.0-synth" / "splits.json").read_text())
    assert splits == {"synth_train": ["synth-0000"], "synth_val": ["synth-0001"], "synth_test": ["synth-0002"]}
    tokens = {}
    for name in splits:
        index = SampleIndex.load(tmp_path, "v1.0-synth", [name])
        tokens[name] = {s.token for s in index}
        assert len(index) == 2
    assert not (tokens["synth_train"] & tokens["synth_val"] or tokens["synth_val"] & tokens["synth_test"]
                or tokens["synth_train"] & tokens["synth_test"])
    report = check_root(tmp_path, "v1.0-synth", check_files=False)
    assert report.ok and report.counts["splits"] == {"synth_train": 1, "synth_val": 1, "synth_test": 1}
    assert "test_fraction: 0.34" in (tmp_path / "v1.0-synth" / "synth_config.yaml").read_text()
    with pytest.raises(DatasetError, match="--reuse"):
        generate(SynthConfig(**{**to_dict(cfg), "test_fraction": 0.0, "image_size": (32, 18)}), tmp_path, workers=1,
                 reuse=True)


def test_without_test_fraction_the_split_file_and_stamp_are_unchanged(tmp_path: Path) -> None:
    """A root of an existing config is byte-identical to one written before synth_test existed: splits.json has
    two keys and the config stamp no `test_fraction`, so `--reuse` keeps such roots."""
    import json

    import yaml

    from pipelines.config import to_dict

    cfg = SynthConfig(scenes=2, samples_per_scene=2, image_size=(32, 18), sweeps=0, azimuth_steps=128)
    generate(cfg, tmp_path, workers=1)
    table_dir = tmp_path / "v1.0-synth"
    expected_splits = {"synth_train": ["synth-0000"], "synth_val": ["synth-0001"]}
    assert (table_dir / "splits.json").read_text() == json.dumps(expected_splits, indent=1)
    before = {k: v for k, v in to_dict(cfg).items() if k != "test_fraction"}
    assert (table_dir / "synth_config.yaml").read_text() == yaml.safe_dump(before)
    stamp = (table_dir / "synth_config.yaml").stat().st_mtime_ns
    assert generate(cfg, tmp_path, workers=1, reuse=True).reused
    assert (table_dir / "synth_config.yaml").stat().st_mtime_ns == stamp


# Heading cues: every class with a front and a back has a shape that a half turn changes, for the LiDAR and
# the cameras alike. Barriers and cones stay plain boxes: the devkit scores barrier yaw modulo 180° and
# ignores cone yaw.

_CUED = [(name, False) for name in DETECTION_CLASSES if name not in ("barrier", "traffic_cone")] + [
    ("motorcycle", True), ("bicycle", True)]
_SYMMETRIC = [("barrier", False), ("traffic_cone", False)]


def _object_box(name: str, ridden: bool, distance: float, bearing: float, yaw: float) -> np.ndarray:
    """(9,) box of a mean-sized object standing at `distance` m and `bearing` rad from the origin."""
    from pipelines.synth.world import RIDER_HEIGHT

    width, length, height = CLASS_SIZES[name]
    height = RIDER_HEIGHT if ridden else height
    return np.array([distance * np.cos(bearing), distance * np.sin(bearing), height / 2, width, length, height,
                     yaw, 0.0, 0.0])


def _scan_object(name: str, ridden: bool, box: np.ndarray) -> np.ndarray:
    """(P, 4) [x, y, z above the ground, ring] of the object's points, one 1084-step revolution of a
    sensor 1.84 m above the origin."""
    from pipelines.synth import lidar
    from pipelines.synth.ground import Ground
    from pipelines.synth.raycast import Solid
    from pipelines.synth.shapes import solid_parts

    ground = Ground(kind=np.zeros((1, 1), np.uint8), albedo=np.zeros((1, 1, 3), np.uint8))
    solid = Solid(*solid_parts(box, name, ridden=ridden))
    points, hit = lidar.scan(lidar.Beams.make(1084), np.zeros(2), 1.84, 0.0, box[None], [solid],
                             np.array([DETECTION_CLASSES.index(name)]), ground, np.random.default_rng(0))
    on_object = points[hit == 0].astype(np.float64)
    return np.concatenate([on_object[:, :2], on_object[:, 2:3] + 1.84, on_object[:, 4:5]], axis=1)


def _ring_profiles(points: np.ndarray, yaw: float) -> dict[int, np.ndarray]:
    """Per beam ring: (first, mean, last) position of its points along the heading `yaw`."""
    along = points[:, :2] @ np.array([np.cos(yaw), np.sin(yaw)])
    rings = points[:, 3].astype(int)
    return {int(r): np.array([along[rings == r].min(), along[rings == r].mean(), along[rings == r].max()])
            for r in np.unique(rings)}


def _half_turn_gap(name: str, ridden: bool, distance: float, view: float, yaw: float = 0.4) -> float:
    """How far (m) the scan of an object seen `view` rad off its heading moves along the heading when the
    object turns by 180° in place: the largest change of any ring's profile, inf where a ring hits only one."""
    bearing = yaw + view
    before = _ring_profiles(_scan_object(name, ridden, _object_box(name, ridden, distance, bearing, yaw)), yaw)
    after = _ring_profiles(_scan_object(name, ridden, _object_box(name, ridden, distance, bearing, yaw + np.pi)),
                           yaw)
    if before.keys() != after.keys():
        return float("inf")
    return max(float(np.abs(before[r] - after[r]).max()) for r in before)


@pytest.mark.parametrize(("name", "ridden"), _CUED + _SYMMETRIC)
def test_shape_parts_stay_inside_and_fill_the_annotation_box(name: str, ridden: bool) -> None:
    from pipelines.boxes import box_corners
    from pipelines.synth.shapes import solid_parts

    box = _object_box(name, ridden, 14.0, 0.7, -2.3)
    parts, cabin = solid_parts(box, name, ridden=ridden)
    assert parts.shape[1] == 9 and cabin.shape == (len(parts),) and np.allclose(parts[:, 6], box[6])
    corners = box_corners(parts).reshape(-1, 3) - box[:3]
    c, s = np.cos(box[6]), np.sin(box[6])
    local = np.stack([c * corners[:, 0] + s * corners[:, 1], -s * corners[:, 0] + c * corners[:, 1],
                      corners[:, 2]], axis=1)
    half = np.array([box[4], box[3], box[5]]) / 2
    assert np.all(np.abs(local) <= half + 1e-9)
    assert np.allclose(local.min(axis=0), -half)
    front = local[:, 0].max()
    if name == "pedestrian":   # the head leans forward, not quite to the front face
        assert 0.75 * half[0] < front <= half[0]
    else:
        assert np.allclose(local.max(axis=0), half)


@pytest.mark.parametrize("distance", [10.0, 20.0, 30.0])
@pytest.mark.parametrize(("name", "ridden"), _CUED)
def test_lidar_tells_front_from_back(name: str, ridden: bool, distance: float) -> None:
    for view in (np.pi / 2, np.pi / 4):      # seen from the side and obliquely
        assert _half_turn_gap(name, ridden, distance, view) > 0.08, (name, ridden, distance, view)


@pytest.mark.parametrize(("name", "ridden"), _SYMMETRIC)
def test_barrier_and_cone_stay_symmetric_under_a_half_turn(name: str, ridden: bool) -> None:
    for distance in (10.0, 20.0):
        for view in (np.pi / 2, np.pi / 4):
            assert _half_turn_gap(name, ridden, distance, view) < 1e-6


def _render_object(name: str, ridden: bool, yaw: float) -> tuple[np.ndarray, int]:
    """A 400×224 CAM_FRONT image of one object 15 m ahead, and its visible pixel count."""
    from pipelines.synth import palette, render, rig
    from pipelines.synth.ground import Ground
    from pipelines.synth.raycast import Solid
    from pipelines.synth.shapes import solid_parts

    camera = rig.cameras((400, 224))[0]
    box = _object_box(name, ridden, 15.0, 0.1, yaw)
    sun = np.array([0.3, 0.4, 0.83]) / np.linalg.norm([0.3, 0.4, 0.83])
    ground = Ground(kind=np.zeros((1, 1), np.uint8), albedo=np.zeros((1, 1, 3), np.uint8))
    image, counts = render.render(camera, np.array([0.0, 0.0, 1.51]), camera.ego_from_camera_rotation, box[None],
                                  [Solid(*solid_parts(box, name, ridden=ridden))],
                                  np.array([DETECTION_CLASSES.index(name)]), palette.base_color(name)[None],
                                  ground, sun, np.random.default_rng(0))
    return image.astype(np.int64), int(counts.visible[0])


@pytest.mark.parametrize(("name", "ridden"), _CUED + _SYMMETRIC)
def test_cameras_tell_front_from_back(name: str, ridden: bool) -> None:
    for view in (np.pi / 2, np.pi / 4):
        before, visible = _render_object(name, ridden, 0.1 + view)
        after, _ = _render_object(name, ridden, 0.1 + view + np.pi)
        changed = int((np.abs(before - after).max(axis=2) > 40).sum())
        if (name, ridden) in _SYMMETRIC:
            assert changed == 0, (name, view)
        else:
            assert changed >= max(30, 0.05 * visible), (name, ridden, view, changed, visible)


def test_ray_solid_matches_the_nearest_part() -> None:
    """The bound that `ray_solid` tests first loses no hit: it agrees with `ray_box` on every part."""
    from pipelines.synth.raycast import Solid, ray_box, ray_solid
    from pipelines.synth.shapes import solid_parts

    rng = np.random.default_rng(5)
    for name, ridden in _CUED:
        box = _object_box(name, ridden, 6.0, float(rng.uniform(-3, 3)), float(rng.uniform(-3, 3)))
        solid = Solid(*solid_parts(box, name, ridden=ridden))
        origin = np.array([0.0, 0.0, 1.5])
        dirs = box[:3] + rng.uniform(-0.7, 0.7, size=(4000, 3)) * box[[4, 4, 5]] - origin   # at and around it
        t_enter, _, face, _, part = ray_solid(origin, dirs, solid)
        per_part = [ray_box(origin, dirs, p) for p in solid.parts]
        t_part = np.stack([t for t, _, _, _ in per_part])
        assert np.array_equal(t_enter, t_part.min(axis=0))
        hit = np.flatnonzero(np.isfinite(t_enter))
        assert 400 < len(hit) < 3600, name
        assert np.array_equal(part[hit], t_part.argmin(axis=0)[hit])
        assert np.array_equal(face[hit], np.stack([f for _, _, f, _ in per_part])[part[hit], hit])


def test_reuse_redoes_an_interrupted_generation_of_its_own_only(tmp_path: Path) -> None:
    from pipelines.errors import DatasetError
    from pipelines.synth.writer import CONFIG_FILE, OWNER_FILE

    cfg = SynthConfig(scenes=1, samples_per_scene=2, image_size=(32, 18), sweeps=0, azimuth_steps=128)
    root = tmp_path / "root"
    generate(cfg, root, workers=1)
    stamp = root / cfg.version / CONFIG_FILE
    stamp.unlink()   # what a generation killed before its last write leaves: our marker, no stamp
    (root / cfg.version / "sample.json").write_text("[]")
    kept = generate(cfg, root, workers=1, reuse=True)
    assert stamp.is_file() and kept.samples == 2 and not kept.reused
    stamp.unlink()
    (root / OWNER_FILE).unlink()   # folders that no generation of ours marked: never removed
    with pytest.raises(DatasetError, match="--overwrite"):
        generate(cfg, root, workers=1, reuse=True)
    assert (root / "samples").is_dir()
