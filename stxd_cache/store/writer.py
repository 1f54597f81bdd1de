"""Writing the teacher cache: `create_or_resume` makes the store (or reopens one with the same fingerprint),
`CacheWriter.write_unit` writes R rows at a time and sets their `done` flags last, `finalize` sets `complete` once
every row is done. `WriterLock` keeps one writer per store."""

from __future__ import annotations

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

from stxd_cache.errors import (
    CacheIncompleteError,
    CacheLockedError,
    CacheReadOnlyError,
    CacheWriteError,
    FingerprintMismatchError,
    LayoutMismatchError,
    NotACacheError,
)
from stxd_cache.schema import (
    ATTRS_KEY,
    UNIT_ARRAYS,
    CacheLayout,
    CacheMeta,
    TeacherRecord,
    array_specs,
    decode_tokens,
    encode_record,
    encode_tokens,
    fingerprint_differences,
    prev_index_problems,
    work_units,
)
from stxd_cache.store.zarr_io import (
    CREATING_KEY,
    WRITER_KEY,
    array_at,
    create_arrays,
    delete_object,
    group_attributes,
    open_arrays,
    open_group,
    read_meta,
    row_names,
)

DEFAULT_LAYOUT = CacheLayout()
# zarr's LocalStore writes each object to `<name>.<32 hex digits>.partial`, then renames it into place: a process
# killed in between leaves that temporary file behind, and `finalize` removes it.
_TEMP_FILE = re.compile(r"\.[0-9a-f]{32}\.partial$")
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


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
            self._arrays = open_arrays(group, meta, path)

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
        with _writing(self.path, f"rows {row_names(self.sample_tokens, rows)}"):
            self._arrays["done"][sel] = False
            for name in UNIT_ARRAYS:
                if name not in self._arrays:
                    continue
                array = self._arrays[name]
                # A rewrite starts from nothing: zarr merges partial shard writes with the stored shard, which
                # would fail on a damaged one; removing it first makes every rewrite independent of what was there.
                delete_object(array, unit_index)
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
                f"{row_names(self.sample_tokens, missing)}); write their units (pending_units()) first, e.g. by "
                "re-running the same `stxd-cache extract`")
        meta = dataclasses.replace(self.meta, complete=True)
        with _writing(self.path, "the `complete` flag"):
            _remove_temp_files(self.path)
            # One metadata document rewritten in one put: the flag flips atomically (LocalStore writes via rename).
            self._group.attrs.put(group_attributes(meta))
        self.meta = meta

    def _check_writable(self) -> None:
        if self.meta.complete:
            raise CacheReadOnlyError(f"cache {self.path} is already complete; complete caches are never modified; "
                                     "extract into a new path to change it")


def _reopen_writer(path: str) -> CacheWriter:
    group = open_group(path, "r+")
    meta = read_meta(group, path)
    tokens = decode_tokens(np.asarray(array_at(group, "sample_token")[:]))
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
    if group is not None and (ATTRS_KEY in group.attrs or CREATING_KEY not in group.attrs):
        writer = _resume(path, group, meta, tokens, prev, rows_per_shard, zstd_level)
        if lock is not None:
            with _writing(path, "the writer's name"):
                group.attrs.update({WRITER_KEY: lock.holder})
        return writer
    layout = CacheLayout(rows_per_shard=rows_per_shard or DEFAULT_LAYOUT.rows_per_shard,
                         zstd_level=zstd_level or DEFAULT_LAYOUT.zstd_level)
    created = meta.created or datetime.now(UTC).isoformat(timespec="seconds")
    meta = dataclasses.replace(meta, layout=layout, created=created, complete=False)
    holder: dict[str, Any] = {WRITER_KEY: lock.holder} if lock is not None else {}
    with _writing(path, "the new store"):
        # Mode "a", never "w": "w" clears whatever the path holds. Only an empty folder or a creation of our own that
        # was interrupted (marked `stxd_creating`) gets here, and its arrays are replaced one by one.
        # The creating marker is in the group's first metadata document, so a kill at any point leaves a store that
        # reads as an interrupted creation (which this branch redoes), never as a foreign group.
        group = zarr.open_group(path, mode="a", zarr_format=3, attributes={CREATING_KEY: True, **holder})
        group.attrs.put({CREATING_KEY: True, **holder})
        for stale in set(group.array_keys()) - set(array_specs(meta)):
            del group[stale]
        create_arrays(group, meta)
        array_at(group, "sample_token")[:] = encode_tokens(tokens)
        array_at(group, "prev_index")[:] = prev
        group.attrs.put(group_attributes(meta, **holder))
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
        self.holder: dict[str, Any] = {"pid": os.getpid(), "host": socket.gethostname(),
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
                    who = json.load(f)["attributes"][WRITER_KEY]
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
    return open_group(path, "r+")


def _resume(path: str, group: zarr.Group, meta: CacheMeta, tokens: list[str], prev: np.ndarray,
            rows_per_shard: int | None, zstd_level: int | None) -> CacheWriter:
    stored = read_meta(group, path)
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
