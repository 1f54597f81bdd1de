"""Student data loading rate with 0, 1 and 2 DataLoader workers, as `stxd-train fit --cache` loads it.

    .venv/bin/python benchmarks/loader.py --dataroot out/demo/data --version v1.0-synth \
        --cache out/demo/cache.zarr --config configs/student/bevformer_synth.yaml --batches 16 --rounds 2

Each sample is the six camera images (decoded, resized, augmented as configured), the temporal queue's
frames, and the joined cache record with the RD ground-truth IoUs when `--terms` includes rd. The worker
counts alternate for `--rounds` rounds; each measure times `--batches` batches after the first one (worker
start-up excluded). With `--step-json` (from `step_time.py`) the rate is set against what the cached
training step consumes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click
from common import machine, median, table, write_json


def _rate(dataset: Any, batch_size: int, batches: int, workers: int, start: int) -> float:
    """Samples per second over `batches` batches after the first."""
    from torch.utils.data import DataLoader, Subset

    from stxd_train.data import collate

    n = (batches + 1) * batch_size
    subset = Subset(dataset, [(start + i) % len(dataset) for i in range(n)])
    loader = DataLoader(subset, batch_size=batch_size, num_workers=workers, collate_fn=collate, shuffle=False)
    it = iter(loader)
    next(it)
    begin = time.perf_counter()
    count = sum(len(batch.tokens) for batch in it)
    return count / (time.perf_counter() - begin)


@click.command()
@click.option("--dataroot", required=True)
@click.option("--version", required=True)
@click.option("--cache", required=True)
@click.option("--config", default="configs/student/bevformer_synth.yaml", show_default=True)
@click.option("--terms", default="cd,td,rd", show_default=True)
@click.option("--batches", default=16, show_default=True, help="Timed batches per measure.")
@click.option("--rounds", default=2, show_default=True)
@click.option("--step-json", default=None, help="step_time.py's --json output, for the consumption check.")
@click.option("--json", "json_path", default=None, help="Also write the results here.")
def main(dataroot: str, version: str, cache: str, config: str, terms: str, batches: int, rounds: int,
         step_json: str | None, json_path: str | None) -> None:
    from pipelines.config import load_config
    from pipelines.nuscenes import SampleIndex
    from stxd_train.data import CameraDataset
    from stxd_train.fit import StudentRunConfig, open_training_cache

    cfg = load_config(StudentRunConfig, config, [f"distill.terms=[{terms}]"])
    index = SampleIndex.load(dataroot, version, cfg.data.train_splits, k_prev=cfg.model.queue, max_sweeps=10)
    dataset = CameraDataset(index, image_size=cfg.data.image_size, grid=cfg.model.grid, queue=cfg.model.queue,
                            augment=cfg.data.augment, cache=open_training_cache(cache, grid=cfg.model.grid),
                            cache_k=cfg.distill.k, gt_iou="rd" in terms.split(","))
    b = cfg.data.batch_size
    rates: dict[int, list[float]] = {w: [] for w in (0, 1, 2)}
    for r in range(rounds):
        for w in rates:   # a different stretch of samples each time, so no measure reads warm files only
            rates[w].append(_rate(dataset, b, batches, w, start=(r * 3 + w) * (batches + 1) * b))
    rate = {w: median(v) for w, v in rates.items()}
    rows = [[str(w), f"{rate[w]:.2f}", f"{rate[w] / rate[0]:.2f}x"] for w in rate]
    click.echo(f"machine: {machine()}")
    click.echo(f"`{config}` (batch {b}, {cfg.data.image_size[0]}x{cfg.data.image_size[1]} images x 6 cameras, "
               f"queue {cfg.model.queue}), cache `{cache}`, terms {terms}; {batches} batches per measure, medians "
               f"of {rounds} interleaved rounds\n")
    click.echo(table(["workers", "samples/s", "against 0 workers"], rows))
    results: dict[str, Any] = {"samples_s": rate}
    if step_json:
        step = json.loads(Path(step_json).read_text())
        need = step["batch_size"] / step["step_s"]["cached"]
        best = max(rate.values())
        results["loader_over_step"] = best / need
        click.echo(f"\nthe cached training step consumes {need:.2f} samples/s; the best loader rate is "
                   f"**{best / need:.1f}x** that")
    write_json(json_path, results)


if __name__ == "__main__":
    main()
