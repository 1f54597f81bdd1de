"""`stxd-cache`: extract the LiDAR teacher into a Zarr cache, and inspect, verify or render caches."""

from __future__ import annotations

import click

from pipelines.cli_support import StxdGroup, debug_option


@click.group(cls=StxdGroup)
@debug_option
def main() -> None:
    """Teacher caches for stxd (stage one): extract once, reuse for every student run."""


@main.command()
@click.option("--dataroot", required=True, type=click.Path(), help="nuScenes root.")
@click.option("--version", required=True, help="Table folder, e.g. v1.0-trainval or v1.0-synth.")
@click.option("--splits", required=True, help="Comma-separated splits to cache, e.g. synth_train,synth_val.")
@click.option("--teacher", "teacher_path", required=True, type=click.Path(), help="Teacher checkpoint.")
@click.option("--teacher-config", type=click.Path(dir_okay=False),
              help="Teacher YAML for mmdet3d/OpenPCDet checkpoints (native ones carry their config).")
@click.option("--trust-checkpoint", is_flag=True, help="Allow full unpickling of the checkpoint (runs code).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Cache YAML (configs/cache/).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a cache config field.")
@click.option("--precision", type=click.Choice(["fp16", "int8"]), help="Feature precision (overrides config).")
@click.option("--out", required=True, type=click.Path(), help="Cache path (a .zarr folder).")
@click.option("--workers", default=0, show_default=True, help="Start a dask LocalCluster of N worker processes.")
@click.option("--scheduler", help="Join a running dask scheduler (tcp://host:port) instead.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:i].")
def extract(dataroot: str, version: str, splits: str, teacher_path: str, teacher_config: str | None,
            trust_checkpoint: bool, config_path: str | None, overrides: tuple[str, ...], precision: str | None,
            out: str, workers: int, scheduler: str | None, device: str) -> None:
    """Run the teacher once per sample and write (or complete) a cache."""
    import time

    from tqdm import tqdm

    from pipelines.config import load_config
    from pipelines.device import resolve_device
    from stxd_cache.extract import ExtractConfig, ExtractJob
    from stxd_cache.extract import extract as run_extract
    from stxd_cache.store import is_complete
    from stxd_cache.verify import box_line, cache_info

    if workers and scheduler:
        raise click.UsageError("pass either --workers or --scheduler, not both")
    cfg = load_config(ExtractConfig, config_path, overrides, base={"precision": precision} if precision else None)
    job = ExtractJob(dataroot=dataroot, version=version, splits=tuple(s for s in splits.split(",") if s),
                     teacher_path=teacher_path, teacher_config_path=teacher_config, trust_checkpoint=trust_checkpoint,
                     out=out, cfg=cfg, device=str(resolve_device(device)))
    bar = tqdm(unit="sample", desc="extract", disable=None)
    extracted = 0

    def progress(rows: int) -> None:
        nonlocal extracted
        extracted += rows
        bar.update(rows)

    was_complete = is_complete(out)
    start = time.perf_counter()
    try:
        meta = run_extract(job, workers=workers, scheduler=scheduler, progress=progress)
    except KeyboardInterrupt:
        bar.close()
        click.echo(f"interrupted: {_rows_done(out)} of {out} are written; re-run the same command to resume from "
                   "there", err=True)
        raise SystemExit(130) from None
    bar.close()
    seconds = time.perf_counter() - start
    if was_complete:
        click.echo(f"cache {out} is already complete ({meta.dataset.sample_count} samples, created {meta.created}) "
                   "and has the requested fingerprint: nothing was extracted or written. Complete caches are never "
                   "modified; extract into a new --out to make another")
        return
    info = cache_info(out)
    click.echo(f"cache {out} complete: {meta.dataset.sample_count} samples ({extracted} extracted now in "
               f"{seconds:.1f} s), {info['bytes_per_sample'] / 2**20:.2f} MiB per sample, compression "
               f"x{info['compression_ratio']:.2f}")
    click.echo(box_line(info["boxes_per_row"]))


def _rows_done(path: str) -> str:
    """"N of S rows" done in the cache at `path`, for the message of an interrupted extraction."""
    from stxd_cache.errors import CacheError
    from stxd_cache.store import open_cache

    try:
        reader = open_cache(path)
    except CacheError:
        return "no rows"
    return f"{int(reader.done_count)} of {len(reader)} rows"


@main.command()
@click.argument("cache", type=click.Path())
@click.option("--json", "as_json", is_flag=True,
              help="Print everything (fingerprint, layout, per-array sizes) as JSON.")
def info(cache: str, as_json: bool) -> None:
    """Print a cache's completeness, samples, size, compression and teacher boxes per row."""
    import json

    from stxd_cache.verify import cache_info, info_summary

    found = cache_info(cache)
    click.echo(json.dumps(found, indent=2, default=str) if as_json else "\n".join(info_summary(found)))


