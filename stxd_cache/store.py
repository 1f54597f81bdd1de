"""The teacher cache on disk (Zarr v3, one group): create or resume, write work units, finalise, read, verify.

Lifecycle: `create_or_resume` makes the store (or reopens one with the same fingerprint), `CacheWriter.write_unit`
writes R rows at a time and sets their `done` flags last, `finalize` sets `complete` once every row is done.
`open_cache` reads; `verify` decodes every chunk and checks the invariants; `cache_info` summarises.
The contract (arrays, attributes, row encoding, invariants) lives in `stxd_cache.schema`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import re
import socket
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.core.sync import sync

from pipelines.errors import ConfigError
from stxd_cache.errors import (
    CacheCorruptError,
    CacheError,
    CacheIncompleteError,
    CacheLockedError,
    CacheReadOnlyError,
    CacheWriteError,
    FingerprintMismatchError,
    LayoutMismatchError,
    NotACacheError,
    SampleNotFoundError,
)
from stxd_cache.schema import (
    ATTRS_KEY,
    FINGERPRINT_KEY,
    SCHEMA_VERSION,
    UNIT_ARRAYS,
    CacheLayout,
    CacheMeta,
    CacheRecord,
    DatasetInfo,
    TeacherInfo,
    TeacherRecord,
    array_specs,
    decode_bev,
    decode_tokens,
    digested_arrays,
    encode_record,
    encode_tokens,
    fingerprint_differences,
    fingerprint_digest,
    prev_index_problems,
    row_digest,
    rows_per_file,
    work_units,
)

__all__ = [
    "CacheLayout", "CacheMeta", "CacheReader", "CacheRecord", "CacheWriter", "DatasetInfo", "TeacherInfo",
    "TeacherRecord", "WriterLock", "create_or_resume", "open_cache",
]

DEFAULT_LAYOUT = CacheLayout()
# Written into the group attributes while arrays are being created, replaced by `stxd` when creation finishes:
# a store holding only this marker is an interrupted creation, which `create_or_resume` may redo.
_CREATING_KEY = "stxd_creating"
# Who holds the writer lock (pid, host, since), recorded while a store is being written so that a second writer's
# error can name it; finalize drops it.
_WRITER_KEY = "stxd_writer"
_MAX_PROBLEMS = 100
# zarr's LocalStore writes each object to `<name>.<32 hex digits>.partial`, then renames it into place: a process
# killed in between leaves that temporary file behind, and `finalize` removes it.
_TEMP_FILE = re.compile(r"\.[0-9a-f]{32}\.partial$")
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


# ----------------------------------------------------------------------------------------------- store helpers


def _open_group(path: str, mode: str) -> zarr.Group:
    if "://" not in path:
        if not os.path.exists(path):
            raise NotACacheError(f"no teacher cache at {path}: the path does not exist; check the path, or run "
                                 "`stxd-cache extract --out` to create one")
        if not os.path.isdir(path):
            raise NotACacheError(f"{path} is a file, not a teacher cache (a Zarr v3 directory); choose another path")
    try:
        return zarr.open_group(path, mode=mode, zarr_format=3)  # type: ignore[arg-type]
    except (FileNotFoundError, ValueError, KeyError, TypeError) as exc:
        raise NotACacheError(f"{path} exists but is not a Zarr v3 group ({type(exc).__name__}: {exc}), so not an "
                             "stxd teacher cache; choose an empty or new path, or delete it if it is a broken cache"
                             ) from None


def _read_meta(group: zarr.Group, path: str) -> CacheMeta:
    attrs = group.attrs.asdict()
    if ATTRS_KEY not in attrs and _CREATING_KEY in attrs:
        raise CacheIncompleteError(f"cache {path} was still being created when its extraction stopped (its arrays "
                                   "are not all made); re-run the same `stxd-cache extract`, which creates it again")
    if ATTRS_KEY not in attrs:
        raise NotACacheError(f"{path} is a Zarr group without the `{ATTRS_KEY}` attribute, so not an stxd teacher "
                             "cache; choose another path (stxd never writes into foreign stores)")
    stored = attrs[ATTRS_KEY]
    version = stored.get("schema_version") if isinstance(stored, dict) else None
    if version != SCHEMA_VERSION:
        raise CacheError(f"cache {path} has schema_version {version!r}; this stxd reads schema {SCHEMA_VERSION} "
                         "only; re-extract the cache with this stxd, or use the stxd version that wrote it")
    try:
        meta = CacheMeta.from_dict(stored)
    except ConfigError as exc:
        raise CacheCorruptError(f"cache {path}: group attribute `{ATTRS_KEY}` is invalid: {exc}; the metadata was "
                                "edited or damaged; re-extract the cache") from None
    stored_digest, digest = str(attrs.get(FINGERPRINT_KEY)), fingerprint_digest(meta).hex()
    if stored_digest != digest:
        raise CacheCorruptError(
            f"cache {path}: the metadata (group attribute `{ATTRS_KEY}`: grid, teacher, dataset, ...) does not match "
            f"the fingerprint its rows were written with (attribute `{FINGERPRINT_KEY}` is {stored_digest[:16]!r}..., "
            f"the metadata hashes to {digest[:16]!r}...): it was edited or replaced after extraction, so the rows "
            "cannot be trusted to mean what it says; re-extract the cache")
    return meta


def _attributes(meta: CacheMeta, **extra: Any) -> dict[str, Any]:
    """The group attributes of a cache with metadata `meta` (plus `extra` keys)."""
    return {ATTRS_KEY: meta.to_dict(), FINGERPRINT_KEY: fingerprint_digest(meta).hex(), **extra}


def _s_extent(array: Any) -> int:
    """Rows per stored object along S (the shard, or the chunk when unsharded)."""
    return int((array.shards or array.chunks)[0])


def _open_arrays(group: zarr.Group, meta: CacheMeta, path: str, *, lenient: bool = False) -> dict[str, Any]:
    """The cache's arrays, checked against the schema; with `lenient`, bad ones are left out instead of raising."""
    arrays: dict[str, Any] = {}
    n, r = meta.dataset.sample_count, meta.layout.rows_per_shard
    for name, spec in array_specs(meta).items():
        try:
            array = group[name]
        except KeyError:
            if lenient:
                continue
            raise CacheCorruptError(f"cache {path}: array `{name}` is missing; the store is damaged or was not "
                                    "created by stxd; delete it and re-extract") from None
        expected_shape = (n, *spec.row_shape)
        dtype_ok = array.dtype == np.dtype(spec.dtype)
        extent_ok = _s_extent(array) == rows_per_file(spec, r)
        if array.shape != expected_shape or not dtype_ok or not extent_ok:
            if lenient:
                continue
            raise CacheCorruptError(
                f"cache {path}: array `{name}` has shape {array.shape}, dtype {array.dtype} and {_s_extent(array)} "
                f"rows per stored object; expected {expected_shape}, {spec.dtype} and {rows_per_file(spec, r)} "
                "from the cache's metadata; the store is damaged; delete it and re-extract")
        arrays[name] = array
    return arrays


