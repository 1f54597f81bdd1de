"""Whole-cache checks and summaries: `verify` decodes every chunk and checks the invariants, `cache_info`
reports the fingerprint, sizes and completeness. Both only read."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stxd_cache.schema import (
    UNIT_ARRAYS,
    array_specs,
    decode_tokens,
    digest_problems,
    prev_index_problems,
    row_problems,
    work_units,
)
from stxd_cache.store import CacheReader
from stxd_cache.store.zarr_io import (
    MAX_PROBLEMS,
    list_objects,
    object_key,
    object_sizes,
    open_arrays,
    open_group,
    read_checked,
    read_meta,
    row_names,
    rows_per_object,
    stored_size,
)


@dataclass
class VerifyReport:
    """What `verify` found: `ok` when there are no problems."""

    path: str
    problems: list[str] = field(default_factory=list)
    """One line per problem, naming the array, row and sample token."""
    bad_samples: list[str] = field(default_factory=list)
    """Tokens (or `row N` where the token itself is unreadable) of every sample with a problem, in row order."""
    rows_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(path: str | os.PathLike[str], *, scenes: Sequence[str] | None = None,
           timestamps: Sequence[int] | None = None,
           progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Decode every chunk of every array and check the cache's invariants.

    Checks: every stored object present and every chunk passing its crc32c and decoding; `done` all set and
    `complete`; prev_index (-1 or an earlier row, -1 only at the end, consistent chains; with `scenes` (S,) the
    same scene and the nearest earlier row of it; with `timestamps` (S,) strictly decreasing times); finite
    features, tokens that match the pooled BEV, box counts, labels, padding and score order; and every row's values
    against its digest (bound to its sample token and the cache's fingerprint).

    progress: called with (rows checked, S) after each work unit.
    """
    path = os.fspath(path)
    group = open_group(path, "r")
    meta = read_meta(group, path)
    report = VerifyReport(path=path)
    n, r = meta.dataset.sample_count, meta.layout.rows_per_shard
    specs = array_specs(meta)
    arrays = open_arrays(group, meta, path, lenient=True)
    bad_rows: set[int] = set()

    def problem(text: str, rows: Sequence[int] | np.ndarray = ()) -> None:
        bad_rows.update(int(x) for x in rows)
        report.problems.append(text)

    for name in specs:
        if name not in arrays:
            problem(f"array `{name}` is missing or does not match the schema (shape, dtype or chunking)")
    tokens = [f"row {i}" for i in range(n)]
    if "sample_token" in arrays:
        rows, readable = read_checked(arrays["sample_token"], range(n))
        tokens = [t if ok else f"row {i}" for i, (t, ok) in enumerate(zip(decode_tokens(rows), readable,
                                                                              strict=True))]
    done, done_ok = read_checked(arrays["done"], range(n)) if "done" in arrays else (np.zeros(n, bool),) * 2
    for i in np.flatnonzero(~done_ok):
        problem(f"array `done` row {row_names(tokens, [i])} fails to decode (corrupt chunk)", [i])
    for name, array in arrays.items():  # absent and empty objects read back as fill values: look at the keys
        if math.prod(specs[name].row_shape) == 0:
            continue
        keys = list_objects(array)
        step = rows_per_object(array)
        objects = [object_key(array, j) for j in range(math.ceil(n / step))]
        present = [key for key in objects if key in keys]
        sizes = dict(zip(present, object_sizes(array, present), strict=True))
        for j, key in enumerate(objects):
            held = range(j * step, min((j + 1) * step, n))
            # Units not written yet have no objects: only rows marked done, or written at creation, must have
            # them (and every `done` object in a complete cache).
            if name == "done":
                expected = meta.complete
            else:
                expected = specs[name].chunking == "index" or bool(done[held.start:held.stop].any())
            if expected and key not in keys:
                problem(f"array `{name}`: stored object `{key}` is missing (rows {row_names(tokens, held)})", held)
            elif key in keys and sizes[key] == 0:  # no encoded chunk or shard is empty: it holds a crc32c
                problem(f"array `{name}`: stored object `{key}` is empty (0 bytes: a truncated write or copy; rows "
                        f"{row_names(tokens, held)})", held)
    prev = np.full((n, meta.k_max), -1, np.int32)
    for unit in work_units(n, r):
        block: dict[str, np.ndarray] = {}
        for name, array in arrays.items():
            if name == "done":
                continue
            block[name], ok = read_checked(array, unit)
            for k in np.flatnonzero(~ok):
                problem(f"array `{name}` row {row_names(tokens, [unit.start + k])} fails to decode (corrupt chunk)",
                        [unit.start + k])
        if "prev_index" in block:
            prev[unit.start:unit.stop] = block["prev_index"]
        check = done[unit.start:unit.stop] & ~np.isin(np.arange(unit.start, unit.stop), list(bad_rows))
        if all(name in block for name in UNIT_ARRAYS if name in specs):
            found = row_problems(block, meta, check) + digest_problems(block, meta, tokens[unit.start:unit.stop], check)
            for k, what in sorted(found):
                problem(f"row {row_names(tokens, [unit.start + k])}: {what}", [unit.start + k])
        report.rows_checked = unit.stop
        if progress:
            progress(unit.stop, n)
    missing = np.flatnonzero(~done & done_ok)
    if len(missing) and meta.complete:
        problem(f"{len(missing)} of {n} rows are not done (rows {row_names(tokens, missing)}) although the cache is "
                "marked complete: their `done` chunk was deleted or overwritten; re-extract the cache into a new path",
                missing)
    elif len(missing):
        problem(f"{len(missing)} of {n} rows are not done (rows {row_names(tokens, missing)}); resume the extraction "
                "to write them", missing)
    if not meta.complete:
        problem("the cache is not complete (`complete` is false): finalize has not run; resume the extraction")
    if "prev_index" in arrays:
        for row, what in prev_index_problems(prev, scenes=scenes, timestamps=timestamps):
            problem(f"prev_index row {row_names(tokens, [row])}: {what}", [row])
    if len(set(tokens)) != n:
        problem("`sample_token` holds duplicate tokens")
    if len(report.problems) > MAX_PROBLEMS:
        extra = len(report.problems) - MAX_PROBLEMS
        report.problems = [*report.problems[:MAX_PROBLEMS], f"... and {extra} more problems"]
    report.bad_samples = [tokens[i] for i in sorted(bad_rows)]
    return report