@main.command()
@click.argument("cache", type=click.Path())
@click.option("--dataroot", type=click.Path(), help="Also check prev_index against the dataset's scenes.")
@click.option("--version", help="Table folder of --dataroot.")
def verify(cache: str, dataroot: str | None, version: str | None) -> None:
    """Read every chunk: CRCs, done flags, prev_index links, finite values. Exit 1 naming bad samples."""
    from tqdm import tqdm

    from stxd_cache.store import open_cache
    from stxd_cache.verify import verify as run_verify

    scenes = timestamps = None
    if dataroot:
        from pipelines.nuscenes import SampleIndex

        reader = open_cache(cache)
        index = SampleIndex.load(dataroot, version or reader.meta.dataset.version, reader.meta.dataset.splits)
        by_token = {s.token: s for s in index}
        scenes = [by_token[t].scene_token if t in by_token else "" for t in reader.tokens]
        timestamps = [by_token[t].timestamp if t in by_token else -1 for t in reader.tokens]
    bar = tqdm(desc="verify", unit="row", disable=None, leave=False)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    report = run_verify(cache, scenes=scenes, timestamps=timestamps, progress=progress)
    bar.close()
    if report.ok:
        click.echo(f"ok: {cache} verified")
        return
    click.echo(f"{len(report.problems)} problem(s) in {cache}:", err=True)
    for problem in report.problems[:100]:
        click.echo(f"  - {problem}", err=True)
    if report.bad_samples:
        click.echo("bad samples: " + ", ".join(report.bad_samples[:50]), err=True)
    raise SystemExit(1)


@main.command()
@click.argument("cache", type=click.Path())
@click.option("--sample", "token", required=True, help="Sample token to render.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG to write.")
@click.option("--dataroot", type=click.Path(), help="Dataset root, to draw the GT outlines too.")
@click.option("--version", help="Table folder of --dataroot (default: the cache's).")
@click.option("--min-score", default=0.3, show_default=True, help="Teacher boxes drawn above this score.")
def show(cache: str, token: str, out: str, dataroot: str | None, version: str | None, min_score: float) -> None:
    """Render the teacher BEV (PCA to RGB) with its boxes, and the GT outlines when --dataroot is given."""
    import os

    from pipelines.paths import check_output_path
    from stxd_cache.render import render_record
    from stxd_cache.store import open_cache

    check_output_path(out, inputs={"the cache": cache, "--dataroot": dataroot})
    reader = open_cache(cache)
    record = reader.read(reader.index_of(token))
    gt = forward = None
    if dataroot:
        from pipelines.nuscenes import SampleIndex
        from pipelines.render import ego_forward

        index = SampleIndex.load(dataroot, version or reader.meta.dataset.version, reader.meta.dataset.splits)
        gt, forward = index.get(token).gt.boxes, ego_forward(index.get(token).lidar2ego)
    name = os.path.basename(os.path.normpath(cache))
    render_record(record, reader.meta.grid, out, gt_boxes=gt, min_score=min_score, forward=forward,
                  title=f"{name} row {reader.index_of(token)}: sample {token}, {int(record.count)} cached teacher "
                        "boxes")
    click.echo(f"wrote {out}")


@main.command()
@click.argument("cache", type=click.Path())
@click.option("--dataroot", required=True, type=click.Path(), help="Dataset root whose GT the teacher is judged by.")
@click.option("--version", help="Table folder of --dataroot (default: the cache's).")
@click.option("--split", "splits", multiple=True, help="Split to audit (repeatable; default: the cache's splits).")
@click.option("--min-score", default=0.3, show_default=True, help="Teacher boxes audited from this score up.")
@click.option("--bin-width", default=0.1, show_default=True, help="Width of the score bins of the calibration.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the full audit as JSON here.")
def audit(cache: str, dataroot: str, version: str | None, splits: tuple[str, ...], min_score: float,
          bin_width: float, json_path: str | None) -> None:
    """Judge the cached teacher boxes by the GT: class agreement, heading and velocity errors, score calibration.

    Per teacher class and overall, for boxes scoring at least --min-score: the share of the boxes overlapping a GT
    box whose best-overlap GT (BEV IoU, any class) has the same class; against the same-class GT matched by centre
    distance (< 2 m, greedily by score): precision, recall, heading error (median, 90th percentile, share flipped
    by more than 90°) and median velocity error; and the precision per score bin with the expected calibration
    error (ECE). Headings are compared modulo 2π for every class, so the numbers are raw: the nuScenes devkit
    compares barrier modulo π and ignores traffic_cone orientation. Prints markdown tables; --json writes every
    number (headings in radians) and, per class, the classes of the GT boxes its boxes overlap.
    """
    import json

    from tqdm import tqdm

    from pipelines.paths import check_output_path
    from stxd_cache.audit import audit_cache, audit_markdown

    if json_path is not None:
        check_output_path(json_path, option="--json", inputs={"the cache": cache, "--dataroot": dataroot})
    bar = tqdm(desc="audit", unit="sample", disable=None, leave=False)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    report = audit_cache(cache, dataroot=dataroot, version=version, splits=splits or None, min_score=min_score,
                         bin_width=bin_width, progress=progress)
    bar.close()
    click.echo(audit_markdown(report), nl=False)
    if json_path is not None:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
        click.echo(f"wrote {json_path}")
