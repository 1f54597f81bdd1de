"""A scene-ordered index of nuScenes samples: the only module that reads devkit tables.

`SampleIndex` turns a `NuScenes` object and split names into plain, picklable records: per sample its
previous keyframes, LiDAR sweeps with their transforms into the keyframe LiDAR frame, six cameras
with intrinsics and `lidar2img`, ego poses, and GT boxes in the box convention of `pipelines.boxes`.
It works on real nuScenes (predefined splits) and on synthetic roots (custom splits in `splits.json`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.classes import CATEGORY_TO_CLASS, DETECTION_CLASSES
from pipelines.errors import DatasetError, SplitError
from pipelines.geometry import invert, transform_matrix

if TYPE_CHECKING:
    from nuscenes.nuscenes import NuScenes

#: The 13 devkit tables, in the devkit's load order.
TABLES: tuple[str, ...] = ("category", "attribute", "visibility", "instance", "sensor", "calibrated_sensor",
                           "ego_pose", "log", "scene", "sample", "sample_data", "sample_annotation", "map")

CAMERA_CHANNELS: tuple[str, ...] = ("CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT",
                                    "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT")


@dataclass(frozen=True)
class Sweep:
    """A LiDAR frame (keyframe or sweep) and its transform into the keyframe LiDAR frame."""

    path: str
    timestamp: int                  # µs
    time_lag: float                 # s, keyframe time minus this frame's time (>= 0)
    to_keyframe_lidar: np.ndarray   # (4, 4) this sensor frame → keyframe LiDAR frame


@dataclass(frozen=True)
class CameraView:
    """One camera of a sample. `lidar2img` maps keyframe-LiDAR points to pixels of the stored image."""

    channel: str
    path: str
    size: tuple[int, int]           # width, height of the stored image
    intrinsic: np.ndarray           # (3, 3)
    lidar2cam: np.ndarray           # (4, 4) keyframe LiDAR frame → camera frame
    ego2global: np.ndarray          # (4, 4) ego pose at the camera's timestamp

    @property
    def lidar2img(self) -> np.ndarray:
        """(4, 4) projection: [u·z, v·z, z, 1] = lidar2img @ [x, y, z, 1]."""
        k = np.eye(4)
        k[:3, :3] = self.intrinsic
        return k @ self.lidar2cam


@dataclass(frozen=True)
class GroundTruth:
    """Annotated objects of a sample, in the keyframe LiDAR frame (detection classes only)."""

    boxes: np.ndarray               # (N, 9) float32 [x, y, z, w, l, h, yaw, vx, vy]; unknown velocity → 0 (see
                                    # training_boxes for the NaN that training targets use)
    labels: np.ndarray              # (N,) int64 indices into DETECTION_CLASSES
    velocity_valid: np.ndarray      # (N,) bool: False where the devkit cannot estimate a velocity
    attributes: tuple[str, ...]     # '' where the annotation has none
    num_lidar_pts: np.ndarray       # (N,) int64
    visibility: np.ndarray          # (N,) int64 in 1..4
    instance_tokens: tuple[str, ...]

    @property
    def names(self) -> list[str]:
        return [DETECTION_CLASSES[i] for i in self.labels]

    def training_boxes(self) -> np.ndarray:
        """A copy of `boxes` (N, 9) with NaN where the velocity is unknown, so that the detection heads' losses
        (which skip NaN code entries) do not learn a velocity of 0 for those objects."""
        boxes = self.boxes.copy()
        boxes[~self.velocity_valid, 7:9] = np.nan
        return boxes


@dataclass(frozen=True)
class SampleInfo:
    """Everything stxd needs about one keyframe, as plain arrays and paths."""

    token: str
    scene_token: str
    scene_name: str
    timestamp: int                  # µs
    frame_index: int                # position in its scene, from 0
    prev_tokens: tuple[str, ...]    # up to K previous keyframes, nearest first
    lidar: Sweep                    # the keyframe LiDAR itself (time_lag 0, identity transform)
    sweeps: tuple[Sweep, ...]       # earlier LiDAR frames (sweeps and keyframes), nearest first
    lidar2ego: np.ndarray           # (4, 4)
    ego2global: np.ndarray          # (4, 4) at the keyframe LiDAR timestamp
    cameras: tuple[CameraView, ...]
    gt: GroundTruth

    @property
    def lidar2global(self) -> np.ndarray:
        return self.ego2global @ self.lidar2ego


#: Table versions of the official nuScenes releases, whose scene names the predefined splits list.
OFFICIAL_VERSIONS = ("v1.0-trainval", "v1.0-test", "v1.0-mini")
#: Written by `stxd-data synth` into the table folder of a synthetic root when it completes.
SYNTH_STAMP = "synth_config.yaml"


def _custom_splits(nusc: NuScenes) -> tuple[Path, dict[str, list[str]]]:
    path = Path(nusc.dataroot) / nusc.version / "splits.json"
    return path, (json.loads(path.read_text()) if path.is_file() else {})


def is_synthetic(nusc: NuScenes) -> bool:
    """Whether the root was written by `stxd-data synth` (its scenes are none of nuScenes')."""
    return (Path(nusc.dataroot) / nusc.version / SYNTH_STAMP).is_file()


def split_sample_counts(nusc: NuScenes) -> dict[str, int]:
    """{split: keyframes of this root it selects} for every split that selects at least one: the splits of
    `splits.json`, and the predefined nuScenes splits unless the root is synthetic."""
    from nuscenes.utils.splits import create_splits_scenes

    per_scene = {s["name"]: s["nbr_samples"] for s in nusc.scene}
    splits = {} if is_synthetic(nusc) else dict(create_splits_scenes())
    splits.update(_custom_splits(nusc)[1])
    counts = {name: sum(per_scene.get(scene, 0) for scene in scenes) for name, scenes in splits.items()}
    return {name: n for name, n in counts.items() if n}


def describe_splits(nusc: NuScenes) -> str:
    """The splits that select samples of this root with their sample counts, for error messages."""
    counts = split_sample_counts(nusc)
    if not counts:
        return f"no split selects a sample of {nusc.dataroot} ({nusc.version})"
    return "the splits with samples here are " + ", ".join(f"{k} ({n} samples)" for k, n in counts.items())


def split_scene_names(nusc: NuScenes, split: str) -> list[str]:
    """Scene names of a predefined nuScenes split or of a custom split in `<version>/splits.json`. An official
    split name on a synthetic root is an error: its scenes are not nuScenes'."""
    from nuscenes.utils.splits import create_splits_scenes

    path, custom = _custom_splits(nusc)
    if split in custom:
        return list(custom[split])
    predefined = create_splits_scenes()
    if split in predefined:
        if is_synthetic(nusc):
            raise SplitError(f"split {split!r} is an official nuScenes split, but {nusc.dataroot} ({nusc.version}) "
                             f"is a synthetic root written by `stxd-data synth`, whose scenes are not nuScenes' "
                             f"(official splits hold the scenes of {', '.join(OFFICIAL_VERSIONS)}); "
                             f"{describe_splits(nusc)}; pass one of these")
        return list(predefined[split])
    raise SplitError(
        f"unknown split {split!r} for {nusc.dataroot} ({nusc.version}); the predefined splits are "
        f"{', '.join(sorted(predefined))}" + (f" and {path} defines {', '.join(sorted(custom))}" if custom
                                              else f", and there is no custom split file {path}")
        + "; pass one of these names")


def load_nuscenes(dataroot: str | Path, version: str) -> NuScenes:
    """Open a nuScenes root with the devkit, turning its assertions into clear errors."""
    root = Path(dataroot)
    if not root.is_dir():
        raise DatasetError(f"dataroot {root} does not exist; pass the folder that holds samples/, sweeps/, "
                           f"maps/ and {version}/ (make one with `stxd-data synth --out {root}`)")
    table_dir = root / version
    if not table_dir.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "sample.json").is_file())
        raise DatasetError(f"version {version!r} not found in {root}: there is no {table_dir}/; versions "
                           f"present: {', '.join(found) or 'none'}; pass --version with one of them")
    missing = [t for t in TABLES if not (table_dir / f"{t}.json").is_file()]
    if missing:
        raise DatasetError(f"{table_dir} lacks the table(s) {', '.join(t + '.json' for t in missing)}; "
                           "the root is incomplete, re-download or re-generate it")
    from nuscenes.nuscenes import NuScenes

    try:
        return NuScenes(version=version, dataroot=str(root), verbose=False)
    except Exception as exc:  # the devkit's assertions, KeyErrors of dangling tokens, its own bare Exceptions
        cause = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, KeyError):
            cause = f"a record refers to the missing token {exc}{_reference_hint(root, version)}"
        raise DatasetError(f"the devkit cannot load {table_dir}: {cause}; run "
                           f"`stxd-data check --dataroot {root} --version {version}` for a full report") from None


