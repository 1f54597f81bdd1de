"""Cache write and read rates, sizes and layouts, against the machine's own limits, and the extrapolation to
full nuScenes.

    .venv/bin/python benchmarks/cache_io.py --cache out/demo/cache.zarr --samples 48 --rounds 3 \
        --step-json step_time.json

The records are real teacher outputs: the first `--samples` rows of `--cache`, decoded once. Every layout
(precision × chunk or shard × zstd level) is written `--rounds` times into fresh stores, the layouts
interleaved within each round, and read back the same way; the tables give medians.

- write: `create_or_resume` → `write_unit` per unit → `finalize`, in one process; the default layout also
  with N processes writing disjoint units (spawned, each reopening the writer by path).
- read: `CacheReader.read` of every row (the row, its tokens and its K past frames' tokens, decoded to
  float32, as the student loader reads them) in one process, and through a torch DataLoader with N workers.
- limits, measured in the same run on the same files: reading the store's files raw into memory (what `cat`
  does; from the page cache, as are the cache reads) and `np.copyto` of 256 MiB (memory bandwidth).
- consumption: with `--step-json` (from `step_time.py`), the cached training step's record rate
  (batch / step time) against the loader's; the loader must sustain 3x.

MB are 10^6 bytes. "stored MB/s" counts the arrays' bytes before compression (fp16 or int8 as stored), "disk
MB/s" the compressed bytes, "decoded MB/s" the float32 records the reader returns.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
from common import dir_bytes, machine, median, table, write_json

FULL_NUSCENES = {"keyframes": 34_149, "channels": 512, "grid": 128, "token_grid": 32, "native_grid": 180,
                 "gpus": 8, "samples_per_gpu_s": 2.0}
LAYOUTS = {   # name: (precision, rows_per_shard, zstd_level)
    "fp16, shard 8, zstd 3": ("fp16", 8, 3),
    "fp16, shard 8, zstd 1": ("fp16", 8, 1),
    "fp16, chunk (1 row), zstd 3": ("fp16", 1, 3),
    "fp16, chunk (1 row), zstd 1": ("fp16", 1, 1),
    "int8, shard 8, zstd 3": ("int8", 8, 3),
}
DEFAULT = "fp16, shard 8, zstd 3"


@dataclasses.dataclass
class Source:
    """The records to write and the metadata to write them under."""

    meta: Any
    tokens: list[str]
    prev: np.ndarray
    records: list[Any]


def _source(cache: str, samples: int) -> Source:
    from stxd_cache.schema import TeacherRecord
    from stxd_cache.store import open_cache

    reader = open_cache(cache)
    reader.require_complete()
    n = min(samples, len(reader))
    records = []
    for i in range(n):
        r = reader.read(i)
        records.append(TeacherRecord(bev=r.bev, boxes=r.boxes[:r.count], scores=r.scores[:r.count],
                                     labels=r.labels[:r.count], probs=r.probs[:r.count]))
    # Rows are in scene and time order, so past frames of the first n rows are among them.
    prev = np.asarray(reader._prev[:n])
    meta = dataclasses.replace(reader.meta, complete=False, created="",
                               dataset=dataclasses.replace(reader.meta.dataset, sample_count=n))
    return Source(meta=meta, tokens=reader.tokens[:n], prev=prev, records=records)


def _store(tmp: str, r: int, layout: str) -> str:
    """The path of round `r`'s store of one layout."""
    return os.path.join(tmp, f"{r}-{LAYOUTS[layout][0]}-r{LAYOUTS[layout][1]}-z{LAYOUTS[layout][2]}.zarr")


def _create(src: Source, path: str, layout: str) -> Any:
    from stxd_cache.store import create_or_resume

    precision, rows, level = LAYOUTS[layout]
    meta = dataclasses.replace(src.meta, precision=precision)
    return create_or_resume(path, meta, src.tokens, src.prev, rows_per_shard=rows, zstd_level=level)


