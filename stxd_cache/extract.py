"""`stxd-cache extract`: run the teacher once per sample and write the cache, in one process or on dask.

Work units are whole shards of rows (`rows_per_shard`), so no two processes ever write one chunk.
In one process, LiDAR loading runs ahead in a thread pool and compression/writing runs behind in a
writer thread, so the teacher forward is the only thing on the critical path. On dask, every worker
process builds the teacher once and takes units from the scheduler.
"""

from __future__ import annotations

import queue
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipelines.config import require
from pipelines.errors import DatasetError
from pipelines.grid import BEVGrid
from pipelines.nuscenes import SampleIndex


@dataclass(frozen=True, kw_only=True)
class ExtractConfig:
    """How a cache is laid out and how extraction runs (configs/cache/*.yaml)."""

    grid_half_extent: float = field(default=51.2, metadata={"help": "distillation grid covers ±this, m"})
    grid_size: int = field(default=128, metadata={"help": "distillation grid cells per side"})
    token_grid: int = field(default=32, metadata={"help": "P: BEV average-pooled to P×P tokens for TD"})
    k_max: int = field(default=4, metadata={"help": "past keyframes linked per row"})
    box_capacity: int = field(default=200, metadata={"help": "M: teacher boxes kept per sample, by score"})
    precision: str = field(default="fp16", metadata={"help": "fp16, or int8 with per-channel scales"})
    rows_per_shard: int = field(default=8, metadata={"help": "rows per shard = rows per work unit"})
    zstd_level: int = field(default=3, metadata={"help": "Blosc zstd level, 1..3"})
    batch_size: int = field(default=1, metadata={"help": "samples per teacher forward"})
    prefetch: int = field(default=2, metadata={"help": "work units loaded ahead of the teacher"})
    threads: int = field(default=1, metadata={"help": "torch threads per process (0: torch's default)"})

    def __post_init__(self) -> None:
        checks = [
            (self.precision in ("fp16", "int8"), "precision", self.precision, "fp16 or int8"),
            (self.grid_size > 0 and self.grid_half_extent > 0, "grid_size", self.grid_size, "a positive grid"),
            (self.token_grid > 0 and self.grid_size % self.token_grid == 0, "token_grid", self.token_grid,
             f"a divisor of grid_size {self.grid_size}"),
            (self.k_max >= 0, "k_max", self.k_max, ">= 0"),
            (self.box_capacity > 0, "box_capacity", self.box_capacity, "> 0"),
            (self.rows_per_shard > 0, "rows_per_shard", self.rows_per_shard, "> 0"),
            (1 <= self.zstd_level <= 9, "zstd_level", self.zstd_level, "1..9"),
            (self.batch_size > 0, "batch_size", self.batch_size, "> 0"),
            (self.prefetch >= 0, "prefetch", self.prefetch, ">= 0"),
            (self.threads >= 0, "threads", self.threads, ">= 0"),
        ]
        require("cache config", checks)

    @property
    def grid(self) -> BEVGrid:
        return BEVGrid.square(self.grid_half_extent, self.grid_size)


def prev_rows(index: SampleIndex, k_max: int) -> np.ndarray:
    """(S, k_max) int32: row of each sample's k-th previous keyframe in the same scene, -1 if none."""
    out = np.full((len(index), k_max), -1, dtype=np.int32)
    for i, sample in enumerate(index):
        for k, token in enumerate(sample.prev_tokens[:k_max]):
            out[i, k] = index.index_of(token)
    return out


@dataclass(frozen=True)
class ExtractJob:
    """Everything a process needs to extract units: picklable, sent once to each dask worker."""

    dataroot: str
    version: str
    splits: tuple[str, ...]
    teacher_path: str
    teacher_config_path: str | None
    trust_checkpoint: bool
    out: str
    cfg: ExtractConfig
    device: str


