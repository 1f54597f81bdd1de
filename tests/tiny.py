"""Tiny configs shared by the tests: a real teacher, cache and students small enough for seconds on a CPU, and
helpers to run `stxd-cache extract` on them and to read or damage the stores it writes."""

from __future__ import annotations

import re
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
import zarr
from click.testing import CliRunner

from pipelines.config import from_dict, to_dict
from stxd_cache.extract import ExtractConfig, ExtractJob
from stxd_cache.teacher.checkpoint import save_teacher
from stxd_cache.teacher.config import TeacherConfig
from stxd_cache.teacher.model import build_teacher

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
"""The virtual environment's console scripts (`stxd-cache`, ...)."""
SPLITS = ("synth_train", "synth_val")
TASKS = [["car"], ["truck", "construction_vehicle"], ["bus", "trailer"], ["barrier"], ["motorcycle", "bicycle"],
         ["pedestrian", "traffic_cone"]]
NMS_RADIUS = [2.0, 3.4, 3.2, 1.0, 0.9, 0.4]
TINY_TEACHER = {
    "name": "tiny",
    "num_sweeps": 2,
    "voxel": {"point_range": [-25.6, -25.6, -5.0, 25.6, 25.6, 3.0], "voxel_size": [0.8, 0.8, 1.0],
              "max_points_per_voxel": 5, "max_voxels": 8000},
    "encoder": {"block_type": "conv_module", "base_channels": 8, "encoder_channels": [[8], [16, 16]],
                "encoder_paddings": [[1], [1, 1]], "output_channels": 8},
    "backbone": {"layer_nums": [1, 1], "layer_strides": [1, 2], "out_channels": [16, 32]},
    "neck": {"upsample_strides": [1, 2], "out_channels": [16, 16]},
    "head": {"tasks": TASKS, "share_conv_channels": 16, "head_conv_channels": 8},
    "decode": {"score_threshold": 0.05, "pre_max_per_task": 50, "post_max": 60, "nms": "circle",
               "nms_radius": NMS_RADIUS},
}
VERSION = "v1.0-synth"
CACHE = ExtractConfig(grid_half_extent=25.6, grid_size=16, token_grid=4, k_max=2, box_capacity=40,
                      rows_per_shard=4, zstd_level=1)


def tiny_student(name: str, **model: object) -> dict:
    """A student run config (as YAML would give it) on the tiny cache's ±25.6 m range, 8×8 BEV, 64×32 images."""
    base = {
        "name": name, "grid_half_extent": 25.6, "grid_size": 8, "embed_dims": 16,
        "backbone": {"depth": 18, "base_channels": 8, "num_stages": 2, "out_indices": [1]},
        "bevformer": {"num_layers": 1, "num_heads": 2, "num_points": 1, "tsa_points": 2, "pillar_heights": [-1.0, 0.5],
                      "ffn_channels": 16, "queue": 1, "dropout": 0.0},
        "uvtr": {"depth_bins": 8, "depth_range": [1.0, 40.0], "heights": [-1.5, 0.0], "sweeps": 1, "bev_convs": 1},
        "head": {"tasks": TASKS, "share_conv_channels": 8, "head_conv_channels": 8},
        "decode": {"score_threshold": 0.0, "pre_max_per_task": 20, "post_max": 50, "nms": "circle",
                   "nms_radius": NMS_RADIUS},
    }
    base.update(model)
    return {
        "model": base,
        "data": {"image_size": [64, 32], "batch_size": 2, "num_workers": 0},
        "train": {"max_steps": 4, "checkpoint_every": 2, "log_every": 1, "seed": 0},
        "optim": {"lr": 0.001, "schedule": "cosine", "grad_clip": 10.0},
    }


def tiny_teacher_checkpoint(path: Path, seed: int = 0, score_threshold: float | None = None) -> Path:
    """An untrained tiny teacher whose head is perturbed so that its scores spread out, saved at `path`
    (`score_threshold`: its decode threshold instead of TINY_TEACHER's)."""
    torch.manual_seed(seed)
    raw = TINY_TEACHER if score_threshold is None else {
        **TINY_TEACHER, "decode": {**TINY_TEACHER["decode"], "score_threshold": score_threshold}}
    cfg = from_dict(TeacherConfig, raw)
    model = build_teacher(cfg, "cpu")
    with torch.no_grad():   # an untrained head would put every score at 0.1
        for p in model.head.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    save_teacher(model, cfg, path)
    return path


