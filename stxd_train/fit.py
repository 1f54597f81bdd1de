"""Training and evaluating camera students (`stxd-train fit`, `stxd-train eval`).

A run folder holds `config.yaml` (the resolved run config, with the dataset and the cache it trained on),
`checkpoints/`, `metrics.jsonl`, `tb/`, and, when training finishes, `student.pt` (config and weights) and
`train_seconds.txt`. Under torchrun every rank trains on its shard of each batch and rank 0 alone writes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pipelines.config import from_dict, to_dict
from pipelines.errors import ConfigError, torch_load_reason
from stxd_cache.extract import ExtractConfig
from stxd_train.configs import StudentDataConfig, StudentRunConfig  # noqa: F401  (re-exported)
from stxd_train.distiller import Distiller, DistillStepHook, require_layout
from stxd_train.engine import RUN_KEYS, DetectorLoss
from stxd_train.students.config import StudentConfig

if TYPE_CHECKING:
    from pipelines.grid import BEVGrid
    from stxd_cache.store import CacheReader
    from stxd_train.configs import DistillConfig
    from stxd_train.students.common import CameraStudent

#: What `fit` writes when training ends, besides the checkpoints.
STUDENT_FILE = "student.pt"


def run_config(saved: dict[str, Any], where: str) -> StudentRunConfig:
    """The `StudentRunConfig` of a saved run config (`RUN/config.yaml`)."""
    return from_dict(StudentRunConfig, {k: v for k, v in saved.items() if k not in RUN_KEYS}, where=where)


def run_record(cfg: StudentRunConfig, *, dataroot: str, version: str, cache: str | None = None,
               teacher_online: str | None = None, cache_config: ExtractConfig | None = None) -> dict[str, Any]:
    """The `config.yaml` that `fit` writes into its run folder: `cfg` and what the run trains on."""
    record = {"kind": "student", "dataroot": str(dataroot), "version": version,
              "cache": str(cache) if cache else None, **to_dict(cfg)}
    if teacher_online is not None:
        record["teacher_online"] = {"checkpoint": str(teacher_online),
                                    "layout": to_dict(cache_config or ExtractConfig())}
    return record


def open_training_cache(path: str | Path, *, grid: BEVGrid, distill: DistillConfig | None = None) -> CacheReader:
    """The teacher cache at `path`, opened once for a fit and checked before the first step: complete, consistent
    (`CacheReader.require_consistent`), the range of the student `grid`, the detection classes, and, with the
    `distill` config of a distilled fit, room for its past frames and token grid. `CameraDataset` (or, without
    distillation, `join_cache`) joins the training samples with it."""
    from pipelines.classes import DETECTION_CLASSES
    from stxd_cache.store import open_cache

    cache = open_cache(path)
    cache.require_complete()
    cache.require_consistent()
    if not cache.meta.grid.same_range(grid):
        raise ConfigError(
            f"cache {path} has the distillation grid {cache.meta.grid.describe()} but the student grid is "
            f"{grid.describe()}; the ranges must match: set model.grid_half_extent to the cache's, or "
            "extract a cache with the student's range")
    if tuple(cache.meta.classes) != DETECTION_CLASSES:
        raise ConfigError(f"cache {path} has classes {list(cache.meta.classes)}; expected the nuScenes detection "
                          f"classes {list(DETECTION_CLASSES)}")
    if distill is not None and distill.enabled:
        require_layout(distill, k_max=cache.meta.k_max, token_grid=cache.meta.token_grid)
    return cache


def _training_model(cfg: StudentRunConfig, student: CameraStudent, reader: Any, online: Any) -> nn.Module:
    """The engine's model: the student alone, or a `Distiller` fed by the cache or by the online teacher."""
    if not cfg.distill.enabled:
        return DetectorLoss("student", student)
    if reader is not None:
        meta = reader.meta
        return Distiller(student=student, cfg=cfg.distill, teacher_grid=meta.grid, teacher_channels=meta.channels,
                         token_grid=meta.token_grid, k_max=meta.k_max)
    return Distiller(student=student, cfg=cfg.distill, teacher_grid=online.grid, teacher_channels=online.channels,
                     token_grid=online.token_grid, k_max=online.frames.k, online=online)