#: (table, field, referenced table) of every token reference; '' is allowed for prev/next only.
FOREIGN_KEYS = (
    ("sample", "scene_token", "scene"), ("sample", "prev", "sample"), ("sample", "next", "sample"),
    ("sample_data", "sample_token", "sample"), ("sample_data", "ego_pose_token", "ego_pose"),
    ("sample_data", "calibrated_sensor_token", "calibrated_sensor"),
    ("sample_data", "prev", "sample_data"), ("sample_data", "next", "sample_data"),
    ("sample_annotation", "sample_token", "sample"), ("sample_annotation", "instance_token", "instance"),
    ("sample_annotation", "visibility_token", "visibility"),
    ("sample_annotation", "prev", "sample_annotation"), ("sample_annotation", "next", "sample_annotation"),
    ("instance", "category_token", "category"), ("instance", "first_annotation_token", "sample_annotation"),
    ("instance", "last_annotation_token", "sample_annotation"),
    ("calibrated_sensor", "sensor_token", "sensor"), ("scene", "log_token", "log"),
    ("scene", "first_sample_token", "sample"), ("scene", "last_sample_token", "sample"),
)


def dangling_references(tables: Mapping[str, Sequence[dict[str, Any]]]) -> list[str]:
    """One line per kind of broken token reference in a root's tables ({table name: records}, every table of
    `TABLES`): a foreign key of `FOREIGN_KEYS` to no record, or an annotation naming an unknown attribute; each with
    its count and a first example (`referrer → 'missing token'`)."""
    problems = []
    tokens = {name: {r.get("token") for r in records} for name, records in tables.items()}
    for table, key, target in FOREIGN_KEYS:
        dangling = [r for r in tables[table] if r.get(key, "") not in tokens[target]
                    and not (key in ("prev", "next") and r.get(key) == "")]
        if dangling:
            problems.append(f"{len(dangling)} {table} record(s) have a {key} that is not a {target} token, e.g. "
                            f"{table} {dangling[0].get('token')} → {dangling[0].get(key)!r}")
    attr_tokens = tokens["attribute"]
    bad_attr = [r for r in tables["sample_annotation"]
                if any(a not in attr_tokens for a in r.get("attribute_tokens", []))]
    if bad_attr:
        unknown = next(a for a in bad_attr[0]["attribute_tokens"] if a not in attr_tokens)
        problems.append(f"{len(bad_attr)} sample_annotation record(s) name unknown attribute tokens, "
                        f"e.g. {bad_attr[0]['token']} → {unknown!r}")
    return problems