class _Extractor:
    """Teacher, index and cache writer of one process."""

    def __init__(self, job: ExtractJob, index: SampleIndex | None = None) -> None:
        import torch

        from stxd_cache.teacher.checkpoint import load_teacher

        if job.cfg.threads:
            torch.set_num_threads(job.cfg.threads)
        self.job = job
        self.device = torch.device(job.device)
        self.index = index if index is not None else SampleIndex.load(job.dataroot, job.version, job.splits,
                                                                      k_prev=job.cfg.k_max)
        loaded = load_teacher(job.teacher_path, device=self.device, config_path=job.teacher_config_path,
                              trust=job.trust_checkpoint)
        self.model, self.teacher_cfg, self.sha256 = loaded.model, loaded.config, loaded.sha256
        self.model.eval()

    def load(self, rows: range) -> list[np.ndarray]:
        from pipelines.lidar import load_sweeps

        vc = self.teacher_cfg.voxel
        return [load_sweeps(self.index[i], num_sweeps=self.teacher_cfg.num_sweeps, point_range=vc.point_range)
                for i in rows]

    def run(self, points: Sequence[np.ndarray]) -> list[Any]:
        """Teacher records (distillation-grid BEV + decoded boxes) for a list of point clouds."""
        import torch

        from pipelines.grid import resample
        from stxd_cache.store import TeacherRecord

        records = []
        bs = self.job.cfg.batch_size
        with torch.inference_mode():
            for start in range(0, len(points), bs):
                batch = [torch.from_numpy(p).to(self.device) for p in points[start:start + bs]]
                out = self.model(batch)
                bev = resample(out.bev.float(), self.model.bev_grid, self.job.cfg.grid).cpu().numpy()
                for j, det in enumerate(self.model.decode(out)):
                    records.append(TeacherRecord(bev=bev[j], boxes=det.boxes.cpu().numpy(),
                                                 scores=det.scores.cpu().numpy(), labels=det.labels.cpu().numpy(),
                                                 probs=det.probs.cpu().numpy()))
        return records


def build_meta(job: ExtractJob, index: SampleIndex, extractor: _Extractor) -> Any:
    from pipelines.classes import DETECTION_CLASSES
    from pipelines.config import to_dict
    from stxd_cache.store import CacheMeta, DatasetInfo, TeacherInfo

    return CacheMeta(
        grid=job.cfg.grid, token_grid=job.cfg.token_grid, channels=sum(extractor.teacher_cfg.neck.out_channels),
        box_capacity=job.cfg.box_capacity, classes=tuple(DETECTION_CLASSES),
        teacher=TeacherInfo.from_dict({"name": extractor.teacher_cfg.name, "config": to_dict(extractor.teacher_cfg),
                                       "sha256": extractor.sha256}),
        dataset=DatasetInfo.from_dict({"version": job.version, "splits": list(job.splits),
                                       "sample_count": len(index)}),
        precision=job.cfg.precision, k_max=job.cfg.k_max)


def _open_writer(job: ExtractJob, index: SampleIndex, extractor: _Extractor, lock: Any = None) -> Any:
    from stxd_cache.store import create_or_resume

    return create_or_resume(job.out, build_meta(job, index, extractor), index.tokens, prev_rows(index, job.cfg.k_max),
                            rows_per_shard=job.cfg.rows_per_shard, zstd_level=job.cfg.zstd_level, lock=lock)


def extract(job: ExtractJob, *, workers: int = 0, scheduler: str | None = None,
            progress: Callable[[int], None] | None = None) -> Any:
    """Extract (or complete) the cache described by `job`; returns the finalised writer's meta.

    Args:
        job: what to extract and where.
        workers: > 0 starts a dask LocalCluster of that many worker processes.
        scheduler: address of a running dask scheduler to join instead (tcp://host:port).
        progress: called with the number of rows finished after each unit.
    """
    from pipelines.paths import check_output_path
    from stxd_cache.errors import CacheReadOnlyError
    from stxd_cache.store import WriterLock, open_cache

    check_output_path(job.out, inputs={"--dataroot": job.dataroot, "--teacher": job.teacher_path})
    index = SampleIndex.load(job.dataroot, job.version, job.splits, k_prev=job.cfg.k_max)
    if len(index) == 0:
        raise DatasetError(f"no samples in split(s) {', '.join(job.splits)} of {job.dataroot} ({job.version}); "
                           "check --splits (stxd-data index lists them)")
    extractor = _Extractor(job, index)
    # Taken before the store is created or resumed, held until it is finalised; dask workers write under it.
    with WriterLock(job.out) as lock:
        try:
            writer = _open_writer(job, index, extractor, lock)
        except CacheReadOnlyError:   # same fingerprint, already complete: nothing to do
            return open_cache(job.out).meta
        units = writer.pending_units()
        if units and (workers > 0 or scheduler):
            _extract_dask(job, units, workers, scheduler, progress)
        elif units:
            _extract_local(extractor, writer, units, progress)
        writer.finalize()
        return writer.meta