def cache_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Summary of a cache: fingerprint, counts, and sizes on disk against the uncompressed data.

    `uncompressed_bytes` counts the rows written so far (done rows, plus the sample_token and prev_index written
    at creation); `bytes_per_sample` and `compression_ratio` divide by the done rows and by `bytes_on_disk`.
    """
    path = os.fspath(path)
    group = open_group(path, "r")
    meta = read_meta(group, path)
    reader = CacheReader(path=path, group=group, meta=meta)
    done_count = reader.done_count
    arrays: dict[str, dict[str, Any]] = {}
    for name, array in reader.arrays.items():
        rows = len(reader) if name in ("prev_index", "sample_token") else done_count
        logical = rows * math.prod(array.shape[1:]) * array.dtype.itemsize
        arrays[name] = {"shape": list(array.shape), "dtype": str(array.dtype), "chunks": list(array.chunks),
                        "shards": list(array.shards) if array.shards else None,
                        "bytes_on_disk": int(array.nbytes_stored()), "uncompressed_bytes": int(logical)}
    on_disk = sum(a["bytes_on_disk"] for a in arrays.values()) + stored_size(group, "zarr.json")
    uncompressed = sum(a["uncompressed_bytes"] for a in arrays.values())
    counts = reader.box_counts()[reader.done]
    boxes = None if not len(counts) else {
        "mean": float(counts.mean()), "min": int(counts.min()), "max": int(counts.max()),
        "rows_without_boxes": int((counts == 0).sum()), "capacity": meta.box_capacity}
    return {
        "path": path, "fingerprint": meta.fingerprint, "created": meta.created, "layout": meta.to_dict()["layout"],
        "teacher": {"name": meta.teacher.name, "sha256": meta.teacher.sha256}, "precision": meta.precision,
        # `complete` is what the rows say; `finalized` is the flag, which finalize sets only once every row is done
        # (a store whose `done` rows were lost afterwards has it set and is not complete).
        "sample_count": len(reader), "done_count": done_count, "complete": meta.complete and done_count == len(reader),
        "finalized": meta.complete,
        "bytes_on_disk": on_disk, "bytes_per_sample": on_disk / done_count if done_count else None,
        "uncompressed_bytes": uncompressed, "compression_ratio": uncompressed / on_disk if on_disk else None,
        "boxes_per_row": boxes, "arrays": arrays,
    }


def box_line(boxes: dict[str, Any] | None) -> str:
    """The teacher boxes per written row of `cache_info`, in one line."""
    if boxes is None:
        return "teacher boxes per row: no row written yet"
    none = boxes["rows_without_boxes"]
    return (f"teacher boxes per row: mean {boxes['mean']:.1f}, min {boxes['min']}, max {boxes['max']} (capacity "
            f"{boxes['capacity']}); {none} row{'' if none == 1 else 's'} without a box")


def info_summary(info: dict[str, Any]) -> list[str]:
    """The few lines a user reads first from `cache_info`: completeness, samples, size, compression, boxes."""
    state = "complete" if info["complete"] else "INCOMPLETE"
    flag = "finalized" if info["finalized"] else "not finalized"
    dataset = info["fingerprint"].get("dataset", {})
    lines = [f"{info['path']}: {state}, {info['done_count']} of {info['sample_count']} rows written ({flag})",
             f"samples: {info['sample_count']} of {dataset.get('version')} {', '.join(dataset.get('splits', []))}; "
             f"teacher {info['teacher']['name']} (sha256 {info['teacher']['sha256'][:12]})"]
    if info["bytes_per_sample"] is not None:
        lines.append(f"size: {info['bytes_on_disk'] / 2**20:.1f} MiB on disk, {info['bytes_per_sample'] / 2**20:.3f} "
                     f"MiB per sample, compression x{info['compression_ratio']:.2f} ({info['precision']})")
    lines.append(box_line(info["boxes_per_row"]))
    return lines