def _reference_hint(root: Path, version: str) -> str:
    """The first dangling references of a root's tables, as a clause for an error message ('' if none)."""
    try:
        problems = dangling_references({name: json.loads((root / version / f"{name}.json").read_text())
                                        for name in TABLES})
    except Exception:  # tables too damaged to scan: the devkit's own message stands alone
        return ""
    return f" ({'; '.join(problems[:2])})" if problems else ""


def escapes_root(filename: str) -> bool:
    """True if a table's relative `filename` is absolute or leads out of the dataset root (`../x`)."""
    norm = os.path.normpath(filename)
    return os.path.isabs(filename) or norm == os.pardir or norm.startswith(os.pardir + os.sep)


def root_file(root: Path, filename: object, referrer: str) -> str:
    """The path of a file named by a table record, refusing names that are empty or point outside `root`.

    referrer: the record, e.g. "sample_data 0a1b…", named in the error.
    """
    if not isinstance(filename, str) or not filename:
        raise DatasetError(f"{referrer} in {root} has the filename {filename!r}; expected a path relative to the "
                           "dataset root such as samples/LIDAR_TOP/<name>.pcd.bin; fix or re-generate the table")
    if escapes_root(filename):
        raise DatasetError(f"{referrer} has the filename {filename!r}, which points outside the dataset root "
                           f"{root}; nuScenes filenames are relative paths inside the root (samples/…, sweeps/…), "
                           "so the table is damaged or was written by a broken converter: fix or re-generate it")
    return str(root / filename)


