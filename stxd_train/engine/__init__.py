"""A small training loop with hooks, shared by the LiDAR teacher and the camera students.

`recipe.train_run` is the one wiring that both use (torchrun-aware); spelled out, it is (the caller turns configs
into objects once; the loop never sees a config)::

    seed_everything(train_cfg.seed)
    device = init_from_env()
    model = build_model(...).to(device)                      # DDP(model) here when world_size() > 1
    optimizer = build_optimizer(model, optim_cfg)
    scheduler = build_scheduler(optimizer, optim_cfg, train_cfg.max_steps)
    sampler = ResumableSampler(len(dataset), batch_size=4, shuffle=True, seed=train_cfg.seed,
                               rank=rank(), world_size=world_size())
    data = DataLoader(dataset, batch_sampler=sampler, num_workers=4, collate_fn=collate,
                      worker_init_fn=seed_worker, generator=loader_generator(train_cfg.seed))
    hooks = [MetricsHook(every=train_cfg.log_every),       # before checkpoints: see MetricsHook
             CheckpointHook(every=train_cfg.checkpoint_every, keep_steps=train_cfg.keep_checkpoints), ProgressHook()]
    trainer = Trainer(model=model, optimizer=optimizer, scheduler=scheduler, data=data, out_dir=out_dir,
                      max_steps=train_cfg.max_steps, hooks=hooks, device=device,
                      grad_clip=optim_cfg.grad_clip, amp=train_cfg.amp, seed=train_cfg.seed)
    save_run_config(out_dir, {"train": to_dict(train_cfg), "optim": to_dict(optim_cfg)})
    trainer.train(resume=resume)
"""

from __future__ import annotations

from stxd_train.engine.checkpoint import (
    RUN_KEYS,
    CheckpointError,
    CheckpointWriteError,
    atomic_write,
    atomic_write_text,
    capture_rng_state,
    check_run_config,
    config_changes,
    load_checkpoint,
    load_run_config,
    restore_rng_state,
    save_checkpoint,
    save_run_config,
    write_errors,
)
from stxd_train.engine.distributed import (
    barrier,
    init_from_env,
    is_main_process,
    rank,
    reduce_dict,
    unwrap_model,
    world_size,
)
from stxd_train.engine.hooks import CheckpointHook, HookBase, MetricsHook, ProgressHook, RunConfigHook
from stxd_train.engine.optim import OptimConfig, build_optimizer, build_scheduler
from stxd_train.engine.recipe import TRAIN_SECONDS_FILE, DetectorLoss, start_run, train_run, training_device
from stxd_train.engine.sampler import (
    ResumableSampler,
    deterministic,
    loader_generator,
    seed_everything,
    seed_worker,
)
from stxd_train.engine.trainer import NonFiniteLossError, TrainConfig, Trainer, TrainingError, to_device

__all__ = [
    "RUN_KEYS",
    "TRAIN_SECONDS_FILE",
    "CheckpointError",
    "CheckpointHook",
    "CheckpointWriteError",
    "DetectorLoss",
    "HookBase",
    "MetricsHook",
    "NonFiniteLossError",
    "OptimConfig",
    "ProgressHook",
    "ResumableSampler",
    "RunConfigHook",
    "TrainConfig",
    "Trainer",
    "TrainingError",
    "atomic_write",
    "atomic_write_text",
    "barrier",
    "build_optimizer",
    "build_scheduler",
    "capture_rng_state",
    "check_run_config",
    "config_changes",
    "deterministic",
    "init_from_env",
    "is_main_process",
    "load_checkpoint",
    "load_run_config",
    "loader_generator",
    "rank",
    "reduce_dict",
    "restore_rng_state",
    "save_checkpoint",
    "save_run_config",
    "seed_everything",
    "seed_worker",
    "start_run",
    "to_device",
    "train_run",
    "training_device",
    "unwrap_model",
    "world_size",
    "write_errors",
]