def fit(cfg: StudentRunConfig, *, dataroot: str, version: str, out: str | Path, cache: str | None = None,
        teacher_online: str | None = None, cache_config: ExtractConfig | None = None, resume: bool = False,
        device: str = "auto", trust_checkpoint: bool = False) -> Path:
    """Train a student into run folder `out` (torchrun-aware); returns the path of `student.pt`.

    Distillation reads the teacher's records from `cache`, or, with `teacher_online` (a teacher checkpoint),
    computes them at every step with the cache layout `cache_config` (default: `ExtractConfig()`);
    `trust_checkpoint` lets that checkpoint be fully unpickled (which can run code).
    """
    from pipelines.nuscenes import SampleIndex
    from pipelines.paths import check_output_path
    from stxd_train.data import CameraDataset, collate, join_cache
    from stxd_train.engine import (
        atomic_write_text,
        is_main_process,
        save_checkpoint,
        seed_everything,
        start_run,
        train_run,
        training_device,
        unwrap_model,
    )
    from stxd_train.students.registry import build_student

    out = check_output_path(out, inputs={"--dataroot": dataroot, "--cache": cache, "--teacher-online": teacher_online})
    dc, tc, mc = cfg.data, cfg.train, cfg.model
    if cache is not None and teacher_online is not None:
        raise ConfigError("--cache and --teacher-online are two sources of the same teacher records; choose one")
    config = run_record(cfg, dataroot=dataroot, version=version, cache=cache, teacher_online=teacher_online,
                        cache_config=cache_config)
    layout = cache_config or ExtractConfig()
    start_run(out, config, resume=resume)
    dev = training_device(device)
    seed_everything(tc.seed)
    reader = open_training_cache(cache, grid=mc.grid, distill=cfg.distill) if cache is not None else None
    online = None
    if teacher_online is not None and cfg.distill.enabled:
        online = build_online_teacher(teacher_online, layout, cfg.distill.k, dev, trust=trust_checkpoint)
    if cfg.distill.enabled and reader is None and online is None:
        raise ConfigError(f"distill.terms {list(cfg.distill.terms)} need the teacher cache: pass --cache CACHE.zarr "
                          "or --teacher-online CKPT (or set distill.terms to [] for a student without distillation)")
    # The cache's past-frame links are checked against the dataset's, so the index lists as many as the cache holds.
    k_prev = max(mc.queue, cfg.distill.k if online is not None else 0, reader.meta.k_max if reader is not None else 0)
    index = SampleIndex.load(dataroot, version, dc.train_splits, k_prev=k_prev,
                             max_sweeps=online.frames.num_sweeps if online is not None else 0)
    if len(index) == 0:
        raise ConfigError(f"no samples in {', '.join(dc.train_splits)} of {dataroot} ({version})")
    # Records are read only when the losses use them; without distillation the join is still checked here.
    records = reader if cfg.distill.enabled else None
    if reader is not None and records is None:
        join_cache(reader, list(index))
    dataset = CameraDataset(index, image_size=dc.image_size, grid=mc.grid, queue=mc.queue, augment=dc.augment,
                            seed=tc.seed, min_points=dc.min_points, cache=records, cache_k=cfg.distill.k,
                            gt_iou="rd" in cfg.distill.terms, gt_match=cfg.distill.gt_match,
                            lidar=None if online is None else online.frames)
    dataset[0]   # an unreadable image of the first sample fails here, before any worker starts
    if reader is not None and "rd" in cfg.distill.terms \
            and not reader.box_counts()[[reader.index_of(s.token) for s in index]].any():
        raise ConfigError(f"distill.terms has rd, but the cache {cache} holds no teacher box for any of the "
                          f"{len(index)} training samples (`box_count` is 0 in every row), so RD would be 0 at every "
                          f"step; its teacher decodes no object above its own decode.score_threshold: train the "
                          f"teacher longer (`stxd-cache info {cache}` shows the boxes per row), or leave rd out of "
                          "distill.terms")
    student = build_student(mc)
    if mc.load_from and not resume:   # a resumed run restores its own weights from the checkpoint
        from stxd_train.students.pretrained import load_from

        report = load_from(student, mc.load_from, strict=mc.load_from_strict)
        if is_main_process():
            text = "\n".join(report.lines())
            print(text, flush=True)
            out.mkdir(exist_ok=True)
            atomic_write_text(out / "load_from.txt", text + "\n")
    # Where a non-finite loss may come from besides the images and boxes: the teacher's records.
    data_note = "" if not cfg.distill.enabled else (
        f"its teacher records come from the cache {cache}: check them with `stxd-cache verify {cache}`"
        if cache is not None else f"its teacher records come from the live teacher {teacher_online}")
    trainer = train_run(_training_model(cfg, student, reader, online), dataset, collate=collate, out=out,
                        run_config=config, train=tc, optim=cfg.optim, batch_size=dc.batch_size,
                        num_workers=dc.num_workers, device=dev, resume=resume,
                        hooks=[DistillStepHook()] if cfg.distill.enabled else [],   # the distillation warm-up's step
                        data_note=data_note)
    path = out / STUDENT_FILE
    if is_main_process():
        adapter = getattr(unwrap_model(trainer.model), "adapter", None)
        save_checkpoint(path, {"config": to_dict(mc), "state_dict": student.state_dict(),
                               "adapter": None if adapter is None else adapter.state_dict()})
    return path