def _write_units(writer: Any, units: list[range], records: Any) -> None:
    """Write `units`; `records` maps a row to its record (a list, or a dict of the rows sent to a process)."""
    for rows in units:
        writer.write_unit(rows, [records[i] for i in rows])


def _write_part(args: tuple[Any, list[range], dict[int, Any]]) -> None:
    """One spawned writer process: its share of the units, with their records."""
    _write_units(*args)


def _write(src: Source, path: str, layout: str, pool: Any = None, workers: int = 1) -> float:
    """Seconds to create, fill and finalise one store (`pool`: write units in `workers` processes)."""
    start = time.perf_counter()
    writer = _create(src, path, layout)
    units = writer.units
    if pool is None:
        _write_units(writer, units, src.records)
    else:
        parts = [units[w::workers] for w in range(workers)]
        pool.map(_write_part, [(writer, part, {i: src.records[i] for u in part for i in u}) for part in parts])
    writer.finalize()
    return time.perf_counter() - start


def _read_all(path: str) -> float:
    from stxd_cache.store import open_cache

    start = time.perf_counter()
    reader = open_cache(path)
    for i in range(len(reader)):
        reader.read(i)
    return time.perf_counter() - start


class _Records:
    """A map-style dataset of cache records for the DataLoader runs (the reader opens lazily per worker)."""

    def __init__(self, path: str, n: int) -> None:
        self.path, self.n, self.reader = path, n, None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        from stxd_cache.store import open_cache

        if self.reader is None:
            self.reader = open_cache(self.path)
        return self.reader.read(i).index


def _loader_rate(path: str, n: int, workers: int) -> float:
    """Records per second through a DataLoader, timed from the first record (worker start-up excluded)."""
    from torch.utils.data import DataLoader

    loader = DataLoader(_Records(path, n), batch_size=None, num_workers=workers, shuffle=False,
                        multiprocessing_context="spawn" if workers else None)
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    count = sum(1 for _ in it)
    return count / (time.perf_counter() - start)


def _raw_read(path: str) -> float:
    """Seconds to read every file under `path` into one buffer."""
    files = [f for f in Path(path).rglob("*") if f.is_file()]
    buf = bytearray(max(f.stat().st_size for f in files))
    start = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            fh.readinto(buf)
    return time.perf_counter() - start


