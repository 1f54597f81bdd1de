"""Training-step time and peak memory of one student alone, distilled from the cache, and distilled from an
online teacher.

    .venv/bin/python benchmarks/step_time.py --dataroot out/demo/data --version v1.0-synth \
        --cache out/demo/cache.zarr --teacher out/demo/teacher/teacher.pt \
        --config configs/student/bevformer_synth.yaml --k 3 --rounds 5 --steps 4

Times: one process builds the three modes with the same seed and loads their batches first (timed per
batch: images, plus the cache record or the LiDAR frames). Then the timed steps (forward, backward, AdamW)
run in rounds, student / cached / online, `--steps` consecutive batches per mode per round, after one
untimed warm-up round. The online mode runs the teacher on the current and the K past frames inside the
step, as BEVDistill, UVTR-L2C, DistillBEV and UniDistill do. The medians and the ratios cached / student
and online / cached come from these interleaved rounds.

Memory: on CPU, each mode runs alone in a fresh child process (`--only MODE`) for `--steps` steps; it
reports the process's resident set before the first step (interpreter, model(s), loaded batches) and its
peak during the steps (VmHWM, reset before the first step). On CUDA, the peak allocated GPU memory during each
mode's steps is read in the timing process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import click
from common import (
    interleaved,
    machine,
    median,
    peak_rss_mib,
    reset_peak_rss,
    resolve_device,
    rss_mib,
    sync,
    table,
    write_json,
)

MODES = ("student", "cached", "online")


def _build(mode: str, opts: dict[str, Any], batches: int) -> tuple[Any, list[Any], list[float], Any]:
    """(model, batches on the device, seconds per batch load, optimizer) of one mode."""
    import torch

    from pipelines.config import load_config
    from pipelines.nuscenes import SampleIndex
    from stxd_cache.extract import ExtractConfig
    from stxd_cache.store import open_cache
    from stxd_train.data import CameraDataset, collate
    from stxd_train.distiller import Distiller
    from stxd_train.engine import DetectorLoss, to_device
    from stxd_train.fit import StudentRunConfig, build_online_teacher, open_training_cache
    from stxd_train.students.registry import build_student

    device = torch.device(opts["device"])
    cfg = load_config(StudentRunConfig, opts["config"],
                      [f"distill.terms=[{opts['terms']}]", f"distill.k={opts['k']}"])
    index = SampleIndex.load(opts["dataroot"], opts["version"], cfg.data.train_splits,
                             k_prev=max(cfg.model.queue, opts["k"]), max_sweeps=10)
    torch.manual_seed(0)
    student = build_student(cfg.model)
    online = None
    if mode == "student":
        model = DetectorLoss("student", student)
    else:
        meta = open_cache(opts["cache"]).meta
        if mode == "online":
            online = build_online_teacher(opts["teacher"], load_config(ExtractConfig, opts["cache_config"]),
                                          opts["k"], device)
        model = Distiller(student=student, cfg=cfg.distill, teacher_grid=meta.grid, teacher_channels=meta.channels,
                          token_grid=meta.token_grid, k_max=meta.k_max, online=online)
    model = model.to(device)
    dataset = CameraDataset(index, image_size=cfg.data.image_size, grid=cfg.model.grid, queue=cfg.model.queue,
                            cache=open_training_cache(opts["cache"], grid=cfg.model.grid) if mode == "cached" else None,
                            cache_k=opts["k"],
                            lidar=online.frames if online is not None else None)
    b = cfg.data.batch_size
    loaded, loads = [], []
    for i in range(batches):
        start = time.perf_counter()
        loaded.append(to_device(collate([dataset[(i * b + j) % len(dataset)] for j in range(b)]), device))
        loads.append(time.perf_counter() - start)
    return model, loaded, loads, torch.optim.AdamW(model.parameters(), lr=1e-4)


def _step(model: Any, optimizer: Any, batch: Any, device: str) -> None:
    loss = sum(model(batch).values())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    sync(device)


def _memory_child(opts: dict[str, Any], mode: str) -> None:
    """Runs in a fresh process: one mode's steps, then its resident set before and at peak, as JSON."""
    model, batches, _, optimizer = _build(mode, opts, opts["steps"])
    before = rss_mib()
    reset_peak_rss()
    for batch in batches:
        _step(model, optimizer, batch, opts["device"])
    print(json.dumps({"before_mib": before, "peak_mib": peak_rss_mib()}))


def _cpu_memory(opts: dict[str, Any]) -> dict[str, dict[str, float]]:
    out = {}
    for mode in MODES:
        args = [sys.executable, __file__, "--only", mode] + [
            f"--{key.replace('_', '-')}={value}" for key, value in opts.items() if key not in ("only", "json")]
        result = subprocess.run(args, capture_output=True, text=True, check=True)
        out[mode] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