def _compressors(zstd_level: int) -> tuple[Any, ...]:
    # Byte shuffle: on smooth fp16 and int8 features it beat bitshuffle by 5-30% (bitshuffle splits the noisy low
    # mantissa bits across every byte). crc32c comes last when encoding, so it is checked first when decoding: a
    # flipped bit fails the checksum before blosc sees it.
    return BloscCodec(cname="zstd", clevel=zstd_level, shuffle="shuffle"), Crc32cCodec()


def _create_arrays(group: zarr.Group, meta: CacheMeta) -> None:
    n, r = meta.dataset.sample_count, meta.layout.rows_per_shard
    for name, spec in array_specs(meta).items():
        row = tuple(max(1, d) for d in spec.row_shape)  # a zero-length axis (k_max = 0) still needs a chunk extent
        along_s = rows_per_file(spec, r)
        sharded = spec.chunking == "row" and r > 1
        group.create_array(
            name, shape=(n, *spec.row_shape), dtype=spec.dtype,
            chunks=(1 if spec.chunking == "row" else along_s, *row), shards=(along_s, *row) if sharded else None,
            compressors=_compressors(meta.layout.zstd_level), fill_value=spec.fill_value,
            dimension_names=spec.dims, overwrite=True,
        )


def _object_key(array: Any, index: int) -> str:
    """Store key (relative to the store root) of the `index`-th shard or chunk along S."""
    coords = (index,) + (0,) * (array.ndim - 1)
    return f"{array.store_path.path}/{array.metadata.encode_chunk_key(coords)}"


async def _collect(iterator: Any) -> list[str]:
    return [key async for key in iterator]


