"""Simulation of one synthetic scene: world, ego trajectory, sensor frames and annotations, written
to disk as LiDAR `.pcd.bin` files, camera JPEGs and a map PNG, and returned as devkit table records."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipelines.classes import ATTRIBUTES, CATEGORY_TO_CLASS
from pipelines.geometry import quaternion_from_yaw
from pipelines.synth import ground as ground_mod
from pipelines.synth import lidar, palette, render, rig, shapes, world
from pipelines.synth.config import SynthConfig
from pipelines.synth.raycast import Solid

ANNOTATION_RANGE = 60.0   # m from the ego: objects annotated in a keyframe
BASE_TIMESTAMP = 1_700_000_000_000_000   # µs
SCENE_SPACING_US = 1_000_000_000


def scene_name(index: int) -> str:
    """A synthetic scene's name: `synth-0000`, ..., never the name of a nuScenes scene (`scene-0001`, ...), so that
    no official split selects it."""
    return f"synth-{index:04d}"


def token(seed: int, *parts: object) -> str:
    """A deterministic 32-hex token for a record."""
    return hashlib.md5("/".join(["stxd-synth", str(seed), *map(str, parts)]).encode()).hexdigest()


def shared_tokens(seed: int) -> dict[str, Any]:
    """Tokens of the records every scene refers to: categories, attributes, sensors."""
    return {
        "category": {name: token(seed, "category", name) for name in CATEGORY_TO_CLASS},
        "attribute": {name: token(seed, "attribute", name) for name in ATTRIBUTES},
        "sensor": {ch: token(seed, "sensor", ch) for ch in ("LIDAR_TOP", *rig.CAMERAS)},
    }


def _visibility_token(fraction: float) -> str:
    return "1" if fraction < 0.4 else "2" if fraction < 0.6 else "3" if fraction < 0.8 else "4"


def simulate(cfg: SynthConfig, scene_idx: int, root: Path) -> dict[str, list[dict[str, Any]]]:
    """Generate scene `scene_idx`: write its sensor files and map under `root`, return its records."""
    seed = cfg.seed
    rng_world = np.random.default_rng([seed, scene_idx, 0])
    rng_sensor = np.random.default_rng([seed, scene_idx, 1])
    rng_ground = np.random.default_rng([seed, scene_idx, 2])
    tokens = shared_tokens(seed)

    n_key = cfg.samples_per_scene
    duration = (n_key - 1) * 0.5
    s_start = 320.0
    road = world.Road.random(rng_world, length=s_start + world.EGO_SPEED[1] * duration + 320.0)
    ego = world.EgoMotion.random(rng_world, duration, s_start)
    reach = 90.0 + 14.0 * duration
    s_lo = float(np.interp(0.0, ego.t, ego.s)) - reach
    s_hi = float(np.interp(duration, ego.t, ego.s)) + reach
    actors = world.populate(rng_world, (s_lo, s_hi), ego.max_speed,
                             (s_start, float(np.interp(duration, ego.t, ego.s))))

    # frame times (s from the first keyframe): K sweeps before each keyframe, then the keyframe
    frames: list[tuple[int, int, bool]] = []   # (keyframe index, time µs, is keyframe)
    for k in range(n_key):
        key_us = k * cfg.keyframe_interval_us
        frames += [(k, key_us - lag, False) for lag in reversed(cfg.sweep_lags_us)]
        frames.append((k, key_us, True))

    # keep actors that come near the ego; shift the world into positive map coordinates
    ego_xy = np.array([ego.pose(road, t_us * 1e-6)[0] for _, t_us, _ in frames])
    near = np.zeros(len(actors), dtype=bool)
    for t in np.linspace(-0.5, duration, 4 * n_key):
        boxes = world.actor_states(road, actors, float(t))
        e_xy, _ = ego.pose(road, float(t))
        near |= np.hypot(*(boxes[:, :2] - e_xy).T) < lidar.MAX_RANGE + 10.0
    actors = [a for a, keep in zip(actors, near, strict=True) if keep]
    margin = 85.0
    offset = np.array([20.0, 20.0]) + margin - ego_xy.min(axis=0)
    road = road.shifted(offset)
    ego_xy = ego_xy + offset
    extent_m = ego_xy.max(axis=0) + margin + 20.0
    raster = (int(np.ceil(extent_m[0] / ground_mod.RESOLUTION)), int(np.ceil(extent_m[1] / ground_mod.RESOLUTION)))
    ground = ground_mod.build(road, raster, rng_ground)

    labels = np.array([a.label for a in actors], dtype=np.int64)
    colors = np.array([palette.base_color(a.class_name, a.color_jitter) for a in actors]).reshape(-1, 3)
    sun_az = rng_world.uniform(0, 2 * np.pi)
    sun = np.array([np.cos(sun_az) * 0.55, np.sin(sun_az) * 0.55, 0.83])
    sun /= np.linalg.norm(sun)
    beams = lidar.Beams.make(cfg.azimuth_steps)
    cameras = rig.cameras(cfg.image_size)

    log_name = f"n{seed:03d}-synth-{scene_idx:04d}"
    scene_token = token(seed, "scene", scene_idx)
    log_token = token(seed, "log", scene_idx)
    base_us = BASE_TIMESTAMP + scene_idx * SCENE_SPACING_US
    sample_tokens = [token(seed, "sample", scene_idx, k) for k in range(n_key)]
    calib = {ch: token(seed, "calibrated_sensor", scene_idx, ch) for ch in ("LIDAR_TOP", *rig.CAMERAS)}
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in (
        "log", "map", "scene", "sample", "sample_data", "ego_pose", "calibrated_sensor",
        "instance", "sample_annotation")}

    out["calibrated_sensor"].append({
        "token": calib["LIDAR_TOP"], "sensor_token": tokens["sensor"]["LIDAR_TOP"],
        "translation": list(rig.LIDAR_TRANSLATION), "rotation": rig.lidar_rotation(), "camera_intrinsic": []})
    for cam in cameras:
        out["calibrated_sensor"].append({
            "token": calib[cam.channel], "sensor_token": tokens["sensor"][cam.channel],
            "translation": list(cam.translation), "rotation": cam.rotation,
            "camera_intrinsic": cam.intrinsic.tolist()})

    visible = np.zeros((n_key, len(actors)))
    coverage = np.zeros((n_key, len(actors)))
    lidar_pts = np.zeros((n_key, len(actors)), dtype=np.int64)
    in_range = np.zeros((n_key, len(actors)), dtype=bool)
    key_boxes: list[np.ndarray] = []
    lidar_sd: list[str] = []
    cam_sd: dict[str, list[str]] = {cam.channel: [] for cam in cameras}

    for (k, t_us, is_key), xy in zip(frames, ego_xy, strict=True):
        t = t_us * 1e-6
        _, yaw = ego.pose(road, t)
        ts = base_us + t_us
        boxes = world.actor_states(road, actors, t)
        lidar_xy = xy + _rot2(yaw) @ np.array(rig.LIDAR_TRANSLATION[:2])
        solids = [Solid(*shapes.solid_parts(box, actor.class_name, ridden=actor.attribute == "cycle.with_rider"))
                  for box, actor in zip(boxes, actors, strict=True)]
        points, hit = lidar.scan(beams, lidar_xy, rig.LIDAR_TRANSLATION[2], yaw + rig.LIDAR_YAW, boxes, solids,
                                 labels, ground, rng_sensor)
        folder = "samples" if is_key else "sweeps"
        name = f"{folder}/LIDAR_TOP/{log_name}__LIDAR_TOP__{ts}.pcd.bin"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        points.tofile(root / name)
        sd_token = token(seed, "sample_data", scene_idx, "LIDAR_TOP", t_us)
        lidar_sd.append(sd_token)
        out["sample_data"].append(_sample_data(sd_token, sample_tokens[k], calib["LIDAR_TOP"], ts, "pcd",
                                               is_key, 0, 0, name))
        out["ego_pose"].append({"token": sd_token, "timestamp": ts, "translation": [float(xy[0]), float(xy[1]), 0.0],
                                "rotation": quaternion_from_yaw(yaw)})
        if not is_key:
            continue
        key_boxes.append(boxes)
        lidar_pts[k] = np.bincount(hit[hit >= 0], minlength=len(actors))
        in_range[k] = np.hypot(*(boxes[:, :2] - xy).T) <= ANNOTATION_RANGE
        for cam in cameras:
            w_from_c = _rot3(yaw) @ cam.ego_from_camera_rotation
            position = np.array([*xy, 0.0]) + _rot3(yaw) @ np.array(cam.translation)
            image, counts = render.render(cam, position, w_from_c, boxes, solids, labels, colors, ground, sun,
                                          rng_sensor)
            visible[k] += counts.visible
            coverage[k] += counts.full
            name = f"samples/{cam.channel}/{log_name}__{cam.channel}__{ts}.jpg"
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / name, quality=cfg.jpeg_quality)
            sd_token = token(seed, "sample_data", scene_idx, cam.channel, t_us)
            cam_sd[cam.channel].append(sd_token)
            out["sample_data"].append(_sample_data(sd_token, sample_tokens[k], calib[cam.channel], ts, "jpg",
                                                   True, *cam.size, name))
            out["ego_pose"].append({"token": sd_token, "timestamp": ts,
                                    "translation": [float(xy[0]), float(xy[1]), 0.0],
                                    "rotation": quaternion_from_yaw(yaw)})
    _link(out["sample_data"], [lidar_sd, *cam_sd.values()])

    for k in range(n_key):
        out["sample"].append({"token": sample_tokens[k], "timestamp": base_us + k * cfg.keyframe_interval_us,
                              "prev": sample_tokens[k - 1] if k > 0 else "",
                              "next": sample_tokens[k + 1] if k + 1 < n_key else "",
                              "scene_token": scene_token})

    # annotations: each instance over the contiguous keyframes between its first and last in range
    for i, actor in enumerate(actors):
        keys = np.flatnonzero(in_range[:, i])
        if len(keys) == 0:
            continue
        span = range(int(keys[0]), int(keys[-1]) + 1)
        inst = token(seed, "instance", scene_idx, actor.ident)
        ann = [token(seed, "sample_annotation", scene_idx, actor.ident, k) for k in span]
        out["instance"].append({"token": inst, "category_token": tokens["category"][actor.category],
                                "nbr_annotations": len(ann), "first_annotation_token": ann[0],
                                "last_annotation_token": ann[-1]})
        for j, k in enumerate(span):
            box = key_boxes[k][i]
            fraction = visible[k, i] / coverage[k, i] if coverage[k, i] > 0 else 0.0
            out["sample_annotation"].append({
                "token": ann[j], "sample_token": sample_tokens[k], "instance_token": inst,
                "visibility_token": _visibility_token(fraction),
                "attribute_tokens": [tokens["attribute"][actor.attribute]] if actor.attribute else [],
                "translation": [float(box[0]), float(box[1]), float(box[2])],
                "size": [float(box[3]), float(box[4]), float(box[5])],
                "rotation": quaternion_from_yaw(float(box[6])),
                "prev": ann[j - 1] if j > 0 else "", "next": ann[j + 1] if j + 1 < len(ann) else "",
                "num_lidar_pts": int(lidar_pts[k, i]), "num_radar_pts": 0})

    map_token = token(seed, "map", scene_idx)
    map_name = f"maps/{map_token}.png"
    (root / map_name).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(ground.drivable_mask_png_rows(), mode="L").save(root / map_name)
    out["map"].append({"token": map_token, "log_tokens": [log_token], "category": "semantic_prior",
                       "filename": map_name})
    out["log"].append({"token": log_token, "logfile": log_name, "vehicle": "synth-ego",
                       "date_captured": "2026-01-01", "location": f"synth-town-{scene_idx:04d}"})
    kinds = sorted({a.class_name for a in actors})
    out["scene"].append({"token": scene_token, "log_token": log_token, "nbr_samples": n_key,
                         "first_sample_token": sample_tokens[0], "last_sample_token": sample_tokens[-1],
                         "name": scene_name(scene_idx),
                         "description": f"synthetic road, {len(actors)} objects: {', '.join(kinds)}"})
    return out


def _sample_data(sd_token: str, sample_token: str, calib_token: str, timestamp: int, fileformat: str,
                 is_key: bool, width: int, height: int, filename: str) -> dict[str, Any]:
    return {"token": sd_token, "sample_token": sample_token, "ego_pose_token": sd_token,
            "calibrated_sensor_token": calib_token, "timestamp": int(timestamp), "fileformat": fileformat,
            "is_key_frame": is_key, "height": int(height), "width": int(width), "filename": filename,
            "prev": "", "next": ""}


def _link(records: list[dict[str, Any]], chains: list[list[str]]) -> None:
    """Fill `prev`/`next` of sample_data records along each sensor's chain of tokens."""
    by_token = {r["token"]: r for r in records}
    for chain in chains:
        for a, b in itertools.pairwise(chain):
            by_token[a]["next"] = b
            by_token[b]["prev"] = a


def _rot2(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s], [s, c]])


def _rot3(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
