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
from torch import nn

from pipelines.config import to_dict
from pipelines.device import resolve_device
from pipelines.errors import ConfigError
from stxd_cache.teacher.data import LidarBatch, LidarDataset, collate
from stxd_train.configs import TeacherDataConfig, TeacherRunConfig  # noqa: F401  (re-exported)


class TeacherLoss(nn.Module):
    """The engine's model protocol for the teacher: a batch in, its weighted loss terms out."""

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.teacher = teacher

    def forward(self, batch: LidarBatch) -> dict[str, torch.Tensor]:
        return self.teacher.loss(self.teacher(batch.points), batch.gt_boxes, batch.gt_labels)


def train_teacher(cfg: TeacherRunConfig, *, dataroot: str, version: str, out: str | Path, resume: bool = False,
                  device: str = "auto") -> Path:
    """Train the teacher into run folder `out`; returns the path of the exported `teacher.pt`."""
    from torch.utils.data import DataLoader

    from pipelines.nuscenes import SampleIndex
    from pipelines.paths import check_output_path
    from stxd_cache.teacher.checkpoint import save_teacher
    from stxd_cache.teacher.model import build_teacher
    from stxd_train.engine import (
        CheckpointHook,
        MetricsHook,
        ProgressHook,
        ResumableSampler,
        RunConfigHook,
        Trainer,
        atomic_write_text,
        build_optimizer,
        build_scheduler,
        check_run_config,
        loader_generator,
        seed_everything,
        seed_worker,
        write_errors,
    )

    out = check_output_path(out, inputs={"--dataroot": dataroot})
    run_config = {"kind": "teacher", "dataroot": str(dataroot), "version": version, **to_dict(cfg)}
    if resume:
        check_run_config(out, run_config)
    dev = resolve_device(device)
    tc, dc = cfg.train, cfg.data
    seed_everything(tc.seed)
    index = SampleIndex.load(dataroot, version, dc.train_splits, k_prev=0, max_sweeps=cfg.model.num_sweeps)
    if len(index) == 0:
        raise ConfigError(f"no samples in {', '.join(dc.train_splits)} of {dataroot} ({version})")
    dataset = LidarDataset(index, num_sweeps=cfg.model.num_sweeps, point_range=cfg.model.voxel.point_range,
                           augment=dc.augment, seed=tc.seed, min_points=dc.min_points)
    sampler = ResumableSampler(len(dataset), batch_size=dc.batch_size, shuffle=True, seed=tc.seed, drop_last=True,
                               tag_epoch=True)
    data = DataLoader(dataset, batch_sampler=sampler, num_workers=dc.num_workers, collate_fn=collate,
                      worker_init_fn=seed_worker, generator=loader_generator(tc.seed),
                      persistent_workers=False)
    teacher = build_teacher(cfg.model, device=dev)
    model = TeacherLoss(teacher).to(dev)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, tc.max_steps)
    hooks = [RunConfigHook(config=run_config),
             MetricsHook(every=tc.log_every), CheckpointHook(every=tc.checkpoint_every, keep_steps=tc.keep_checkpoints),
             ProgressHook()]
    trainer = Trainer(model=model, optimizer=optimizer, scheduler=scheduler, data=data, out_dir=out,
                      max_steps=tc.max_steps, hooks=hooks, device=dev, grad_clip=cfg.optim.grad_clip, amp=tc.amp,
                      seed=tc.seed)
    trainer.train(resume=resume)
    seconds = out / "train_seconds.txt"
    # A resume that trains no step (a finished run resumed to rewrite teacher.pt) keeps the time that trained it.
    if trainer.step > trainer.start_step or not seconds.is_file():
        atomic_write_text(seconds, f"{trainer.train_seconds:.1f}\n")
    path = out / "teacher.pt"
    with write_errors(path):
        save_teacher(teacher, cfg.model, path)
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