def _row_names(tokens: Sequence[str], rows: Sequence[int]) -> str:
    shown = ", ".join(f"{r} ({tokens[r]})" if r < len(tokens) else str(r) for r in list(rows)[:3])
    return shown + (f" and {len(rows) - 3} more" if len(rows) > 3 else "")


@contextlib.contextmanager
def _writing(path: str, what: str) -> Iterator[None]:
    """Turn an `OSError` raised while writing `what` into the cache at `path` into a `CacheWriteError`."""
    try:
        yield
    except OSError as exc:
        if exc.errno in _DISK_FULL:
            cause, fix = "the disk is full", "free space on the disk that holds the cache"
        else:
            cause, fix = "the file system refused it", "fix that (permissions, a read-only or unmounted disk)"
        raise CacheWriteError(
            f"cache {path}: writing {what} failed: {cause} ({exc}); {fix}, then re-run the same `stxd-cache "
            "extract` command: it keeps the rows already done and writes the rest") from exc


def _remove_temp_files(path: str) -> None:
    """Delete the temporary files that writes killed before their rename left in a local store."""
    if "://" in path:
        return
    for folder, _dirs, names in os.walk(path):
        for name in names:
            if _TEMP_FILE.search(name):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(folder, name))


# ------------------------------------------------------------------------------------------------------ writing


class CacheWriter:
    """Writes work units into a cache created or resumed by `create_or_resume` (picklable: reopens by path)."""

    def __init__(self, *, path: str, group: zarr.Group, meta: CacheMeta, sample_tokens: Sequence[str]) -> None:
        self.path = path
        self.meta = meta
        self.rows_per_shard = meta.layout.rows_per_shard
        self.sample_tokens = list(sample_tokens)
        self._group = group
        # Chunks equal to the fill value (an all-zero BEV row, an empty box list) must still be written: verify
        # reports missing objects, and byte-identical resumes need every object present.
        with zarr.config.set({"array.write_empty_chunks": True}):
            self._arrays = _open_arrays(group, meta, path)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return _reopen_writer, (self.path,)

    @property
    def units(self) -> list[range]:
        """Every work unit: R-row ranges aligned to shard boundaries."""
        return work_units(self.meta.dataset.sample_count, self.rows_per_shard)

    def pending_units(self) -> list[range]:
        """Work units with any row not done, in row order."""
        done = np.asarray(self._arrays["done"][:])
        return [u for u in self.units if not done[u.start:u.stop].all()]

    def write_unit(self, rows: range, records: Sequence[TeacherRecord]) -> None:
        """Write every array's rows of one work unit, then set their `done` flags (last, so a kill leaves them
        False and the unit pending).

        rows: one of `units`; records: one `TeacherRecord` per row, in order.
        """
        self._check_writable()
        if rows not in self.units:
            raise ValueError(f"rows {rows} are not a work unit of cache {self.path}; expected one of "
                             f"pending_units() (ranges of {self.rows_per_shard} rows from a multiple of it)")
        if len(records) != len(rows):
            raise ValueError(f"write_unit({rows}) got {len(records)} records; expected {len(rows)}, one per row")
        encoded = [encode_record(rec, self.meta, self.sample_tokens[i]) for i, rec in zip(rows, records, strict=True)]
        sel = slice(rows.start, rows.stop)
        unit_index = rows.start // self.rows_per_shard
        with _writing(self.path, f"rows {_row_names(self.sample_tokens, rows)}"):
            self._arrays["done"][sel] = False
            for name in UNIT_ARRAYS:
                if name not in self._arrays:
                    continue
                array = self._arrays[name]
                # A rewrite starts from nothing: zarr merges partial shard writes with the stored shard, which
                # would fail on a damaged one; removing it first makes every rewrite independent of what was there.
                sync(array.store_path.store.delete(_object_key(array, unit_index)))
                array[sel] = np.stack([row[name] for row in encoded])
            self._arrays["done"][sel] = True

    def finalize(self) -> None:
        """Mark the cache complete once every row is done; safe to interrupt and re-run, a no-op when complete."""
        if self.meta.complete:
            return
        done = np.asarray(self._arrays["done"][:])
        if not done.all():
            missing = np.flatnonzero(~done)
            raise CacheIncompleteError(
                f"cannot finalise cache {self.path}: {len(missing)} of {len(done)} rows are not done (rows "
                f"{_row_names(self.sample_tokens, missing)}); write their units (pending_units()) first, e.g. by "
                "re-running the same `stxd-cache extract`")
        meta = dataclasses.replace(self.meta, complete=True)
        with _writing(self.path, "the `complete` flag"):
            _remove_temp_files(self.path)
            # One metadata document rewritten in one put: the flag flips atomically (LocalStore writes via rename).
            self._group.attrs.put(_attributes(meta))
        self.meta = meta

    def _check_writable(self) -> None:
        if self.meta.complete:
            raise CacheReadOnlyError(f"cache {self.path} is already complete; complete caches are never modified; "
                                     "extract into a new path to change it")