def _extract_local(extractor: _Extractor, writer: Any, units: list[range],
                   progress: Callable[[int], None] | None) -> None:
    """Load ahead in threads, run the teacher here, compress and write behind in a writer thread."""
    pending: queue.Queue[tuple[range, list[Any]] | None] = queue.Queue(maxsize=2)
    failure: list[BaseException] = []

    def write_loop() -> None:
        while (item := pending.get()) is not None:
            if failure:
                continue
            try:
                writer.write_unit(*item)
                if progress:
                    progress(len(item[0]))
            except BaseException as exc:  # re-raised in the main thread
                failure.append(exc)

    thread = threading.Thread(target=write_loop, name="stxd-cache-writer", daemon=True)
    thread.start()
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="stxd-cache-load") as pool:
        ahead = max(1, extractor.job.cfg.prefetch)
        futures: list[Future[list[np.ndarray]]] = [pool.submit(extractor.load, u) for u in units[:ahead]]
        try:
            for n, rows in enumerate(units):
                if n + ahead < len(units):
                    futures.append(pool.submit(extractor.load, units[n + ahead]))
                fut = futures[n]
                records = extractor.run(fut.result())
                if failure:
                    break
                pending.put((rows, records))
        finally:
            pending.put(None)
            thread.join()
    if failure:
        raise failure[0]


_WORKER_STATE: dict[str, tuple[_Extractor, Any]] = {}


def _dask_unit(job: ExtractJob, rows: range) -> int:
    """Runs on a dask worker: build the teacher once per process, then extract and write one unit."""
    key = f"{job.out}:{job.teacher_path}"
    if key not in _WORKER_STATE:
        extractor = _Extractor(job)
        _WORKER_STATE[key] = (extractor, _open_writer(job, extractor.index, extractor))
    extractor, writer = _WORKER_STATE[key]
    writer.write_unit(rows, extractor.run(extractor.load(rows)))
    return len(rows)


def local_cluster(workers: int) -> Any:
    """A dask LocalCluster of `workers` single-threaded worker processes for extraction.

    dask's nanny starts workers with `MALLOC_TRIM_THRESHOLD_=65536`, which makes glibc hand every freed block
    above 64 KiB back to the OS; the teacher's large activations are then page-faulted in again at every
    forward, which made it 1.6x slower on the synthetic teacher (0.35 → 0.55 s per sample). These workers keep
    the thread limits of dask's default and glibc's own trim threshold. Workers of a cluster joined with
    `--scheduler` are configured by whoever started them.
    """
    import logging

    import dask
    from distributed import LocalCluster

    environ = {k: v for k, v in dask.config.get("distributed.nanny.pre-spawn-environ", {}).items()
               if k != "MALLOC_TRIM_THRESHOLD_"}
    # A terminal's Ctrl-C reaches the whole process group. The worker processes, started while SIGINT is ignored,
    # keep ignoring it, so that this process alone stops them (closing the cluster) instead of each one printing its
    # own KeyboardInterrupt traceback; dask's logs are limited to errors for the same reason.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main_thread else None
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
            return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                                silence_logs=logging.ERROR)
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)


def _extract_dask(job: ExtractJob, units: list[range], workers: int, scheduler: str | None,
                  progress: Callable[[int], None] | None) -> None:
    from distributed import Client, as_completed

    cluster = None
    if scheduler:
        client = Client(scheduler)
    else:
        cluster = local_cluster(workers)
        client = Client(cluster)
    try:
        futures = [client.submit(_dask_unit, job, unit, pure=False) for unit in units]
        for fut in as_completed(futures):
            done = fut.result()
            if progress:
                progress(done)
    except KeyboardInterrupt:
        import logging

        logging.getLogger("distributed").setLevel(logging.CRITICAL)   # shutting down: no warnings about it
        raise
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
