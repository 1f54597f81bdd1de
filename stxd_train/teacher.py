"""Training and evaluating the LiDAR teacher with the stage-two engine (`stxd-train teacher`, `eval`).

A run folder holds `config.yaml` (the resolved run config, with the dataset it was trained on),
`checkpoints/`, `metrics.jsonl`, `tb/`, and, when training finishes, `teacher.pt`: the native teacher
checkpoint that `stxd-cache extract --teacher` reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pipelines.config import to_dict
from pipelines.device import resolve_device
from pipelines.errors import ConfigError
from stxd_cache.teacher.data import LidarDataset, collate
from stxd_train.configs import TeacherDataConfig, TeacherRunConfig  # noqa: F401  (re-exported)


def train_teacher(cfg: TeacherRunConfig, *, dataroot: str, version: str, out: str | Path, resume: bool = False,
                  device: str = "auto") -> Path:
    """Train the teacher into run folder `out` (torchrun-aware: every rank trains on its shard of each batch, rank 0
    writes); returns the path of the exported `teacher.pt`."""
    from pipelines.nuscenes import SampleIndex
    from pipelines.paths import check_output_path
    from stxd_cache.teacher.checkpoint import save_teacher
    from stxd_cache.teacher.model import build_teacher
    from stxd_train.engine import (
        DetectorLoss,
        barrier,
        is_main_process,
        seed_everything,
        start_run,
        train_run,
        training_device,
        write_errors,
    )

    out = check_output_path(out, inputs={"--dataroot": dataroot})
    run_config = {"kind": "teacher", "dataroot": str(dataroot), "version": version, **to_dict(cfg)}
    start_run(out, run_config, resume=resume)
    dev = training_device(device)
    tc, dc = cfg.train, cfg.data
    seed_everything(tc.seed)
    index = SampleIndex.load(dataroot, version, dc.train_splits, k_prev=0, max_sweeps=cfg.model.num_sweeps)
    if len(index) == 0:
        raise ConfigError(f"no samples in {', '.join(dc.train_splits)} of {dataroot} ({version})")
    dataset = LidarDataset(index, num_sweeps=cfg.model.num_sweeps, point_range=cfg.model.voxel.point_range,
                           augment=dc.augment, seed=tc.seed, min_points=dc.min_points)
    teacher = build_teacher(cfg.model, device=dev)
    train_run(DetectorLoss("teacher", teacher, inputs="points"), dataset, collate=collate, out=out,
              run_config=run_config, train=tc, optim=cfg.optim, batch_size=dc.batch_size,
              num_workers=dc.num_workers, device=dev, resume=resume)
    path = out / "teacher.pt"
    if is_main_process():
        with write_errors(path):
            save_teacher(teacher, cfg.model, path)
    barrier()   # every rank returns once teacher.pt is there
    return path


def teacher_predictions(run: Path, saved: dict[str, Any], nusc: Any, split: str, device: str, *,
                        only: Sequence[str] | None = None) -> tuple[Any, dict[str, Any]]:
    """The teacher of run folder `run` decoded on every sample of `split` (or on its samples `only`): the split's
    `SampleIndex` and {sample token: Detections} (`stxd_train.scoring.predict` and `stxd_train.show` call this)."""
    from pipelines.evaluation import Detections
    from pipelines.nuscenes import SampleIndex
    from stxd_cache.teacher.checkpoint import load_teacher

    dev = resolve_device(device)
    loaded = load_teacher(run / "teacher.pt", device=dev, written_by="`stxd-train teacher`")
    teacher = loaded.model.eval()
    index = SampleIndex.from_nuscenes(nusc, [split], k_prev=0, max_sweeps=loaded.config.num_sweeps)
    dataset = LidarDataset(index, num_sweeps=loaded.config.num_sweeps, point_range=loaded.config.voxel.point_range)
    detections: dict[str, Detections] = {}
    with torch.inference_mode():
        for i in range(len(dataset)) if only is None else [index.index_of(t) for t in only]:
            item = dataset[i]
            det = teacher.decode(teacher([item.points.to(dev)]))[0]
            detections[item.token] = Detections(boxes=det.boxes.cpu().numpy(), scores=det.scores.cpu().numpy(),
                                                labels=det.labels.cpu().numpy())
    return index, detections