def _get(nusc: NuScenes, table: str, token: str, referrer: str) -> dict:
    """`nusc.get(table, token)`, with a DatasetError naming the referring record when the token is dangling."""
    try:
        return nusc.get(table, token)
    except KeyError:
        raise DatasetError(
            f"{referrer} refers to the {table} token {token!r}, which is not in {Path(nusc.dataroot) / nusc.version}/"
            f"{table}.json; the tables are inconsistent: run `stxd-data check --dataroot {nusc.dataroot} --version "
            f"{nusc.version}` for every dangling reference, then fix or re-generate the root") from None


class SampleIndex(Sequence[SampleInfo]):
    """Samples of the given splits in scene and time order, with K previous keyframes each."""

    def __init__(self, samples: Sequence[SampleInfo], *, dataroot: str, version: str,
                 splits: tuple[str, ...]) -> None:
        self._samples = list(samples)
        self._by_token = {s.token: i for i, s in enumerate(self._samples)}
        self.dataroot = dataroot
        self.version = version
        self.splits = splits

    @classmethod
    def from_nuscenes(cls, nusc: NuScenes, splits: Sequence[str], *, k_prev: int = 3,
                      max_sweeps: int = 10) -> SampleIndex:
        """Index `splits` of `nusc`.

        Args:
            nusc: a loaded devkit object.
            splits: split names, predefined (`train`, `val`, `mini_val`, …) or from `splits.json`.
            k_prev: previous keyframes listed per sample.
            max_sweeps: earlier LiDAR frames listed per sample (sweeps and keyframes, as mmdet3d does).
        """
        scene_names: set[str] = set()
        present = {s["name"] for s in nusc.scene}
        for split in splits:
            names = split_scene_names(nusc, split)
            if not present.intersection(names):
                why = f"none of its {len(names)} scenes is in this root" if names else "it names no scene"
                raise SplitError(f"split {split!r} selects no sample of {nusc.dataroot} ({nusc.version}): {why}; "
                                 f"{describe_splits(nusc)}; pass one of these")
            scene_names.update(names)
        samples: list[SampleInfo] = []
        for scene in nusc.scene:
            if scene["name"] not in scene_names:
                continue
            history: list[str] = []
            token, referrer = scene["first_sample_token"], f"scene {scene['name']}"
            while token:
                sample = _get(nusc, "sample", token, referrer)
                referrer = f"sample {token} (`next`)"
                samples.append(_sample_info(nusc, sample, scene, len(history), tuple(history[::-1][:k_prev]),
                                            max_sweeps))
                history.append(token)
                token = sample["next"]
        return cls(samples, dataroot=nusc.dataroot, version=nusc.version, splits=tuple(splits))

    @classmethod
    def load(cls, dataroot: str | Path, version: str, splits: Sequence[str], **kwargs: int) -> SampleIndex:
        """Open the root with the devkit and index `splits`."""
        return cls.from_nuscenes(load_nuscenes(dataroot, version), splits, **kwargs)

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, i: int) -> SampleInfo:  # type: ignore[override]
        return self._samples[i]

    def __iter__(self) -> Iterator[SampleInfo]:
        return iter(self._samples)

    def index_of(self, token: str) -> int:
        """Position of a sample token; a DatasetError names the token if it is not indexed."""
        if token not in self._by_token:
            raise DatasetError(f"sample {token} is not in the index of splits {', '.join(self.splits)} "
                               f"of {self.dataroot} ({self.version})")
        return self._by_token[token]

    def get(self, token: str) -> SampleInfo:
        return self._samples[self.index_of(token)]

    @property
    def tokens(self) -> list[str]:
        return [s.token for s in self._samples]


def _pose(nusc: NuScenes, sd: dict) -> tuple[np.ndarray, np.ndarray]:
    """(sensor2ego, ego2global) of a sample_data record."""
    referrer = f"sample_data {sd['token']}"
    cs = _get(nusc, "calibrated_sensor", sd["calibrated_sensor_token"], referrer)
    ep = _get(nusc, "ego_pose", sd["ego_pose_token"], referrer)
    return transform_matrix(cs["translation"], cs["rotation"]), transform_matrix(ep["translation"], ep["rotation"])