def build_online_teacher(path: str, layout: ExtractConfig, k: int, device: torch.device, *,
                         trust: bool = False) -> Any:
    """The frozen teacher of checkpoint `path` producing records in the cache layout `layout` (`trust`: allow full
    unpickling of the checkpoint, which can run code)."""
    from stxd_cache.teacher.checkpoint import load_teacher
    from stxd_train.online import OnlineTeacher

    loaded = load_teacher(path, device=device, trust=trust)
    return OnlineTeacher(model=loaded.model, grid=layout.grid, token_grid=layout.token_grid,
                         box_capacity=layout.box_capacity, k=k, num_sweeps=loaded.config.num_sweeps,
                         point_range=loaded.config.voxel.point_range)


def load_student(path: str | Path, device: torch.device) -> CameraStudent:
    """The student saved by `fit` at `path` (read with `weights_only=True`), in eval mode. A distilled run's
    adapter is attached as `student.adapter` (None without one)."""
    from stxd_train.engine import CheckpointError
    from stxd_train.students.registry import build_student

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; the run has not finished training (resume it with --resume)")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"student file {path} cannot be read with safe loading ({torch_load_reason(exc)}); "
                              "`stxd-train fit` writes it with tensors and plain values only, so the file is damaged "
                              "or was replaced: train the run again (or resume it with --resume)") from None
    redo = ("`stxd-train fit` writes the weights and their config together, so the file was altered or replaced: "
            "write it again from the run's last checkpoint (the same `stxd-train fit` command with --resume) or "
            "train the run again")
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict) \
            or not isinstance(saved.get("state_dict"), dict):
        found = sorted(map(str, saved)) if isinstance(saved, dict) else type(saved).__name__
        raise CheckpointError(f"student file {path} holds {found}; expected a dict with the keys config, state_dict "
                              f"and adapter. {redo}")
    cfg = from_dict(StudentConfig, saved["config"], where=f"{path} config")
    student = build_student(cfg)
    state = unused_fpn_outputs_dropped(saved["state_dict"], len(student.image_encoder.neck.fpn_convs))
    problems = state_dict_problems(student, state)
    if problems:
        raise CheckpointError(f"student file {path}: its weights do not fit the {cfg.name} student its "
                              f"config describes ({problems}). {redo}")
    student.load_state_dict(state)
    student.adapter = None
    if saved.get("adapter") is not None:
        from stxd_train.distiller import adapter_from_state

        try:
            student.adapter = adapter_from_state(saved["adapter"])
        except (RuntimeError, KeyError, IndexError, AttributeError) as exc:
            raise CheckpointError(f"student file {path}: its distillation adapter cannot be rebuilt ({exc}). "
                                  f"{redo}") from None
    return student.to(device).eval()