def _reopen_writer(path: str) -> CacheWriter:
    group = _open_group(path, "r+")
    meta = _read_meta(group, path)
    tokens = decode_tokens(group["sample_token"][:])
    writer = CacheWriter(path=path, group=group, meta=meta, sample_tokens=tokens)
    writer._check_writable()
    return writer


def _check_inputs(meta: CacheMeta, sample_tokens: Sequence[str], prev_index: np.ndarray) -> tuple[list[str], Any]:
    tokens = [str(t) for t in sample_tokens]
    n = meta.dataset.sample_count
    if len(tokens) != n:
        raise ValueError(f"{len(tokens)} sample tokens given; expected dataset.sample_count = {n} from the meta")
    if len(set(tokens)) != n or not all(tokens):
        raise ValueError("sample tokens must be distinct and non-empty; got duplicates or empty strings")
    encode_tokens(tokens)   # each one fits a `sample_token` row
    prev = np.asarray(prev_index)
    if prev.shape != (n, meta.k_max) or not np.issubdtype(prev.dtype, np.integer):
        raise ValueError(f"prev_index has shape {prev.shape} and dtype {prev.dtype}; expected ({n}, {meta.k_max}) "
                         "integers")
    problems = prev_index_problems(prev)
    if problems:
        row, what = problems[0]
        raise ValueError(f"prev_index row {row} ({tokens[row]}): {what} ({len(problems)} rows affected)")
    return tokens, prev.astype(np.int32)


def create_or_resume(path: str | os.PathLike[str], meta: CacheMeta, sample_tokens: Sequence[str],
                     prev_index: np.ndarray, *, rows_per_shard: int | None = None,
                     zstd_level: int | None = None, lock: WriterLock | None = None) -> CacheWriter:
    """A writer for the cache at `path`: created if absent (or an empty folder), resumed if its fingerprint, sample
    tokens and prev_index match.

    Args:
        meta: what the cache holds; `created` is set to now when empty, `complete` and `layout` are ignored.
        sample_tokens: (S,) devkit sample tokens, in scene order.
        prev_index: (S, k_max) row of the k-th previous keyframe in the same scene, -1 if none.
        rows_per_shard, zstd_level: layout of a new cache (default 8 and 3). A resumed cache keeps its own layout;
            a value given here that differs from it is an error.
        lock: the `WriterLock` this process holds on `path`; its holder is recorded in the store, so that a second
            writer's error names it. Processes that write units under another process's lock (dask workers) pass
            None.
    """
    path = os.fspath(path)
    tokens, prev = _check_inputs(meta, sample_tokens, prev_index)
    group = _existing_group(path)
    if group is not None and (ATTRS_KEY in group.attrs or _CREATING_KEY not in group.attrs):
        writer = _resume(path, group, meta, tokens, prev, rows_per_shard, zstd_level)
        if lock is not None:
            with _writing(path, "the writer's name"):
                group.attrs.update({_WRITER_KEY: lock.holder})
        return writer
    layout = CacheLayout(rows_per_shard=rows_per_shard or DEFAULT_LAYOUT.rows_per_shard,
                         zstd_level=zstd_level or DEFAULT_LAYOUT.zstd_level)
    created = meta.created or datetime.now(UTC).isoformat(timespec="seconds")
    meta = dataclasses.replace(meta, layout=layout, created=created, complete=False)
    holder = {_WRITER_KEY: lock.holder} if lock is not None else {}
    with _writing(path, "the new store"):
        # Mode "a", never "w": "w" clears whatever the path holds. Only an empty folder or a creation of our own that
        # was interrupted (marked `stxd_creating`) gets here, and its arrays are replaced one by one.
        # The creating marker is in the group's first metadata document, so a kill at any point leaves a store that
        # reads as an interrupted creation (which this branch redoes), never as a foreign group.
        group = zarr.open_group(path, mode="a", zarr_format=3, attributes={_CREATING_KEY: True, **holder})
        group.attrs.put({_CREATING_KEY: True, **holder})
        for stale in set(group.array_keys()) - set(array_specs(meta)):
            del group[stale]
        _create_arrays(group, meta)
        group["sample_token"][:] = encode_tokens(tokens)
        group["prev_index"][:] = prev
        group.attrs.put(_attributes(meta, **holder))
    return CacheWriter(path=path, group=group, meta=meta, sample_tokens=tokens)