def extract_job(root: Path, ckpt: Path, out: Path, **cfg: object) -> ExtractJob:
    """Extraction of both tiny splits on the CPU with the `CACHE` config (fields overridden by `cfg`)."""
    return ExtractJob(dataroot=str(root), version=VERSION, splits=SPLITS, teacher_path=str(ckpt),
                      teacher_config_path=None, trust_checkpoint=False, out=str(out), cfg=replace(CACHE, **cfg),
                      device="cpu")


def cache_config_file(directory: Path, **cfg: object) -> Path:
    """The `CACHE` config (fields overridden by `cfg`) written as `directory/cache.yaml`, for `--config`."""
    path = directory / "cache.yaml"
    path.write_text(yaml.safe_dump(to_dict(replace(CACHE, **cfg))))
    return path


def extract_args(root: Path, ckpt: Path, out: Path, config: Path, *extra: object) -> list[str]:
    """`stxd-cache` arguments that extract both tiny splits on the CPU with the cache YAML `config`, then `extra`."""
    return ["extract", "--dataroot", str(root), "--version", VERSION, "--splits", ",".join(SPLITS),
            "--teacher", str(ckpt), "--config", str(config), "--out", str(out), "--device", "cpu",
            *(str(e) for e in extra)]


def cache_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of the store at `path`, decoded."""
    group = zarr.open_group(str(path), mode="r")
    return {name: np.asarray(arr[...]) for name, arr in group.arrays()}


def shard_path(array_dir: Path, row: int, rows_per_shard: int) -> Path:
    """The stored object (shard, or chunk when `rows_per_shard` is 1) holding row `row` of a (S, C, H, W) array
    such as `bev`."""
    return array_dir / "c" / str(row // rows_per_shard) / "0" / "0" / "0"


def flip_byte_of_row(array_dir: Path, row: int, rows_per_shard: int) -> None:
    """Flip one byte in the middle of the stored chunk of row `row` of a (S, C, H, W) array such as `bev`."""
    path = shard_path(array_dir, row, rows_per_shard)
    if rows_per_shard == 1:
        start, length = 0, None
    else:
        raw = path.read_bytes()
        index = np.frombuffer(raw[-(16 * rows_per_shard + 4):-4], dtype="<u8").reshape(rows_per_shard, 2)
        start, length = (int(v) for v in index[row % rows_per_shard])
    raw = bytearray(path.read_bytes())
    middle = start + (length if length is not None else len(raw)) // 2
    raw[middle] ^= 0x5A
    path.write_bytes(bytes(raw))


def cli_error(main: Any, *args: object) -> str:
    """Run a CLI in this process: it must exit 2 through its error report (not an escaped exception), with a
    single `error:` paragraph and no traceback. Returns the paragraph unwrapped from the terminal width."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return error_paragraph(result.stderr)


def error_paragraph(stderr: str) -> str:
    """The single `error:` paragraph that ends a CLI's stderr (a progress bar or a library warning may precede it),
    with no traceback, unwrapped from the terminal width."""
    assert "Traceback" not in stderr, stderr
    starts = [m.start() for m in re.finditer(r"(?m)^error:", stderr)]
    assert len(starts) == 1, stderr
    paragraph = stderr[starts[0]:].strip()
    assert "\n\n" not in paragraph and "\r" not in paragraph
    return " ".join(paragraph.split()).removeprefix("error: ")


def strip_annotations(root: Path, split: str, out: Path) -> Path:
    """A copy of the dataset root at `out` (sensor folders linked, tables copied) whose `split` has no annotations,
    as nuScenes' test split."""
    import json

    out.mkdir()
    for entry in root.iterdir():
        if entry.name != VERSION:
            (out / entry.name).symlink_to(entry.resolve())
    tables = out / VERSION
    shutil.copytree(root / VERSION, tables)
    scenes = set(json.loads((tables / "splits.json").read_text())[split])
    scene_tokens = {s["token"] for s in json.loads((tables / "scene.json").read_text()) if s["name"] in scenes}
    samples = {s["token"] for s in json.loads((tables / "sample.json").read_text())
               if s["scene_token"] in scene_tokens}
    anns = json.loads((tables / "sample_annotation.json").read_text())
    kept = [a for a in anns if a["sample_token"] not in samples]
    assert len(kept) < len(anns)
    (tables / "sample_annotation.json").write_text(json.dumps(kept))
    return out