def unused_fpn_outputs_dropped(state: dict[str, Any], levels: int) -> dict[str, Any]:
    """`state` without the FPN output convs of levels >= `levels`: students saved before the FPN built only the
    levels the view transform reads carry such convs, whose outputs nothing read, so dropping them is exact."""
    pattern = re.compile(r"image_encoder\.neck\.fpn_convs\.(\d+)\.")
    return {k: v for k, v in state.items() if not ((m := pattern.match(k)) and int(m.group(1)) >= levels)}


def state_dict_problems(model: nn.Module, state: dict[str, Any], *, shown: int = 3) -> str:
    """What keeps `state` from loading into `model`: its first `shown` missing, unexpected and mis-shaped keys
    ("" when it fits)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k} (file {tuple(getattr(state[k], 'shape', ()))}, model {tuple(own[k].shape)})"
                    for k in set(own) & set(state)
                    if not isinstance(state[k], torch.Tensor) or state[k].shape != own[k].shape)
    parts = []
    for name, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
        if keys:
            more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
            parts.append(f"{len(keys)} {name} key(s): {', '.join(keys[:shown])}{more}")
    return "; ".join(parts)


def student_outputs(student: CameraStudent, cfg: StudentRunConfig, index: Any, device: torch.device, *,
                    batch_size: int = 2, only: Sequence[str] | None = None) -> Iterator[tuple[list[str], Any]]:
    """(sample tokens, `StudentOutput`) for every batch of `index` (or of its samples `only`), without augmentation
    or gradient."""
    from torch.utils.data import DataLoader, Subset

    from stxd_train.data import CameraDataset, collate
    from stxd_train.engine import to_device

    dataset: Any = CameraDataset(index, image_size=cfg.data.image_size, grid=cfg.model.grid, queue=cfg.model.queue,
                                 min_points=cfg.data.min_points)
    if only is not None:
        dataset = Subset(dataset, [index.index_of(t) for t in only])
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=cfg.data.num_workers, collate_fn=collate)
    with torch.inference_mode():
        for batch in loader:
            batch = to_device(batch, device)
            yield batch.tokens, student(batch)


def student_predictions(run: Path, saved: dict[str, Any], nusc: Any, split: str, device: str, *,
                        batch_size: int = 2, only: Sequence[str] | None = None) -> tuple[Any, dict[str, Any]]:
    """The student of run folder `run` (its `config.yaml` is `saved`) decoded on every sample of `split` (or on
    its samples `only`): the split's `SampleIndex` and {sample token: Detections} (`stxd_train.scoring.predict`
    and `stxd_train.show` call this)."""
    from pipelines.device import resolve_device
    from pipelines.evaluation import Detections
    from pipelines.nuscenes import SampleIndex

    cfg = run_config(saved, where=str(run / "config.yaml"))
    dev = resolve_device(device)
    student = load_student(run / STUDENT_FILE, dev)
    index = SampleIndex.from_nuscenes(nusc, [split], k_prev=cfg.model.queue, max_sweeps=0)
    detections: dict[str, Detections] = {}
    for tokens, out in student_outputs(student, cfg, index, dev, batch_size=batch_size, only=only):
        for token, det in zip(tokens, student.decode(out), strict=True):
            detections[token] = Detections(boxes=det.boxes.cpu().numpy(), scores=det.scores.cpu().numpy(),
                                           labels=det.labels.cpu().numpy())
    return index, detections
