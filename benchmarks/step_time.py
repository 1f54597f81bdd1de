"""Training-step time of a student alone, distilled from the cache, and distilled from an online teacher,
measured in one process on the same batches.

    .venv/bin/python benchmarks/step_time.py --dataroot out/demo/data --version v1.0-synth \
        --cache out/demo/cache.zarr --teacher out/demo/teacher/teacher.pt \
        --config configs/student/bevformer_synth.yaml --steps 20

Every mode runs the same `--steps` batches (after 3 warm-up steps) through forward, backward and an AdamW
step, with data loading included (batches are loaded in the loop, as one DataLoader worker would). Prints
seconds per step and the ratios cached / student-only and online / cached.
"""

from __future__ import annotations

import platform
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
@click.option("--steps", default=20, show_default=True)
@click.option("--warmup", default=3, show_default=True)
def main(dataroot: str, version: str, cache_path: str, teacher_path: str, config_path: str, cache_config: str,
         terms: str, steps: int, warmup: int) -> None:
    import torch

    from pipelines.config import load_config
    from pipelines.nuscenes import SampleIndex
    from stxd_cache.extract import ExtractConfig
    from stxd_cache.store import open_cache
    from stxd_train.data import CameraDataset, collate
    from stxd_train.distiller import Distiller
    from stxd_train.fit import StudentLoss, StudentRunConfig, build_online_teacher
    from stxd_train.students.registry import build_student

    cfg = load_config(StudentRunConfig, config_path, [f"distill.terms=[{terms}]"])
    layout = load_config(ExtractConfig, cache_config)
    meta = open_cache(cache_path).meta
    device = torch.device("cpu")
    k = cfg.distill.k
    index = SampleIndex.load(dataroot, version, cfg.data.train_splits, k_prev=max(cfg.model.queue, k),
                             max_sweeps=10)
    online = build_online_teacher(teacher_path, layout, k, device)
    b = cfg.data.batch_size
    keys = [list(range(i * b, (i + 1) * b)) for i in range(warmup + steps)]

    def run(mode: str) -> float:
        torch.manual_seed(0)
        student = build_student(cfg.model)
        if mode == "student":
            model = StudentLoss(student)
            dataset = CameraDataset(index, image_size=cfg.data.image_size, grid=cfg.model.grid,
                                    queue=cfg.model.queue)
        else:
            model = Distiller(student=student, cfg=cfg.distill, teacher_grid=meta.grid, teacher_channels=meta.channels,
                              token_grid=meta.token_grid, k_max=meta.k_max,
                              online=online if mode == "online" else None)
            dataset = CameraDataset(index, image_size=cfg.data.image_size, grid=cfg.model.grid, queue=cfg.model.queue,
                                    cache_path=cache_path if mode == "cached" else None,
                                    lidar=online.frames if mode == "online" else None)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        start = 0.0
        for i, batch_keys in enumerate(keys):
            if i == warmup:
                start = time.perf_counter()
            batch = collate([dataset[j] for j in batch_keys])
            loss = sum(model(batch).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return (time.perf_counter() - start) / steps

    times = {mode: run(mode) for mode in ("student", "cached", "online")}
    click.echo(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads; "
               f"{cfg.model.name}, batch {b}, terms {terms}, {steps} steps after {warmup} warm-up")
    click.echo("| mode | s/step |")
    click.echo("|---|---:|")
    for mode, t in times.items():
        click.echo(f"| {mode} | {t:.3f} |")
    click.echo(f"cached / student-only: {times['cached'] / times['student']:.3f}")
    click.echo(f"online / cached: {times['online'] / times['cached']:.3f}")


if __name__ == "__main__":
    main()
