"""`stxd-data check`: validate a nuScenes root (real or synthetic) and say precisely what is wrong."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.classes import CATEGORY_TO_CLASS, DETECTION_CLASSES
from pipelines.nuscenes import SYNTH_STAMP, TABLES, dangling_references, escapes_root


@dataclass
class CheckReport:
    """Problems found (empty when the root is valid) and counts of what is there."""

    root: Path
    version: str
    problems: list[str] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, problem: str) -> None:
        self.problems.append(problem)


def check_root(dataroot: str | Path, version: str, *, check_files: bool = True, load: bool = True,
               progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None) -> CheckReport:
    """Validate tables, foreign keys, splits, file names, referenced files and (with `load`) the devkit load of a
    root."""
    root = Path(dataroot)
    report = CheckReport(root=root, version=version)
    table_dir = root / version
    if not root.is_dir():
        report.add(f"dataroot {root} does not exist")
        return report
    if not table_dir.is_dir():
        report.add(f"no table folder {table_dir}: version {version!r} is not in this root")
        return report
    tables: dict[str, list[dict[str, Any]]] = {}
    for name in TABLES:
        path = table_dir / f"{name}.json"
        if not path.is_file():
            report.add(f"table {path} is missing")
            continue
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            report.add(f"table {path} is not valid JSON: {exc}")
            continue
        if not isinstance(data, list):
            report.add(f"table {path} holds a {type(data).__name__}, expected a list of records")
            continue
        tables[name] = data
    if len(tables) < len(TABLES):
        return report

    for problem in dangling_references(tables):
        report.add(problem)
    mapped_logs = {t for m in tables["map"] for t in m.get("log_tokens", [])}
    unmapped = [log["token"] for log in tables["log"] if log["token"] not in mapped_logs]
    if unmapped:
        report.add(f"{len(unmapped)} log(s) belong to no map record, e.g. {unmapped[0]}")
    for record in tables["map"]:
        if escapes_root(str(record.get("filename", ""))):
            report.add(f"map {record.get('token')}: filename {record.get('filename')!r} points outside the root")
        elif not (root / record.get("filename", "")).is_file():
            report.add(f"map {record.get('token')}: file {root / record.get('filename', '')} is missing")

    scene_names = {s["name"] for s in tables["scene"]}
    splits_path = table_dir / "splits.json"
    if splits_path.is_file():
        try:
            splits = json.loads(splits_path.read_text())
            for split, names in splits.items():
                unknown = [n for n in names if n not in scene_names]
                if unknown:
                    report.add(f"{splits_path}: split {split!r} names unknown scene(s) {', '.join(unknown[:5])}")
            report.counts["splits"] = {k: len(v) for k, v in splits.items()}
        except (json.JSONDecodeError, AttributeError, TypeError) as exc:
            report.add(f"{splits_path} is not a mapping of split name to scene names: {exc}")
    report.counts["split_samples"] = _split_samples(tables["scene"], table_dir)
    if tables["scene"] and not report.counts["split_samples"]:
        report.add(f"no split selects a sample of this root: none of its {len(tables['scene'])} scene names (e.g. "
                   f"{tables['scene'][0].get('name')!r}) is in an official nuScenes split, and {splits_path} "
                   f"{'names none of them' if splits_path.is_file() else 'does not exist'}; write a splits.json "
                   "that maps split names to scene names")

    escaping = [sd for sd in tables["sample_data"] if escapes_root(str(sd.get("filename", "")))]
    for sd in escaping[:20]:
        report.add(f"sample_data {sd.get('token')}: filename {sd.get('filename')!r} points outside the root "
                   "(absolute, or leading out with ..); stxd refuses to read it")
    if len(escaping) > 20:
        report.add(f"… and {len(escaping) - 20} more sample_data filenames point outside the root")
    if check_files:
        inside = [sd for sd in tables["sample_data"] if not escapes_root(str(sd.get("filename", "")))]
        for sd in (progress(inside) if progress else inside):
            _check_file(root, sd, report)

    if report.ok and load:
        from pipelines.nuscenes import load_nuscenes

        try:
            load_nuscenes(root, version)
        except Exception as exc:  # the devkit's own complaint, whatever its type
            report.add(f"the devkit cannot load the root: {exc}")

    categories = {c["token"]: c["name"] for c in tables["category"]}
    instances = {i["token"]: categories.get(i["category_token"], "?") for i in tables["instance"]}
    classes = Counter(CATEGORY_TO_CLASS.get(instances.get(a["instance_token"], ""), None)
                      for a in tables["sample_annotation"])
    report.counts.update({
        "scenes": len(tables["scene"]), "samples": len(tables["sample"]),
        "keyframes": sum(1 for sd in tables["sample_data"] if sd.get("is_key_frame")),
        "sample_data": len(tables["sample_data"]), "annotations": len(tables["sample_annotation"]),
        "instances": len(tables["instance"]),
        "classes": {name: classes.get(name, 0) for name in DETECTION_CLASSES},
    })
    return report


def link_outside_root(root: Path, path: Path) -> Path | None:
    """Where `path` really is, when it is a symbolic link that leads out of the dataset root; else None.

    The same rule as for table filenames (`escapes_root`), applied to the file system: a table's file must lie
    inside the root. A link into the root, or next to itself in the folder it sits in (the folder may be a link
    to another disk, as `samples/` often is), is fine.
    """
    if not path.is_symlink():
        return None
    target = Path(os.path.realpath(path))
    for base in (Path(os.path.realpath(root)), Path(os.path.realpath(path.parent))):
        if base == target or base in target.parents:
            return None
    return target


def _check_file(root: Path, sd: dict[str, Any], report: CheckReport) -> None:
    path = root / sd.get("filename", "")
    if not path.is_file():
        report.add(f"sample_data {sd.get('token')}: file {path} is missing")
        return
    outside = link_outside_root(root, path)
    if outside is not None:
        report.add(f"sample_data {sd.get('token')}: file {path} is a symbolic link to {outside}, outside the "
                   f"dataset root {root}; a table's files must lie inside the root: put the file itself there "
                   "(or a link to a file inside the root)")
        return
    if sd.get("fileformat") == "pcd" and path.name.endswith(".pcd.bin"):
        size = path.stat().st_size
        if size == 0 or size % 20:
            report.add(f"sample_data {sd.get('token')}: {path} has {size} bytes, expected a non-zero multiple "
                       "of 20 (5 float32 per point)")
    elif sd.get("fileformat") in ("jpg", "png"):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                size = img.size
        except (UnidentifiedImageError, OSError) as exc:
            report.add(f"sample_data {sd.get('token')}: {path} is not a readable image ({exc})")
            return
        expected = (sd.get("width"), sd.get("height"))
        if size != expected:
            report.add(f"sample_data {sd.get('token')}: {path} is {size[0]}x{size[1]}, the table says "
                       f"{expected[0]}x{expected[1]}")


def _split_samples(scenes: list[dict[str, Any]], table_dir: Path) -> dict[str, int]:
    """{split: samples it selects} for the splits of `splits.json` and, unless the root is synthetic, the official
    nuScenes splits; splits that select nothing are left out."""
    from nuscenes.utils.splits import create_splits_scenes

    per_scene = {s.get("name"): s.get("nbr_samples", 0) for s in scenes}
    splits: dict[str, Any] = {} if (table_dir / SYNTH_STAMP).is_file() else dict(create_splits_scenes())
    try:
        custom = json.loads((table_dir / "splits.json").read_text()) if (table_dir / "splits.json").is_file() else {}
        splits.update({k: v for k, v in custom.items() if isinstance(v, list)})
    except (json.JSONDecodeError, AttributeError):
        pass   # reported above
    counts = {k: sum(per_scene.get(n, 0) for n in v if isinstance(n, str)) for k, v in splits.items()}
    return {k: n for k, n in counts.items() if n}
