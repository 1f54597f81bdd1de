"""The one training recipe of the LiDAR teacher and the camera students: the device (torchrun-aware), the sampler,
the loader, DDP, the optimizer, the schedule, the hooks and the `Trainer`, and the training time of the run.

The callers (`stxd_train.teacher.train_teacher`, `stxd_train.fit.fit`) build their dataset and their loss model,
then hand both to `train_run`; under torchrun every rank trains on its shard of each batch and rank 0 alone writes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from stxd_train.engine.checkpoint import atomic_write_text, check_run_config
from stxd_train.engine.distributed import init_from_env, is_main_process, rank, world_size
from stxd_train.engine.hooks import CheckpointHook, HookBase, MetricsHook, ProgressHook, RunConfigHook
from stxd_train.engine.optim import build_optimizer, build_scheduler
from stxd_train.engine.sampler import ResumableSampler, loader_generator, seed_worker
from stxd_train.engine.trainer import Trainer

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from stxd_train.configs import OptimConfig, TrainConfig

#: The training time of a finished run, in seconds over every resume (`Trainer.train_seconds`).
TRAIN_SECONDS_FILE = "train_seconds.txt"


class DetectorLoss(nn.Module):
    """The engine's model protocol for a detector: a batch in, its weighted loss terms out.

    The detector is registered under `name`, so that its parameters' keys in checkpoints start with it (`teacher.`,
    `student.`); it is called on the batch's field `inputs` (`points` for the teacher), or on the whole batch when
    `inputs` is None (camera students read images, calibration and past frames from it).
    """

    def __init__(self, name: str, detector: nn.Module, *, inputs: str | None = None) -> None:
        super().__init__()
        self.detector_name = name
        self.inputs = inputs
        self.add_module(name, detector)

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        detector = getattr(self, self.detector_name)
        output = detector(batch if self.inputs is None else getattr(batch, self.inputs))
        return detector.loss(output, batch.gt_boxes, batch.gt_labels)


def training_device(device: str) -> torch.device:
    """This process's device: the one torchrun assigns (joining its process group), else `device` resolved."""
    from pipelines.device import resolve_device

    distributed = init_from_env()
    return distributed if world_size() > 1 else resolve_device(device)


def start_run(out: Path, run_config: Mapping[str, Any], *, resume: bool) -> None:
    """Before anything is built: a resume continues only a run trained with the same `run_config`."""
    if resume:
        check_run_config(out, dict(run_config))


def train_run(model: nn.Module, dataset: Dataset[Any], *, collate: Callable[[Sequence[Any]], Any], out: Path,
              run_config: Mapping[str, Any], train: TrainConfig, optim: OptimConfig, batch_size: int,
              num_workers: int, device: torch.device, resume: bool, hooks: Sequence[HookBase] = (),
              data_note: str = "") -> Trainer:
    """Train `model` (a `DetectorLoss` or a `Distiller`) on `dataset` into run folder `out`; returns the trainer.

    Batches of `batch_size` per rank are drawn by a resumable, epoch-tagged `ResumableSampler` (drop_last), loaded by
    `num_workers` seeded workers; `model` is moved to `device` and wrapped in DDP under torchrun. The hooks write the
    run config, the metrics, the checkpoints and the progress bar, then `hooks`. When training ends rank 0 writes
    `train_seconds.txt`, unless a resume trained no step (a finished run resumed to rewrite its weights keeps the
    time that trained it).
    """
    sampler = ResumableSampler(len(dataset), batch_size=batch_size, shuffle=True, seed=train.seed,  # type: ignore[arg-type]
                               drop_last=True, rank=rank(), world_size=world_size(), tag_epoch=True)
    data = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate,
                      worker_init_fn=seed_worker, generator=loader_generator(train.seed), persistent_workers=False)
    model = model.to(device)
    if world_size() > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(model, optim)
    scheduler = build_scheduler(optimizer, optim, train.max_steps)
    all_hooks = [RunConfigHook(config=run_config), MetricsHook(every=train.log_every),
                 CheckpointHook(every=train.checkpoint_every, keep_steps=train.keep_checkpoints), ProgressHook(),
                 *hooks]
    trainer = Trainer(model=model, optimizer=optimizer, scheduler=scheduler, data=data, out_dir=out,
                      max_steps=train.max_steps, hooks=all_hooks, device=device, grad_clip=optim.grad_clip,
                      amp=train.amp, seed=train.seed, data_note=data_note)
    trainer.train(resume=resume)
    seconds = out / TRAIN_SECONDS_FILE
    if is_main_process() and (trainer.step > trainer.start_step or not seconds.is_file()):
        atomic_write_text(seconds, f"{trainer.train_seconds:.1f}\n")
    return trainer
