"""Extraction speed and cache size, measured in one run.

    .venv/bin/python benchmarks/extract.py --dataroot out/demo/data --version v1.0-synth \
        --teacher out/demo/teacher/teacher.pt --splits synth_val --config configs/cache/synth.yaml

Prints one table: teacher forward alone per sample, single-process extraction per sample (and the
ratio), dask with 1 and 2 worker processes (and the speed-up), and bytes per sample in fp16 and
int8 with the int8 relative L2 error against fp16.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from dataclasses import replace

import click
import numpy as np


@click.command()
@click.option("--dataroot", required=True)
@click.option("--version", required=True)
@click.option("--teacher", "teacher_path", required=True)
@click.option("--splits", default="synth_val", show_default=True)
@click.option("--config", "config_path", default="configs/cache/synth.yaml", show_default=True)
def main(dataroot: str, version: str, teacher_path: str, splits: str, config_path: str) -> None:
    import torch

    from pipelines.config import load_config
    from pipelines.lidar import load_sweeps
    from pipelines.nuscenes import SampleIndex
    from stxd_cache.extract import ExtractConfig, ExtractJob, extract
    from stxd_cache.store import open_cache
    from stxd_cache.teacher.checkpoint import load_teacher
    from stxd_cache.verify import cache_info

    cfg = load_config(ExtractConfig, config_path)
    split_names = tuple(splits.split(","))
    index = SampleIndex.load(dataroot, version, split_names, k_prev=cfg.k_max)
    n = len(index)
    torch.set_num_threads(max(cfg.threads, 1))
    loaded = load_teacher(teacher_path)
    model = loaded.model.eval()
    points = [torch.from_numpy(load_sweeps(s, num_sweeps=loaded.config.num_sweeps,
                                           point_range=loaded.config.voxel.point_range)) for s in index]
    with torch.inference_mode():
        model([points[0]])
        start = time.perf_counter()
        for p in points:
            out = model([p])
            model.decode(out)
        forward = (time.perf_counter() - start) / n

    def job(out: str, **changes: object) -> ExtractJob:
        return ExtractJob(dataroot=dataroot, version=version, splits=split_names, teacher_path=teacher_path,
                          teacher_config_path=None, trust_checkpoint=False, out=out, cfg=replace(cfg, **changes),
                          device="cpu")

    from distributed import LocalCluster

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        timings = {}
        for name, kwargs, workers in (("single", {}, 0), ("dask1", {}, 1), ("dask2", {}, 2),
                                      ("int8", {"precision": "int8"}, 0)):
            path = os.path.join(tmp, f"{name}.zarr")
            cluster = None
            if workers:   # started before the clock: cluster start-up is not extraction time
                cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                       dashboard_address=None)
            start = time.perf_counter()
            extract(job(path, **kwargs), scheduler=cluster.scheduler_address if cluster else None)
            timings[name] = (time.perf_counter() - start) / n
            if cluster is not None:
                cluster.close()
        fp16, int8 = cache_info(os.path.join(tmp, "single.zarr")), cache_info(os.path.join(tmp, "int8.zarr"))
        a, b = open_cache(os.path.join(tmp, "single.zarr")), open_cache(os.path.join(tmp, "int8.zarr"))
        err = [np.linalg.norm(a.read(i).bev - b.read(i).bev) / np.linalg.norm(a.read(i).bev) for i in range(n)]
    rows.append(("teacher forward + decode alone", f"{forward:.3f} s/sample", ""))
    rows.append(("extract, one process", f"{timings['single']:.3f} s/sample",
                 f"{timings['single'] / forward:.2f}x forward"))
    rows.append(("extract, dask 1 worker", f"{timings['dask1']:.3f} s/sample", ""))
    rows.append(("extract, dask 2 workers", f"{timings['dask2']:.3f} s/sample",
                 f"{timings['dask1'] / timings['dask2']:.2f}x speed-up over 1 worker"))
    rows.append(("bytes per sample, fp16", f"{fp16['bytes_per_sample'] / 2**20:.3f} MiB",
                 f"compression x{fp16['compression_ratio']:.2f}"))
    rows.append(("bytes per sample, int8", f"{int8['bytes_per_sample'] / 2**20:.3f} MiB",
                 f"compression x{int8['compression_ratio']:.2f}; relative L2 error max {max(err):.2e}, "
                 f"mean {np.mean(err):.2e}"))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, device cpu; {n} samples of {splits}; dask times include each worker loading "
          "the teacher, not the cluster start-up")
    print("| measure | value | note |")
    print("|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
