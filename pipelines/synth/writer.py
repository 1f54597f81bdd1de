"""`stxd-data synth`: write a complete synthetic nuScenes-format root (tables, splits, sensor files,
maps), scene by scene in parallel processes. Output depends only on the config, never on the number
of workers or the wall clock."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipelines.classes import ATTRIBUTES, CATEGORY_TO_CLASS, VISIBILITY_LEVELS
from pipelines.config import to_dict
from pipelines.errors import DatasetError
from pipelines.nuscenes import SYNTH_STAMP, TABLES
from pipelines.paths import check_output_path
from pipelines.synth import rig, scene
from pipelines.synth.config import SynthConfig

_OUTPUT_FOLDERS = ("samples", "sweeps", "maps")
#: Written last into the table folder: its presence means the generation completed (and the root is synthetic).
CONFIG_FILE = SYNTH_STAMP
#: Written into the root before anything else: `--overwrite` removes only folders of a root that carries it.
OWNER_FILE = ".stxd-synth"


@dataclass(frozen=True)
class SynthSummary:
    """What a generation produced, for the CLI's report."""

    root: Path
    version: str
    scenes: int
    samples: int
    annotations: int
    seconds: float
    bytes_on_disk: int
    reused: bool = False


def _scene_job(args: tuple[SynthConfig, int, str]) -> dict[str, list[dict[str, Any]]]:
    cfg, idx, root = args
    return scene.simulate(cfg, idx, Path(root))


def generate(cfg: SynthConfig, out: str | Path, *, workers: int | None = None, overwrite: bool = False,
             reuse: bool = False, progress: Callable[[int, int], None] | None = None) -> SynthSummary:
    """Write the dataset described by `cfg` to `out`.

    Args:
        cfg: what to generate.
        out: dataset root; `out/<version>/` receives the tables.
        workers: processes generating scenes in parallel (default: the CPU count).
        overwrite: replace a dataset that this writer generated at `out` (only the folders it creates; a root
            without its `.stxd-synth` marker, such as a real nuScenes root, is never removed).
        reuse: keep a complete dataset at `out` that was generated from the same config; one that this writer
            started but did not finish is generated again.
        progress: called as `progress(done, total)` after each scene.
    """
    start = time.perf_counter()
    root = check_output_path(out)
    table_dir = root / cfg.version
    stamp = table_dir / CONFIG_FILE   # written last: its presence means the generation completed
    if reuse and stamp.is_file() and yaml.safe_load(stamp.read_text()) == _stamp_record(cfg):
        return _summary(root, cfg, time.perf_counter() - start, reused=True)
    existing = [p for p in (table_dir, *(root / f for f in _OUTPUT_FOLDERS)) if p.exists()]
    # A generation of ours that stopped before its stamp (killed, or a full disk) is redone under --reuse.
    interrupted = reuse and not stamp.is_file() and (root / OWNER_FILE).is_file()
    if existing and not (overwrite or interrupted):
        raise DatasetError(f"{root} already holds a dataset ({', '.join(str(p) for p in existing)}); "
                           "pass --overwrite to replace it, --reuse to keep it if it was generated from the "
                           "same config, or choose another --out")
    if existing and not ((root / OWNER_FILE).is_file() or stamp.is_file()):
        raise DatasetError(f"{root} holds {', '.join(str(p) for p in existing)} but was not written by "
                           f"`stxd-data synth` (neither its {OWNER_FILE} marker nor {stamp} is there), so "
                           "--overwrite will not remove them; "
                           "choose another --out, or remove them yourself if they are yours")
    for path in existing:
        shutil.rmtree(path)
    root.mkdir(exist_ok=True)
    (root / OWNER_FILE).write_text("written by stxd-data synth; `--overwrite` may replace this root's dataset\n")
    table_dir.mkdir(parents=True, exist_ok=True)

    workers = max(1, min(workers or os.cpu_count() or 1, cfg.scenes))
    jobs = [(cfg, idx, str(root)) for idx in range(cfg.scenes)]
    results: list[dict[str, list[dict[str, Any]]]] = []
    if workers == 1:
        for i, job in enumerate(jobs):
            results.append(_scene_job(job))
            if progress:
                progress(i + 1, len(jobs))
    else:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for i, result in enumerate(pool.map(_scene_job, jobs)):
                results.append(result)
                if progress:
                    progress(i + 1, len(jobs))

    tables = _shared_tables(cfg.seed)
    for name in TABLES:
        tables.setdefault(name, [])
        for result in results:
            tables[name].extend(result.get(name, []))
    for name in TABLES:
        with open(table_dir / f"{name}.json", "w") as f:
            json.dump(tables[name], f, indent=0)
    splits = {name: [scene.scene_name(i) for i in scenes] for name, scenes in cfg.splits.items()}
    with open(table_dir / "splits.json", "w") as f:
        json.dump(splits, f, indent=1)
    stamp.write_text(yaml.safe_dump(_stamp_record(cfg)))
    return _summary(root, cfg, time.perf_counter() - start)


def _stamp_record(cfg: SynthConfig) -> dict[str, Any]:
    """The config as `CONFIG_FILE` records it. Without a test split, `test_fraction` is left out, so that roots
    written before that field existed stay byte-identical and are still kept by `--reuse`."""
    record = to_dict(cfg)
    if cfg.test_fraction == 0.0:
        del record["test_fraction"]
    return record


def _summary(root: Path, cfg: SynthConfig, seconds: float, reused: bool = False) -> SynthSummary:
    table_dir = root / cfg.version
    samples = len(json.loads((table_dir / "sample.json").read_text()))
    annotations = len(json.loads((table_dir / "sample_annotation.json").read_text()))
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    return SynthSummary(root=root, version=cfg.version, scenes=cfg.scenes, samples=samples,
                        annotations=annotations, seconds=seconds, bytes_on_disk=size, reused=reused)


def _shared_tables(seed: int) -> dict[str, list[dict[str, Any]]]:
    tokens = scene.shared_tokens(seed)
    category = [{"token": tokens["category"][name], "name": name, "description": f"nuScenes category {name}",
                 "index": i} for i, name in enumerate(CATEGORY_TO_CLASS)]
    attribute = [{"token": tokens["attribute"][name], "name": name, "description": f"nuScenes attribute {name}"}
                 for name in ATTRIBUTES]
    visibility = [{"token": tok, "level": level, "description": f"visibility of whole object is {level[1:]}%"}
                  for tok, level in VISIBILITY_LEVELS.items()]
    sensor = [{"token": tokens["sensor"][ch], "channel": ch, "modality": "lidar" if ch == "LIDAR_TOP" else "camera"}
              for ch in ("LIDAR_TOP", *rig.CAMERAS)]
    return {"category": category, "attribute": attribute, "visibility": visibility, "sensor": sensor}