class WriterLock:
    """One writer per store: an exclusive `flock` on the store's folder, held while a process extracts into it.

    The folder is created when absent (its parent must exist). The system releases the lock when the holder exits,
    however it dies, so a killed extraction never blocks the next one, which resumes. A second writer fails at
    once with `CacheLockedError`, naming the holder's pid and host. Remote stores (`scheme://`) are not locked;
    nor are folders on file systems without `flock` (some network mounts), which are reported as such.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.holder = {"pid": os.getpid(), "host": socket.gethostname(),
                       "since": datetime.now(UTC).isoformat(timespec="seconds")}
        self._fd: int | None = None

    def __enter__(self) -> WriterLock:
        if "://" in self.path:
            return self
        with contextlib.suppress(FileExistsError):
            os.mkdir(self.path)
        if not os.path.isdir(self.path):
            raise NotACacheError(f"{self.path} is a file, not a teacher cache (a Zarr v3 directory); choose another "
                                 "path")
        fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CacheLockedError(
                f"cache {self.path} is being written by another extraction ({self._other_holder()}); one writer per "
                "store: wait for it to finish, or stop it and re-run this command, which resumes where it stopped "
                "(a writer that died holds no lock)") from None
        except OSError as exc:
            os.close(fd)
            raise CacheWriteError(f"cache {self.path}: the file system refused a lock on the folder ({exc}); extract "
                                  "onto a local disk, then copy the complete cache") from None
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)   # closing the descriptor releases the flock
            self._fd = None

    def _other_holder(self) -> str:
        for _ in range(20):   # the holder may be between taking the lock and recording its name
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                with open(os.path.join(self.path, "zarr.json")) as f:
                    who = json.load(f)["attributes"][_WRITER_KEY]
                return f"pid {who['pid']} on host {who['host']}, since {who['since']}"
            time.sleep(0.05)
        return "a process that has not recorded its name yet"


def _existing_group(path: str) -> zarr.Group | None:
    """The group at `path` opened for writing, or None where nothing is there yet (no path, an empty folder)."""
    if "://" in path:
        try:
            return zarr.open_group(path, mode="r+", zarr_format=3)
        except FileNotFoundError:
            return None
    if not os.path.exists(path) or (os.path.isdir(path) and not os.listdir(path)):
        return None   # nothing there yet, or the empty folder that `WriterLock` made
    return _open_group(path, "r+")


def _resume(path: str, group: zarr.Group, meta: CacheMeta, tokens: list[str], prev: np.ndarray,
            rows_per_shard: int | None, zstd_level: int | None) -> CacheWriter:
    stored = _read_meta(group, path)
    differences = fingerprint_differences(stored.fingerprint, meta.fingerprint)
    if differences:
        raise FingerprintMismatchError(
            f"cache {path} was made for something else, and caches are never mixed: " + "; ".join(differences)
            + ". Extract into a new path, or delete this cache to replace it", differences)
    if stored.complete:
        raise CacheReadOnlyError(f"cache {path} is already complete (created {stored.created}); nothing to extract; "
                                 "complete caches are never modified: use a new path to extract again")
    for name, wanted in (("rows_per_shard", rows_per_shard), ("zstd_level", zstd_level)):
        have = getattr(stored.layout, name)
        if wanted is not None and wanted != have:
            raise LayoutMismatchError(f"cache {path} was created with {name} = {have}; resuming asked for {wanted}; "
                                      f"resume with {name} = {have} (or leave it unset), or extract into a new path")
    writer = CacheWriter(path=path, group=group, meta=stored, sample_tokens=tokens)
    stored_tokens = decode_tokens(writer._arrays["sample_token"][:])
    if stored_tokens != tokens:
        row = next(i for i, (a, b) in enumerate(zip(stored_tokens, tokens, strict=True)) if a != b)
        raise FingerprintMismatchError(
            f"cache {path}: `sample_token` row {row} is {stored_tokens[row]!r} in the store but {tokens[row]!r} was "
            "requested (same dataset fields, different samples or order); extract into a new path", ["sample_token"])
    if not np.array_equal(np.asarray(writer._arrays["prev_index"][:]), prev):
        raise FingerprintMismatchError(f"cache {path}: `prev_index` differs from the requested one (same samples, "
                                       "different past-frame links, e.g. another k_prev); extract into a new path",
                                       ["prev_index"])
    return writer


# ------------------------------------------------------------------------------------------------------ reading

_RECORD_ARRAYS = ("bev", "tokens", "boxes", "box_scores", "box_labels", "box_probs", "box_count")
"""Per-sample arrays a `CacheRecord` is made of (the past frames add rows of `tokens`); `digest` checks them."""


class CacheReader:
    """Read-only access to a cache, one sample at a time (opened with `open_cache`)."""

    def __init__(self, *, path: str, group: zarr.Group, meta: CacheMeta) -> None:
        self.path = path
        self.meta = meta
        self._arrays = _open_arrays(group, meta, path)
        self.tokens: list[str] = decode_tokens(self._rows("sample_token", None))
        self._index = {t: i for i, t in enumerate(self.tokens)}
        self._prev = np.asarray(self._rows("prev_index", None))
        self._bound = fingerprint_digest(meta)
        self._digest_column = {name: j for j, name in enumerate(digested_arrays(meta))}
        # A damaged `done` chunk costs only its own rows: they read as not done and `read` names them.
        self._done, self._done_readable = _read_checked(self._arrays["done"], range(len(self.tokens)))

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def done_count(self) -> int:
        """Rows whose `done` flag is set."""
        return int(self._done.sum())

    def index_of(self, token: str) -> int:
        """Row of a sample token."""
        try:
            return self._index[token]
        except KeyError:
            raise SampleNotFoundError(
                f"sample {token} is not in cache {self.path} ({len(self)} samples of {self.meta.dataset.version} "
                f"{', '.join(self.meta.dataset.splits)}); extract a cache that covers this split") from None

    def require_complete(self) -> None:
        """Raise `CacheIncompleteError` unless every row is done and the cache was finalised."""
        if not self.meta.complete:
            missing = int((~self._done).sum())
            state = f"{missing} of {len(self)} rows not done" if missing else "every row done, finalize not run"
            raise CacheIncompleteError(f"cache {self.path} is not complete ({state}); re-run the same "
                                       "`stxd-cache extract` to finish it")

    def require_stored(self, rows: Sequence[int]) -> None:
        """Every stored object (shard, or chunk when unsharded) holding `rows`, or the past frames they link, exists.

        Zarr reads an absent object back as fill values, so a deleted shard would otherwise hand a reader blank
        records without a word. This lists each array's keys once and decodes nothing (cheap next to
        `stxd-cache verify`, which decodes every chunk). Raises `CacheCorruptError` naming the samples.
        """
        needed = sorted({int(r) for r in rows} | {int(p) for r in rows for p in self._prev[int(r)] if p >= 0})
        gaps, specs = [], array_specs(self.meta)
        for name, array in self._arrays.items():
            if specs[name].chunking == "index":   # read whole when the cache is opened
                continue
            extent = int((array.shards or array.chunks)[0])
            stored = set(sync(_collect(array.store_path.store.list_prefix(f"{array.store_path.path}/"))))
            for j in sorted({r // extent for r in needed}):
                if _object_key(array, j) not in stored:
                    held = [r for r in needed if r // extent == j]
                    gaps.append(f"`{name}` object {_object_key(array, j)} (rows {_row_names(self.tokens, held)})")
        if gaps:
            raise CacheCorruptError(
                f"cache {self.path} lacks {len(gaps)} stored object(s) of the samples to read: "
                + "; ".join(gaps[:3]) + (f"; and {len(gaps) - 3} more" if len(gaps) > 3 else "")
                + ". Zarr would read them as zeros, so a student would learn from blank teacher records; the store is "
                f"damaged: run `stxd-cache verify {self.path}` to list every damaged sample, then re-extract the cache")

    def read(self, i: int) -> CacheRecord:
        """Row `i` with its past frames' tokens, as float32 numpy."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} out of range for cache {self.path} with {len(self)} samples")
        i %= len(self)
        past = self._prev[i]
        valid = past >= 0
        needed = [i, *past[valid].tolist()]
        damaged = [r for r in needed if not self._done_readable[r]]
        if damaged:
            raise CacheCorruptError(f"cache {self.path}: the `done` flags of rows {_row_names(self.tokens, damaged)} "
                                    "cannot be decoded (corrupt chunk); run `stxd-cache verify`, then re-extract")
        not_done = [r for r in needed if not self._done[r]]
        if not_done and self.meta.complete:
            raise CacheCorruptError(f"cache {self.path} is marked complete, but the `done` flags of rows "
                                    f"{_row_names(self.tokens, not_done)} are false (their `done` chunk was deleted "
                                    "or overwritten); run `stxd-cache verify`, then re-extract the cache")
        if not_done:
            raise CacheIncompleteError(f"cache {self.path}: rows {_row_names(self.tokens, not_done)} needed for "
                                       f"sample {self.tokens[i]} are not written yet; finish the extraction first")
        int8 = self.meta.precision == "int8"
        past_rows = past[valid].tolist()
        own = [(name, i) for name in _RECORD_ARRAYS + (("bev_scale", "bev_offset") if int8 else ())]
        requests = own + [("tokens", r) for r in past_rows]
        values = self._read_rows(requests + [("digest", r) for r in needed])
        self._check_digests(requests, values, dict(zip(needed, values[len(requests):], strict=True)))
        row = dict(zip((name for name, _ in own), values, strict=False))
        past_tokens = np.zeros((len(past), self.meta.num_tokens, self.meta.channels), np.float32)
        if past_rows:
            past_tokens[valid] = np.stack(values[len(own):len(requests)])
        return CacheRecord(
            index=i, token=self.tokens[i],
            bev=decode_bev(row["bev"], row.get("bev_scale"), row.get("bev_offset")),
            tokens=row["tokens"].astype(np.float32), past_tokens=past_tokens, past_valid=valid,
            boxes=row["boxes"], scores=row["box_scores"], labels=row["box_labels"].astype(np.int64),
            probs=row["box_probs"].astype(np.float32), count=int(row["box_count"]))

    def _check_digests(self, requests: list[tuple[str, int]], values: list[np.ndarray],
                       digests: dict[int, np.ndarray]) -> None:
        """Every (array, row) value read matches the row's digest, or `CacheCorruptError` names the sample."""
        for (name, r), value in zip(requests, values, strict=False):
            expected = digests[r][self._digest_column[name]]
            if not np.array_equal(row_digest(self._bound, self.tokens[r], name, value), expected):
                raise CacheCorruptError(
                    f"cache {self.path}: array `{name}` row {_row_names(self.tokens, [r])} does not match the row's "
                    "digest: it holds another sample's values, values from another teacher's cache, or values edited "
                    f"after extraction (the checksums pass, the content is wrong); run `stxd-cache verify {self.path}` "
                    "to list every damaged sample, then re-extract the cache")

    def require_consistent(self) -> None:
        """The checks that need no feature chunk, run when a cache is opened for training: distinct sample tokens,
        `prev_index` links that are -1 or earlier rows (nearest first, chains that agree), and every `box_count` in
        [0, M]. Raises `CacheCorruptError` naming the rows; `stxd-cache verify` runs these and decodes every chunk.
        """
        problems: list[str] = []
        first_row: dict[str, int] = {}
        duplicates = [(first_row[t], r) for r, t in enumerate(self.tokens) if first_row.setdefault(t, r) != r]
        if duplicates:
            first, again = duplicates[0]
            problems.append(f"`sample_token` {self.tokens[again]!r} is held by rows {first} and {again} "
                            f"({len(duplicates)} duplicate(s))")
        problems += [f"`prev_index` row {_row_names(self.tokens, [row])}: {what}"
                     for row, what in prev_index_problems(self._prev)[:3]]
        counts = self._rows("box_count", None)
        bad = np.flatnonzero((counts < 0) | (counts > self.meta.box_capacity))
        if len(bad):
            problems.append(f"`box_count` of rows {_row_names(self.tokens, bad)} is {counts[bad[0]]}; expected "
                            f"0..{self.meta.box_capacity} (the cache's box capacity M)")
        if problems:
            raise CacheCorruptError(f"cache {self.path} is inconsistent: " + "; ".join(problems) + ". The store was "
                                    f"damaged or edited; run `stxd-cache verify {self.path}`, then re-extract it")

    def box_counts(self) -> np.ndarray:
        """(S,) int: the teacher boxes stored in each row (`box_count`)."""
        return self._rows("box_count", None).astype(np.int64)

    def require_links(self, previous: dict[str, Sequence[str]]) -> None:
        """Each sample's past-frame links are the dataset's: `previous` maps a sample token to the tokens of its
        previous keyframes in its scene, nearest first (at least `k_max` of them where the scene has them).
        Catches links to another scene, to the future, or rows whose tokens were swapped. Raises
        `CacheCorruptError` naming the first samples that differ."""
        wrong = []
        for token, past in previous.items():
            row = self.index_of(token)
            expected = [self._index.get(t, -2) for t in list(past)[:self.meta.k_max]]
            expected += [-1] * (self.meta.k_max - len(expected))
            if self._prev[row].tolist() != expected:
                wrong.append(f"row {row} ({token}) links rows {self._prev[row].tolist()}, the dataset's previous "
                             f"keyframes are rows {expected}")
        if wrong:
            raise CacheCorruptError(
                f"cache {self.path}: {len(wrong)} sample(s) have past-frame links (`prev_index`) that disagree with "
                f"the dataset (-2: a keyframe the cache lacks): {'; '.join(wrong[:3])}. TD would read the wrong "
                f"past tokens; run `stxd-cache verify {self.path} --dataroot DATAROOT`, then re-extract the cache")

    def _read_rows(self, requests: list[tuple[str, int]]) -> list[np.ndarray]:
        """One row of each (array, row) request, fetched and decoded concurrently (1.9x faster than one array at
        a time on the demo cache); on any failure the requests are re-read one by one, so that a corrupt chunk
        raises the `CacheCorruptError` that names its sample."""
        async def fetch() -> list[Any]:
            return await asyncio.gather(*(self._arrays[name]._async_array.getitem(slice(r, r + 1))
                                          for name, r in requests))

        try:
            return [np.asarray(v)[0] for v in sync(fetch())]
        except Exception:
            return [self._rows(name, [r])[0] for name, r in requests]

    def _rows(self, name: str, rows: list[int] | None) -> np.ndarray:
        """Rows of one array (all rows when `rows` is None); decode failures become `CacheCorruptError`."""
        array = self._arrays[name]
        try:
            if rows is None:
                return np.asarray(array[:])
            if len(rows) == 1:
                return np.asarray(array[rows[0]:rows[0] + 1])
            return np.asarray(array.get_orthogonal_selection((np.asarray(rows),)))
        except Exception as exc:  # zarr raises ValueError (checksum), RuntimeError (blosc), ... per codec
            candidates = range(array.shape[0]) if rows is None else rows
            bad = [r for r in candidates if _fails(array, r)] or list(candidates)
            tokens = getattr(self, "tokens", [])
            raise CacheCorruptError(
                f"cache {self.path}: array `{name}` row {_row_names(tokens, bad)} cannot be decoded "
                f"({type(exc).__name__}: {exc}); the stored chunk is corrupt; run `stxd-cache verify` to list every "
                "damaged sample, then re-extract the cache") from exc