def _copy_bandwidth(rounds: int) -> float:
    """Memory bandwidth of np.copyto, bytes read + written per second (median of `rounds`)."""
    src = np.ones(2**28 // 8, np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - start)
    return 2 * src.nbytes / median(times)


def _record_bytes(meta: Any) -> int:
    """Float32 bytes of one decoded record as the reader returns it (BEV, tokens, K past tokens, boxes)."""
    h, w = meta.grid.shape
    tokens = meta.num_tokens * meta.channels
    boxes = meta.box_capacity * (9 + 1 + 1 + meta.num_classes)
    return 4 * (meta.channels * h * w + (1 + meta.k_max) * tokens + boxes)


def _extrapolate(info: dict[str, Any], meta: Any) -> dict[str, float]:
    """Full nuScenes from this cache's measured compression, scaled by the channel and cell counts."""
    f = FULL_NUSCENES
    bev = f["channels"] * f["grid"] ** 2 * 2
    tokens = f["channels"] * f["token_grid"] ** 2 * 2
    per_sample_raw = bev + tokens    # boxes are < 0.1% of a row
    ratio = info["compression_ratio"]
    disk = per_sample_raw / ratio
    rate = f["gpus"] * f["samples_per_gpu_s"]
    decoded = 4 * (f["channels"] * f["grid"] ** 2 + (1 + meta.k_max) * f["channels"] * f["token_grid"] ** 2)
    past_disk = meta.k_max * tokens / ratio   # past frames' tokens, read again for each sample
    return {"raw_MiB": per_sample_raw / 2**20, "disk_MiB": disk / 2**20, "total_TB": disk * f["keyframes"] / 1e12,
            "native_MiB": f["channels"] * f["native_grid"] ** 2 * 2 / 2**20,
            "read_MBps": (disk + past_disk) * rate / 1e6, "decoded_MBps": decoded * rate / 1e6, "rate": rate}


@click.command()
@click.option("--cache", required=True, help="A complete cache whose first rows are the records to write.")
@click.option("--samples", default=48, show_default=True, help="Rows to write and read per store.")
@click.option("--rounds", default=3, show_default=True, help="Interleaved repetitions of every measure.")
@click.option("--workers", default=2, show_default=True, help="N: writer processes and DataLoader workers.")
@click.option("--step-json", default=None, help="step_time.py's --json output, for the consumption check.")
@click.option("--work-dir", default=None, help="Where the stores go (default: a temporary folder).")
@click.option("--json", "json_path", default=None, help="Also write the results here.")
def main(cache: str, samples: int, rounds: int, workers: int, step_json: str | None, work_dir: str | None,
         json_path: str | None) -> None:
    from stxd_cache.verify import cache_info

    src = _source(cache, samples)
    n = len(src.records)
    tmp = tempfile.mkdtemp(prefix="stxd-bench-io-", dir=work_dir)
    ctx = multiprocessing.get_context("spawn")
    write_s: dict[str, list[float]] = {name: [] for name in [*LAYOUTS, "parallel"]}
    read_s: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    loader: dict[int, list[float]] = {w: [] for w in range(workers + 1)}
    raw_s: list[float] = []
    try:
        with ctx.Pool(workers) as pool:
            for r in range(rounds):
                for name in LAYOUTS:
                    write_s[name].append(_write(src, _store(tmp, r, name), name))
                write_s["parallel"].append(_write(src, os.path.join(tmp, f"{r}-parallel.zarr"), DEFAULT, pool,
                                                  workers))
                for name in LAYOUTS:
                    read_s[name].append(_read_all(_store(tmp, r, name)))
                default = _store(tmp, r, DEFAULT)
                raw_s.append(_raw_read(default))
                for w in loader:
                    loader[w].append(_loader_rate(default, n, w))
        infos = {name: cache_info(_store(tmp, 0, name)) for name in LAYOUTS}
        default_bytes = dir_bytes(_store(tmp, 0, DEFAULT))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    copy_bps = _copy_bandwidth(5)
    decoded = _record_bytes(src.meta)
    int8_err = _int8_error(src)

    rows = []
    results: dict[str, Any] = {"samples": n, "layouts": {}}
    for name in LAYOUTS:
        info = infos[name]
        stored = info["uncompressed_bytes"] / n
        disk = info["bytes_per_sample"]
        w, rd = median(write_s[name]), median(read_s[name])
        results["layouts"][name] = {"write_samples_s": n / w, "read_samples_s": n / rd, "disk_bytes": disk,
                                    "ratio": info["compression_ratio"]}
        rows.append([name, f"{disk / 2**20:.3f}", f"x{info['compression_ratio']:.2f}", f"{n / w:.1f}",
                     f"{stored * n / w / 1e6:.0f}", f"{n / rd:.1f}", f"{disk * n / rd / 1e6:.0f}",
                     f"{decoded * n / rd / 1e6:.0f}"])
    default_info = infos[DEFAULT]
    par = median(write_s["parallel"])
    rates = {w: median(v) for w, v in loader.items()}
    raw_bps = default_bytes / median(raw_s)

    click.echo(f"machine: {machine()}")
    click.echo(f"{n} real teacher records from `{cache}` ({src.meta.channels} channels, {src.meta.grid.shape[0]}x"
               f"{src.meta.grid.shape[1]} BEV, K_max {src.meta.k_max}); medians of {rounds} interleaved rounds\n")
    click.echo(table(["layout", "disk / sample (MiB)", "compression", "write (samples/s)", "write (stored MB/s)",
                      "read (samples/s)", "read (disk MB/s)", "read (decoded MB/s)"], rows))
    click.echo(f"\nint8 against fp16: relative L2 error of the BEV {int8_err['mean']:.2e} mean, "
               f"{int8_err['max']:.2e} max over the {n} rows")
    stored_default = default_info["uncompressed_bytes"] / n
    lrows = [[f"write, {workers} processes ({DEFAULT})", f"{n / par:.1f}", f"{stored_default * n / par / 1e6:.0f} "
              f"stored, x{median(write_s[DEFAULT]) / par:.2f} over 1 process"]]
    for w, rate in rates.items():
        what = "one process, no workers" if w == 0 else f"{w} worker{'s' if w > 1 else ''}"
        lrows.append([f"read through DataLoader, {what}", f"{rate:.1f}",
                      f"{rate * default_info['bytes_per_sample'] / 1e6:.0f} disk, {rate * decoded / 1e6:.0f} "
                      "decoded"])
    lrows.append(["raw read of the store's files (cat)", f"{raw_bps / default_info['bytes_per_sample']:.1f}",
                  f"{raw_bps / 1e6:.0f} disk"])
    lrows.append(["np.copyto, 256 MiB (read + write)", f"{copy_bps / decoded:.1f}",
                  f"{copy_bps / 1e6:.0f} memory"])
    click.echo("")
    click.echo(table(["processes and limits", "samples/s", "MB/s"], lrows))
    best = max(rates.values())
    click.echo(f"\nbest loader read rate: {best * default_info['bytes_per_sample'] / raw_bps:.2f} of the raw file "
               f"read rate (disk bytes), {best * decoded / copy_bps:.3f} of np.copyto bandwidth (decoded bytes)")
    results.update({"parallel_write_samples_s": n / par, "loader_samples_s": rates, "raw_read_Bps": raw_bps,
                    "copyto_Bps": copy_bps, "int8_error": int8_err})
    if step_json:
        step = json.loads(Path(step_json).read_text())
        need = step["batch_size"] / step["step_s"]["cached"]
        results["consumption"] = {"step_samples_s": need, "loader_over_step": best / need}
        click.echo(f"cached training step consumes {need:.2f} records/s (batch {step['batch_size']} / "
                   f"{step['step_s']['cached']:.3f} s); the loader's best {best:.1f} records/s is "
                   f"**{best / need:.1f}x** that (target >= 3x)")
    ext = _extrapolate(default_info, src.meta)
    results["full_nuscenes"] = ext
    f = FULL_NUSCENES
    click.echo(f"\nfull nuScenes, extrapolated: {f['channels']}x{f['native_grid']}x{f['native_grid']} teacher "
               f"features ({ext['native_MiB']:.1f} MiB fp16) resampled to {f['grid']}x{f['grid']} at extraction = "
               f"{ext['raw_MiB']:.1f} MiB per row with its {f['token_grid']}x{f['token_grid']} tokens; at the "
               f"measured fp16 compression x{default_info['compression_ratio']:.2f} that is "
               f"{ext['disk_MiB']:.2f} MiB per keyframe, **{ext['total_TB']:.2f} TB** for {f['keyframes']:,} "
               f"keyframes. {f['gpus']} GPUs x {f['samples_per_gpu_s']:.0f} samples/s = {ext['rate']:.0f} "
               f"samples/s need **{ext['read_MBps']:.0f} MB/s** from disk (row + K_max = {src.meta.k_max} past "
               f"token sets) and {ext['decoded_MBps']:.0f} MB/s of decoding: "
               f"{ext['decoded_MBps'] / (rates[0] * decoded / 1e6):.0f} loader processes at this CPU's one-process "
               f"rate of {rates[0] * decoded / 1e6:.0f} decoded MB/s.")
    write_json(json_path, results)


def _int8_error(src: Source) -> dict[str, float]:
    """Relative L2 error of int8 against the fp16 values it quantises (per row)."""
    from stxd_cache.schema import decode_bev, quantise_int8

    errors = []
    for rec in src.records:
        ref = rec.bev.astype(np.float16).astype(np.float32)
        q, scale, offset = quantise_int8(ref)
        errors.append(float(np.linalg.norm(decode_bev(q, scale, offset) - ref) / np.linalg.norm(ref)))
    return {"mean": float(np.mean(errors)), "max": float(np.max(errors))}


if __name__ == "__main__":
    main()