def step_options(f: Any) -> Any:
    """The options that `_build` reads: the data, the cache and its teacher, the student config and its terms."""
    for option in reversed([
        click.option("--dataroot", required=True),
        click.option("--version", required=True),
        click.option("--cache", required=True, help="A complete cache over the config's train split."),
        click.option("--teacher", required=True, help="The teacher checkpoint the cache was extracted with."),
        click.option("--config", default="configs/student/bevformer_synth.yaml", show_default=True),
        click.option("--cache-config", default="configs/cache/synth.yaml", show_default=True,
                     help="The layout the online teacher imitates (the cache's config)."),
        click.option("--terms", default="cd,td,rd", show_default=True),
    ]):
        f = option(f)
    return f


@click.command()
@step_options
@click.option("--k", type=int, default=3, show_default=True, help="Past frames of TD and of the online teacher.")
@click.option("--rounds", default=5, show_default=True, help="Timed rounds (each runs every mode).")
@click.option("--steps", default=4, show_default=True, help="Steps per mode per round.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--only", type=click.Choice(MODES), default=None, hidden=True)
@click.option("--json", "json_path", default=None, help="Also write the results here.")
def main(json_path: str | None, only: str | None, **opts: Any) -> None:
    import torch

    opts["device"] = resolve_device(opts["device"])
    if only:
        _memory_child(opts, only)
        return
    device = opts["device"]
    built = {mode: _build(mode, opts, (opts["rounds"] + 1) * opts["steps"]) for mode in MODES}
    peak_gpu = {mode: 0.0 for mode in MODES}
    steps = opts["steps"]

    per_step: dict[str, list[float]] = {mode: [] for mode in MODES}

    def one_round(mode: str) -> Any:
        model, batches, _, optimizer = built[mode]
        done = [0]

        def run() -> None:
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            for batch in batches[done[0]:done[0] + steps]:
                start = time.perf_counter()
                _step(model, optimizer, batch, device)
                if done[0] >= steps:   # the first round is the warm-up
                    per_step[mode].append(time.perf_counter() - start)
            done[0] += steps
            if device.startswith("cuda"):
                peak_gpu[mode] = max(peak_gpu[mode], torch.cuda.max_memory_allocated() / 2**20)
        return run

    interleaved({mode: one_round(mode) for mode in MODES}, opts["rounds"])
    step = {mode: median(t) for mode, t in per_step.items()}
    load = {mode: median(built[mode][2]) for mode in MODES}
    built.clear()   # the memory children below need the RAM
    if device.startswith("cuda"):
        memory = {mode: {"peak_gpu_mib": peak_gpu[mode]} for mode in MODES}
    else:
        memory = _cpu_memory(opts)
    ratios = {"cached/student": step["cached"] / step["student"], "online/cached": step["online"] / step["cached"]}

    click.echo(f"machine: {machine(device)}")
    click.echo(f"student `{opts['config']}`, terms {opts['terms']}, K = {opts['k']}; {opts['rounds']} rounds x "
               f"{steps} steps per mode after a warm-up round; medians of the {len(per_step['student'])} timed steps "
               "of each mode\n")
    if device.startswith("cuda"):
        mem_headers = ["peak GPU memory (MiB)"]
        mem_cells = {m: [f"{memory[m]['peak_gpu_mib']:.0f}"] for m in MODES}
    else:
        mem_headers = ["RSS before steps (MiB)", "peak RSS (MiB)"]
        mem_cells = {m: [f"{memory[m]['before_mib']:.0f}", f"{memory[m]['peak_mib']:.0f}"] for m in MODES}
    rows = [[mode, f"{step[mode]:.3f}", f"{load[mode]:.3f}", *mem_cells[mode]] for mode in MODES]
    click.echo(table(["mode", "step (s)", "batch load (s)", *mem_headers], rows))
    click.echo(f"\ncached / student-only = **{ratios['cached/student']:.3f}** (target <= 1.10); "
               f"online / cached = **{ratios['online/cached']:.3f}** (target >= 2)")
    write_json(json_path, {"step_s": step, "load_s": load, "memory": memory, "ratios": ratios,
                           "batch_size": _batch_size(opts), "k": opts["k"]})


def _batch_size(opts: dict[str, Any]) -> int:
    from pipelines.config import load_config
    from stxd_train.fit import StudentRunConfig

    return load_config(StudentRunConfig, opts["config"]).data.batch_size


if __name__ == "__main__":
    main()