def _fails(array: Any, row: int) -> bool:
    try:
        array[row:row + 1]
    except Exception:
        return True
    return False


def is_complete(path: str | os.PathLike[str]) -> bool:
    """Whether `path` holds a finalised cache: False for nothing there, an unfinished cache or a foreign store.
    Reads the metadata only."""
    path = os.fspath(path)
    try:
        return _read_meta(_open_group(path, "r"), path).complete
    except CacheError:
        return False


def open_cache(path: str | os.PathLike[str]) -> CacheReader:
    """A read-only reader (the store is opened with mode "r"); see `CacheReader.require_complete`."""
    path = os.fspath(path)
    group = _open_group(path, "r")
    return CacheReader(path=path, group=group, meta=_read_meta(group, path))


def _read_checked(array: Any, rows: range) -> tuple[np.ndarray, np.ndarray]:
    """(values, readable) of a row range; rows whose chunk fails to decode read as the fill value."""
    try:
        return np.asarray(array[rows.start:rows.stop]), np.ones(len(rows), bool)
    except Exception:
        ok = np.ones(len(rows), bool)
        out = np.full((len(rows), *array.shape[1:]), array.fill_value, dtype=array.dtype)
        for k, row in enumerate(rows):
            try:
                out[k] = np.asarray(array[row:row + 1])[0]
            except Exception:
                ok[k] = False
        return out, ok
