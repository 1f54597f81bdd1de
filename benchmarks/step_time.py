"""Training-step time of a student alone, distilled from the cache, and distilled from an online teacher,
measured in one process on the same batches, with the modes interleaved.

    .venv/bin/python benchmarks/step_time.py --dataroot out/demo/data --version v1.0-synth \
        --cache out/demo/cache.zarr --teacher out/demo/teacher/teacher.pt \
        --config configs/student/bevformer_synth.yaml --rounds 5 --steps 4

Each mode's batches are loaded first (timed per batch: images, plus the cache record or the LiDAR frames),
then the timed steps (forward, backward, AdamW) run in rounds, A B C A B C ..., `--steps` consecutive
batches per mode per round, after one warm-up round. The online mode runs the teacher on the current and
the K past frames inside the step, as the peers do. Prints the median seconds per step and per batch load,
and the ratios cached / student-only and online / cached of the step medians.
"""


from __future__ import annotations

import os
import platform
import statistics
import time

import click


@click.command()
@click.option("--dataroot", required=True)
@click.option("--version", required=True)
@click.option("--cache", "cache_path", required=True)
@click.option("--teacher", "teacher_path", required=True)
@click.option("--config", "config_path", default="configs/student/bevformer_synth.yaml", show_default=True)
@click.option("--cache-config", default="configs/cache/synth.yaml", show_default=True)
@click.option("--terms", default="cd,td,rd", show_default=True)
@click.option("--k", type=int, default=None, help="Past frames of TD and of the online teacher (default: config).")
@click.option("--rounds", default=5, show_default=True, help="Timed rounds (each runs every mode).")
@click.option("--steps", default=4, show_default=True, help="Steps per mode per round.")
def main(dataroot: str, version: str, cache_path: str, teacher_path: str, config_path: str, cache_config: str,
         terms: str, k: int | None, rounds: int, steps: int) -> None:
    import torch

    from pipelines.config import load_config
    from pipelines.nuscenes import SampleIndex
    from stxd_cache.extract import ExtractConfig
    from stxd_cache.store import open_cache
    from stxd_train.data import CameraDataset, collate
    from stxd_train.distiller import Distiller
    from stxd_train.fit import StudentLoss, StudentRunConfig, build_online_teacher
    from stxd_train.students.registry import build_student

    overrides = [f"distill.terms=[{terms}]"] + ([f"distill.k={k}"] if k is not None else [])
    cfg = load_config(StudentRunConfig, config_path, overrides)
    layout = load_config(ExtractConfig, cache_config)
    meta = open_cache(cache_path).meta
    device = torch.device("cpu")
    k = cfg.distill.k
    index = SampleIndex.load(dataroot, version, cfg.data.train_splits, k_prev=max(cfg.model.queue, k),
                             max_sweeps=10)
    online = build_online_teacher(teacher_path, layout, k, device)
    b = cfg.data.batch_size
    total = (rounds + 1) * steps
    modes = ("student", "cached", "online")
    models, batches, loads = {}, {}, {}
    for mode in modes:
        torch.manual_seed(0)
        student = build_student(cfg.model)
        if mode == "student":
            models[mode] = StudentLoss(student)
        else:
            models[mode] = Distiller(student=student, cfg=cfg.distill, teacher_grid=meta.grid,
                                     teacher_channels=meta.channels, token_grid=meta.token_grid, k_max=meta.k_max,
                                     online=online if mode == "online" else None)
        dataset = CameraDataset(index, image_size=cfg.data.image_size, grid=cfg.model.grid, queue=cfg.model.queue,
                                cache_path=cache_path if mode == "cached" else None,
                                lidar=online.frames if mode == "online" else None)
        batches[mode], loads[mode] = [], []
        for i in range(total):
            t0 = time.perf_counter()
            batches[mode].append(collate([dataset[(i * b + j) % len(dataset)] for j in range(b)]))
            loads[mode].append(time.perf_counter() - t0)
    optimizers = {mode: torch.optim.AdamW(models[mode].parameters(), lr=1e-4) for mode in modes}
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for r in range(rounds + 1):
        for mode in modes:
            for batch in batches[mode][r * steps:(r + 1) * steps]:
                t0 = time.perf_counter()
                loss = sum(models[mode](batch).values())
                optimizers[mode].zero_grad()
                loss.backward()
                optimizers[mode].step()
                if r > 0:
                    times[mode].append(time.perf_counter() - t0)

    step = {mode: statistics.median(t) for mode, t in times.items()}
    click.echo(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
               f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, cpu; {cfg.model.name}, "
               f"batch {b}, terms {terms}, K={k}; {rounds} rounds x {steps} steps per mode after a warm-up round")
    click.echo("| mode | step (s, median) | batch load (s, median) |")
    click.echo("|---|---:|---:|")
    for mode in modes:
        click.echo(f"| {mode} | {step[mode]:.3f} | {statistics.median(loads[mode]):.3f} |")
    click.echo(f"cached / student-only: {step['cached'] / step['student']:.3f}")
    click.echo(f"online / cached: {step['online'] / step['cached']:.3f}")


if __name__ == "__main__":
    main()