def _sample_info(nusc: NuScenes, sample: dict, scene: dict, frame_index: int, prev: tuple[str, ...],
                 max_sweeps: int) -> SampleInfo:
    root = Path(nusc.dataroot)
    where = f"sample {sample['token']}"
    lidar_sd = _get(nusc, "sample_data", sample["data"]["LIDAR_TOP"], where)
    lidar2ego, ego2global = _pose(nusc, lidar_sd)
    global2lidar = invert(ego2global @ lidar2ego)
    keyframe = Sweep(path=root_file(root, lidar_sd["filename"], f"sample_data {lidar_sd['token']}"),
                     timestamp=lidar_sd["timestamp"], time_lag=0.0, to_keyframe_lidar=np.eye(4))
    sweeps: list[Sweep] = []
    sd = lidar_sd
    while sd["prev"] and len(sweeps) < max_sweeps:
        sd = _get(nusc, "sample_data", sd["prev"], f"sample_data {sd['token']} (`prev`)")
        s2e, e2g = _pose(nusc, sd)
        sweeps.append(Sweep(path=root_file(root, sd["filename"], f"sample_data {sd['token']}"),
                            timestamp=sd["timestamp"], time_lag=(lidar_sd["timestamp"] - sd["timestamp"]) * 1e-6,
                            to_keyframe_lidar=global2lidar @ e2g @ s2e))
    cameras = []
    for channel in CAMERA_CHANNELS:
        if channel not in sample["data"]:
            raise DatasetError(f"sample {sample['token']} (scene {scene['name']}) has no {channel} image; "
                               "stxd needs all six cameras")
        cam_sd = _get(nusc, "sample_data", sample["data"][channel], where)
        cam2ego, cam_e2g = _pose(nusc, cam_sd)
        cs = _get(nusc, "calibrated_sensor", cam_sd["calibrated_sensor_token"], f"sample_data {cam_sd['token']}")
        cameras.append(CameraView(channel=channel, path=root_file(root, cam_sd["filename"],
                                                                  f"sample_data {cam_sd['token']}"),
                                  size=(int(cam_sd["width"]), int(cam_sd["height"])),
                                  intrinsic=np.asarray(cs["camera_intrinsic"], dtype=np.float64),
                                  lidar2cam=invert(cam_e2g @ cam2ego) @ ego2global @ lidar2ego,
                                  ego2global=cam_e2g))
    return SampleInfo(token=sample["token"], scene_token=scene["token"], scene_name=scene["name"],
                      timestamp=sample["timestamp"], frame_index=frame_index, prev_tokens=prev, lidar=keyframe,
                      sweeps=tuple(sweeps), lidar2ego=lidar2ego, ego2global=ego2global, cameras=tuple(cameras),
                      gt=_ground_truth(nusc, sample, lidar2ego, ego2global))


def _ground_truth(nusc: NuScenes, sample: dict, lidar2ego: np.ndarray, ego2global: np.ndarray) -> GroundTruth:
    from pipelines.boxes import boxes_from_global

    boxes, labels, attrs, pts, vis, inst = [], [], [], [], [], []
    for ann_token in sample["anns"]:
        where = f"sample_annotation {ann_token}"
        ann = _get(nusc, "sample_annotation", ann_token, f"sample {sample['token']}")
        name = CATEGORY_TO_CLASS.get(ann["category_name"])
        if name is None:
            continue
        for key in ("prev", "next"):   # box_velocity follows them inside the devkit
            if ann[key]:
                _get(nusc, "sample_annotation", ann[key], f"{where} (`{key}`)")
        box = nusc.get_box(ann_token)
        box.velocity = nusc.box_velocity(ann_token)
        boxes.append(box)
        labels.append(DETECTION_CLASSES.index(name))
        attrs.append(_get(nusc, "attribute", ann["attribute_tokens"][0], where)["name"]
                     if ann["attribute_tokens"] else "")
        pts.append(ann["num_lidar_pts"])
        vis.append(int(ann["visibility_token"]) if str(ann["visibility_token"]).isdigit() else 0)
        inst.append(ann["instance_token"])
    arr = boxes_from_global(boxes, lidar2ego, ego2global)
    valid = np.all(np.isfinite(arr[:, 7:9]), axis=1)
    arr[:, 7:9] = np.where(valid[:, None], arr[:, 7:9], 0.0)
    return GroundTruth(boxes=arr.astype(np.float32), labels=np.asarray(labels, dtype=np.int64),
                       velocity_valid=valid, attributes=tuple(attrs), num_lidar_pts=np.asarray(pts, dtype=np.int64),
                       visibility=np.asarray(vis, dtype=np.int64), instance_tokens=tuple(inst))
