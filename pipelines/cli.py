"""`stxd-data`: generate synthetic nuScenes-format roots and validate any nuScenes root."""

from __future__ import annotations

import click

from pipelines.cli_support import StxdGroup, debug_option


@click.group(cls=StxdGroup)
@debug_option
def main() -> None:
    """Datasets for stxd: synthetic nuScenes-format roots, and checks of real or synthetic ones."""


@main.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Dataset root to write.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="YAML with SynthConfig fields (e.g. configs/data/synth.yaml); flags below override it.")
@click.option("--scenes", type=int, help="Number of scenes.")
@click.option("--samples-per-scene", type=int, help="Keyframes per scene (0.5 s apart).")
@click.option("--seed", type=int, help="Seed; the same seed gives byte-identical output.")
@click.option("--image-size", type=(int, int), metavar="W H", help="Camera image width and height.")
@click.option("--sweeps", type=int, help="LiDAR sweeps between two keyframes.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override any config field.")
@click.option("--workers", type=int, default=None, help="Processes generating scenes (default: all cores).")
@click.option("--overwrite", is_flag=True, help="Replace a dataset already at --out.")
@click.option("--reuse", is_flag=True, help="Keep a complete dataset at --out generated from the same config.")
def synth(out: str, config_path: str | None, scenes: int | None, samples_per_scene: int | None,
          seed: int | None, image_size: tuple[int, int] | None, sweeps: int | None, overrides: tuple[str, ...],
          workers: int | None, overwrite: bool, reuse: bool) -> None:
    """Write a synthetic nuScenes-format dataset that the real devkit loads and DetectionEval scores."""
    from tqdm import tqdm

    from pipelines.config import load_config
    from pipelines.synth import SynthConfig, generate

    flags = {"scenes": scenes, "samples_per_scene": samples_per_scene, "seed": seed,
             "image_size": list(image_size) if image_size else None, "sweeps": sweeps}
    cfg = load_config(SynthConfig, config_path, overrides,
                      base={k: v for k, v in flags.items() if v is not None})
    bar = tqdm(total=cfg.scenes, unit="scene", desc="synth", disable=None)

    def progress(done: int, _total: int) -> None:
        bar.update(done - bar.n)

    summary = generate(cfg, out, workers=workers, overwrite=overwrite, reuse=reuse, progress=progress)
    bar.close()
    verb = "kept" if summary.reused else "wrote"
    click.echo(f"{verb} {summary.root} ({summary.version}): {summary.scenes} scenes, {summary.samples} samples, "
               f"{summary.annotations} annotations, {summary.bytes_on_disk / 2**20:.1f} MiB in "
               f"{summary.seconds:.1f} s")
    click.echo("splits: " + ", ".join(f"{name} = {len(scenes)} scenes" for name, scenes in cfg.splits.items()))


@main.command()
@click.option("--dataroot", required=True, type=click.Path(), help="nuScenes root to validate.")
@click.option("--version", default="v1.0-trainval", show_default=True, help="Table folder (e.g. v1.0-synth).")
@click.option("--no-files", is_flag=True, help="Skip opening every referenced sensor file.")
def check(dataroot: str, version: str, no_files: bool) -> None:
    """Validate a nuScenes root: tables, links, splits, files; print counts and every problem."""
    from tqdm import tqdm

    from pipelines.check import check_root

    report = check_root(dataroot, version, check_files=not no_files,
                        progress=lambda it: tqdm(it, desc="files", unit="file", disable=None, leave=False))
    counts = report.counts
    if counts:
        click.echo(f"{report.root} ({version}): {counts.get('scenes', 0)} scenes, {counts.get('samples', 0)} samples, "
                   f"{counts.get('sample_data', 0)} sample_data ({counts.get('keyframes', 0)} keyframes), "
                   f"{counts.get('annotations', 0)} annotations of {counts.get('instances', 0)} instances")
        if "classes" in counts:
            click.echo("annotations per class: " + ", ".join(f"{k} {v}" for k, v in counts["classes"].items()))
        if counts.get("split_samples"):
            click.echo("splits with samples: " + ", ".join(f"{k} ({v} samples)"
                                                           for k, v in counts["split_samples"].items()))
    if report.ok:
        click.echo("ok: the root is valid")
        return
    click.echo(f"{len(report.problems)} problem(s):", err=True)
    for problem in report.problems[:200]:
        click.echo(f"  - {problem}", err=True)
    if len(report.problems) > 200:
        click.echo(f"  … and {len(report.problems) - 200} more", err=True)
    raise SystemExit(1)


@main.command()
@click.option("--dataroot", required=True, type=click.Path(), help="nuScenes root.")
@click.option("--version", default="v1.0-trainval", show_default=True, help="Table folder (e.g. v1.0-synth).")
@click.option("--splits", default="train,val", show_default=True,
              help="Comma-separated split names: predefined (train, val, mini_val, …) or from splits.json.")
@click.option("--load/--no-load", default=False, show_default=True,
              help="Also read every sample's LiDAR sweeps and six images through the data layer.")
@click.option("--sweeps", default=10, show_default=True, help="LiDAR frames per sample when loading.")
def index(dataroot: str, version: str, splits: str, load: bool, sweeps: int) -> None:
    """Index splits of a root as stxd sees them (samples, history, sweeps, GT) and optionally read them all."""
    import numpy as np
    from tqdm import tqdm

    from pipelines.cameras import load_cameras
    from pipelines.lidar import load_sweeps
    from pipelines.nuscenes import SampleIndex

    names = [s for s in splits.split(",") if s]
    idx = SampleIndex.load(dataroot, version, names)
    scenes = len({s.scene_token for s in idx})
    boxes = np.array([len(s.gt.boxes) for s in idx]) if len(idx) else np.zeros(1)
    click.echo(f"{', '.join(names)}: {len(idx)} samples in {scenes} scenes; GT boxes per sample: mean "
               f"{boxes.mean():.1f}, max {boxes.max()}; sweeps per sample: mean "
               f"{np.mean([len(s.sweeps) for s in idx] or [0]):.1f}")
    if load:
        points = 0
        for sample in tqdm(idx, desc="load", unit="sample", disable=None):
            points += len(load_sweeps(sample, num_sweeps=sweeps))
            load_cameras(sample)
        click.echo(f"read {len(idx)} samples: {points / max(len(idx), 1):.0f} points per sample "
                   f"({sweeps} frames), 6 images each")
