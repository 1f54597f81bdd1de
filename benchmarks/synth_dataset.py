"""Generation time, size on disk, and GT-as-prediction scores of synthetic roots.

    .venv/bin/python benchmarks/synth_dataset.py --config configs/data/synth_tiny.yaml --config configs/data/synth.yaml

For each config: generate into a temporary folder (all cores), then submit the val split's ground
truth, converted LiDAR frame → global by `pipelines.boxes`, to the real `DetectionEval`.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time

import click
import numpy as np


@click.command()
@click.option("--config", "configs", multiple=True, required=True, help="SynthConfig YAML (repeatable).")
@click.option("--workers", type=int, default=None, help="Generation processes (default: all cores).")
def main(configs: tuple[str, ...], workers: int | None) -> None:
    from pipelines.config import load_config
    from pipelines.evaluation import Detections, build_submission, evaluate
    from pipelines.nuscenes import SampleIndex, load_nuscenes
    from pipelines.synth import SynthConfig, generate

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}")
    print("| config | scenes x samples | image | sweeps | generate (s) | size (MiB) | annotations | GT NDS | GT mAP |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in configs:
        cfg = load_config(SynthConfig, path)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            summary = generate(cfg, tmp, workers=workers)
            seconds = time.perf_counter() - start
            nusc = load_nuscenes(tmp, cfg.version)
            index = SampleIndex.from_nuscenes(nusc, ["synth_val"])
            preds = {}
            for s in index:
                keep = s.gt.num_lidar_pts > 0
                preds[s.token] = Detections(boxes=s.gt.boxes[keep], scores=np.ones(int(keep.sum())),
                                            labels=s.gt.labels[keep],
                                            attributes=[a for a, k in zip(s.gt.attributes, keep, strict=True) if k])
            metrics = evaluate(nusc, build_submission(index, preds), "synth_val", os.path.join(tmp, "eval"))
        print(f"| {path} | {cfg.scenes} x {cfg.samples_per_scene} | {cfg.image_size[0]}x{cfg.image_size[1]} | "
              f"{cfg.sweeps} | {seconds:.1f} | {summary.bytes_on_disk / 2**20:.1f} | {summary.annotations} | "
              f"{metrics['NDS']:.4f} | {metrics['mAP']:.4f} |")


if __name__ == "__main__":
    main()
