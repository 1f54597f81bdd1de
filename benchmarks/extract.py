"""Extraction time per sample against the teacher forward alone, the dask speed-up, and where the time goes.

    .venv/bin/python benchmarks/extract.py --dataroot out/demo/data --version v1.0-synth \
        --teacher out/demo/teacher/teacher.pt --splits synth_val --config configs/cache/synth.yaml --rounds 2

- forward alone: the teacher forward and box decoding on point clouds loaded beforehand, one sample at a
  time (as extraction runs it), same threads as extraction.
- extract: `stxd-cache extract`'s code path into a fresh store (loading ahead in threads, writing behind in a
  thread). Besides the end-to-end time, which includes opening the dataset and the teacher, the steady-state
  time per sample is taken between the first and the last finished work unit.
- forward and one-process extraction alternate for `--rounds` rounds (A B A B); the table gives medians.
- dask: 1 and 2 worker processes on a LocalCluster started before the clock (each worker still opens the
  dataset and the teacher inside the timed run).
- breakdown: one serial pass that times every stage of every sample: LiDAR loading, voxelisation, the rest of
  the forward (sparse encoder, BEV backbone, neck, head), decoding, resampling to the distillation grid,
  encoding a row (fp16 or int8, token pooling), and compression + write (the store's `write_unit` less the row
  encoding: zarr compresses chunks in its own threads while writing, so the two are not separable inside it;
  compression alone is timed separately with the same codec on the same arrays).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import defaultdict
from dataclasses import replace
from typing import Any

import click
import numpy as np
from common import machine, median, resolve_device, sync, table, write_json


def _forward_alone(model: Any, points: list[Any], device: str) -> float:
    """Seconds per sample of forward + decode on preloaded points."""
    import torch

    start = time.perf_counter()
    with torch.inference_mode():
        for p in points:
            model.decode(model([p.to(device)]))
    sync(device)
    return (time.perf_counter() - start) / len(points)


def _extract(job: Any, n: int, scheduler: str | None = None) -> tuple[float, float]:
    """(end-to-end, steady-state) seconds per sample of one extraction."""
    from stxd_cache.extract import extract

    finished: list[tuple[float, int]] = []
    start = time.perf_counter()
    extract(job, scheduler=scheduler, progress=lambda rows: finished.append((time.perf_counter(), rows)))
    total = time.perf_counter() - start
    rows_after_first = sum(rows for _, rows in finished[1:])
    steady = (finished[-1][0] - finished[0][0]) / rows_after_first if rows_after_first else float("nan")
    return total / n, steady


def _breakdown(job: Any, index: Any, loaded: Any) -> tuple[dict[str, float], float]:
    """Seconds per sample of each stage, from one serial pass with a sync after every stage, and of Blosc
    compression alone (the same codec and level on the same encoded arrays, outside zarr)."""
    import numcodecs
    import torch

    from pipelines.grid import resample
    from pipelines.lidar import load_sweeps
    from stxd_cache.extract import _Extractor, _open_writer
    from stxd_cache.schema import TeacherRecord, encode_record

    model, cfg, device = loaded.model.eval(), loaded.config, job.device
    extractor = _Extractor(job, index)
    writer = _open_writer(job, index, extractor)
    blosc = numcodecs.Blosc(cname="zstd", clevel=job.cfg.zstd_level, shuffle=numcodecs.Blosc.SHUFFLE)
    stages: dict[str, float] = defaultdict(float)
    compress = 0.0
    clock = [time.perf_counter()]

    def lap(name: str) -> None:
        sync(device)
        now = time.perf_counter()
        stages[name] += now - clock[0]
        clock[0] = now

    with torch.inference_mode():
        for unit in writer.units:
            records = []
            for i in unit:
                clock[0] = time.perf_counter()
                points = torch.from_numpy(load_sweeps(index[i], num_sweeps=cfg.num_sweeps,
                                                      point_range=cfg.voxel.point_range)).to(device)
                lap("LiDAR loading (sweeps, ego motion, range filter)")
                voxels = model.voxelizer([points])
                lap("voxelisation")
                bev = model.neck(model.backbone(model.middle_encoder(voxels)))
                preds = model.head(bev)
                lap("forward (sparse encoder, backbone, neck, head)")
                det = model.head.decode(preds, model.bev_grid)[0]
                lap("box decoding (top-k, circle NMS)")
                grid_bev = resample(bev.float(), model.bev_grid, job.cfg.grid)[0].cpu().numpy()
                lap("resampling to the distillation grid, to host")
                records.append(TeacherRecord(bev=grid_bev, boxes=det.boxes.cpu().numpy(),
                                             scores=det.scores.cpu().numpy(), labels=det.labels.cpu().numpy(),
                                             probs=det.probs.cpu().numpy()))
            clock[0] = time.perf_counter()
            encoded = [encode_record(r, writer.meta, writer.sample_tokens[i]) for i, r in zip(unit, records,
                                                                                              strict=True)]
            encode = time.perf_counter() - clock[0]
            stages["row encoding (fp16, tokens)"] += encode
            clock[0] = time.perf_counter()
            writer.write_unit(unit, records)
            stages["compression + write (store `write_unit` less row encoding)"] += (
                time.perf_counter() - clock[0] - encode)
            clock[0] = time.perf_counter()
            for row in encoded:   # compression alone, for the note under the table
                for array in row.values():
                    if array.dtype.kind not in "OUS":   # numeric arrays, with their item size as typesize
                        blosc.encode(np.ascontiguousarray(array))
            compress += time.perf_counter() - clock[0]
    stages_s = {name: seconds / len(index) for name, seconds in stages.items()}
    return stages_s, compress / len(index)


@click.command()
@click.option("--dataroot", required=True)
@click.option("--version", required=True)
@click.option("--teacher", "teacher_path", required=True)
@click.option("--splits", default="synth_val", show_default=True)
@click.option("--config", "config_path", default="configs/cache/synth.yaml", show_default=True)
@click.option("--rounds", default=2, show_default=True, help="Interleaved forward / extract rounds.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "json_path", default=None, help="Also write the results here.")
def main(dataroot: str, version: str, teacher_path: str, splits: str, config_path: str, rounds: int, device: str,
         json_path: str | None) -> None:
    import torch

    from pipelines.config import load_config
    from pipelines.lidar import load_sweeps
    from pipelines.nuscenes import SampleIndex
    from stxd_cache.extract import ExtractConfig, ExtractJob, local_cluster
    from stxd_cache.teacher.checkpoint import load_teacher

    device = resolve_device(device)
    cfg = load_config(ExtractConfig, config_path)
    split_names = tuple(splits.split(","))
    index = SampleIndex.load(dataroot, version, split_names, k_prev=cfg.k_max)
    n = len(index)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    loaded = load_teacher(teacher_path, device=device)
    model = loaded.model.eval()
    points = [torch.from_numpy(load_sweeps(s, num_sweeps=loaded.config.num_sweeps,
                                           point_range=loaded.config.voxel.point_range)) for s in index]
    tmp = tempfile.mkdtemp(prefix="stxd-bench-extract-")

    def job(name: str) -> ExtractJob:
        return ExtractJob(dataroot=dataroot, version=version, splits=split_names, teacher_path=teacher_path,
                          teacher_config_path=None, trust_checkpoint=False, out=os.path.join(tmp, f"{name}.zarr"),
                          cfg=replace(cfg), device=device)

    _forward_alone(model, points[:2], device)   # warm-up
    forward, single, steady = [], [], []
    for r in range(rounds):
        forward.append(_forward_alone(model, points, device))
        total, rate = _extract(job(f"single{r}"), n)
        single.append(total)
        steady.append(rate)
    dask: dict[int, tuple[float, float]] = {}
    for workers in (1, 2):
        with local_cluster(workers) as cluster:
            dask[workers] = _extract(job(f"dask{workers}"), n, scheduler=cluster.scheduler_address)
    stages, compress = _breakdown(job("breakdown"), index, loaded)
    f, s, st = median(forward), median(single), median(steady)

    rows = [["teacher forward + decode alone", f"{f:.3f}", "1.00x"],
            ["extract, one process, end to end", f"{s:.3f}", f"{s / f:.2f}x"],
            ["extract, one process, steady state", f"{st:.3f}", f"**{st / f:.2f}x** (target <= 1.15x)"]]
    for workers, (total, rate) in dask.items():
        rows.append([f"extract, dask {workers} worker{'s' if workers > 1 else ''}, end to end / steady state",
                     f"{total:.3f} / {rate:.3f}", f"{total / f:.2f}x / {rate / f:.2f}x"])
    speedup = dask[1][0] / dask[2][0], dask[1][1] / dask[2][1]
    click.echo(f"machine: {machine(device)}")
    click.echo(f"{n} samples of {splits}, `{config_path}` ({cfg.precision}, {cfg.threads} torch thread(s) per "
               f"process); teacher `{teacher_path}`; medians of {rounds} interleaved rounds\n")
    click.echo(table(["measure", "s / sample", "against forward"], rows))
    fixed = (s - st) * n
    click.echo(f"\none-process fixed cost: {fixed:.1f} s per run (end to end minus {n} x steady state: opening the "
               f"dataset, the teacher and the store, filling and draining the load/write pipeline); over {n} samples "
               f"it adds {fixed / n / f:.2f}x forward, over N samples {fixed / f:.1f} / N x")
    click.echo(f"\ndask 2 workers against 1: **x{speedup[0]:.2f}** end to end, x{speedup[1]:.2f} steady state\n")
    total = sum(stages.values())
    click.echo(table(["stage (serial pass, one sample at a time)", "s / sample", "share"],
                     [[name, f"{sec:.4f}", f"{sec / total:.1%}"] for name, sec in stages.items()]
                     + [["total", f"{total:.4f}", "100%"]]))
    click.echo(f"\nBlosc zstd compression alone of the same encoded rows, outside zarr: {compress:.4f} s / sample")
    write_json(json_path, {"forward_s": f, "single_s": s, "steady_s": st, "dask": dask, "dask_speedup": speedup,
                           "stages_s": stages, "compress_s": compress, "fixed_s": fixed,
                           "samples": n})


if __name__ == "__main__":
    main()
