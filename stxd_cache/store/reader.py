"""Reading the teacher cache: `open_cache` gives a `CacheReader`, which reads one sample's record at a time and
checks each value against its row digest, and runs the cheap start-up checks of a training run."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import zarr

from stxd_cache.errors import CacheCorruptError, CacheIncompleteError, SampleNotFoundError
from stxd_cache.schema import (
    CacheMeta,
    CacheRecord,
    array_specs,
    decode_bev,
    decode_tokens,
    digested_arrays,
    fingerprint_digest,
    prev_index_problems,
    row_digest,
)
from stxd_cache.store.zarr_io import (
    fails_to_decode,
    list_objects,
    object_key,
    open_arrays,
    open_group,
    read_checked,
    read_meta,
    read_rows_concurrently,
    row_names,
)

RECORD_ARRAYS = ("bev", "tokens", "boxes", "box_scores", "box_labels", "box_probs", "box_count")
"""Per-sample arrays a `CacheRecord` is made of (the past frames add rows of `tokens`); `digest` checks them."""


class CacheReader:
    """Read-only access to a cache, one sample at a time (opened with `open_cache`)."""

    def __init__(self, *, path: str, group: zarr.Group, meta: CacheMeta) -> None:
        self.path = path
        self.meta = meta
        self._arrays = open_arrays(group, meta, path)
        self.tokens: list[str] = decode_tokens(self._rows("sample_token", None))
        self._index = {t: i for i, t in enumerate(self.tokens)}
        self._prev = np.asarray(self._rows("prev_index", None))
        self._bound = fingerprint_digest(meta)
        self._digest_column = {name: j for j, name in enumerate(digested_arrays(meta))}
        # A damaged `done` chunk costs only its own rows: they read as not done and `read` names them.
        self._done, self._done_readable = read_checked(self._arrays["done"], range(len(self.tokens)))

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def done_count(self) -> int:
        """Rows whose `done` flag is set."""
        return int(self._done.sum())

    @property
    def done(self) -> np.ndarray:
        """(S,) bool: each row's `done` flag (False where its chunk cannot be decoded)."""
        return self._done.copy()

    @property
    def arrays(self) -> dict[str, Any]:
        """The cache's zarr arrays by name, opened read-only and checked against the schema."""
        return dict(self._arrays)

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
            stored = list_objects(array)
            for j in sorted({r // extent for r in needed}):
                if object_key(array, j) not in stored:
                    held = [r for r in needed if r // extent == j]
                    gaps.append(f"`{name}` object {object_key(array, j)} (rows {row_names(self.tokens, held)})")
        if gaps:
            raise CacheCorruptError(
                f"cache {self.path} lacks {len(gaps)} stored object(s) of the samples to read: "
                + "; ".join(gaps[:3]) + (f"; and {len(gaps) - 3} more" if len(gaps) > 3 else "")
                + ". Zarr would read them as zeros, so a student would learn from blank teacher records; the store is "
                f"damaged: run `stxd-cache verify {self.path}` to list every damaged sample, then re-extract the cache")

    def read(self, i: int, *, k: int | None = None) -> CacheRecord:
        """Row `i` with the tokens of its `k` nearest past frames (default: all `k_max` the cache links), as float32
        numpy; only those frames are read."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} out of range for cache {self.path} with {len(self)} samples")
        if k is not None and not 0 <= k <= self.meta.k_max:
            raise ValueError(f"read(k={k}): cache {self.path} links {self.meta.k_max} past frames per row (k_max); "
                             f"expected 0 <= k <= {self.meta.k_max}")
        i %= len(self)
        past = self._prev[i][:k]
        valid = past >= 0
        needed = [i, *past[valid].tolist()]
        damaged = [r for r in needed if not self._done_readable[r]]
        if damaged:
            raise CacheCorruptError(f"cache {self.path}: the `done` flags of rows {row_names(self.tokens, damaged)} "
                                    "cannot be decoded (corrupt chunk); run `stxd-cache verify`, then re-extract")
        not_done = [r for r in needed if not self._done[r]]
        if not_done and self.meta.complete:
            raise CacheCorruptError(f"cache {self.path} is marked complete, but the `done` flags of rows "
                                    f"{row_names(self.tokens, not_done)} are false (their `done` chunk was deleted "
                                    "or overwritten); run `stxd-cache verify`, then re-extract the cache")
        if not_done:
            raise CacheIncompleteError(f"cache {self.path}: rows {row_names(self.tokens, not_done)} needed for "
                                       f"sample {self.tokens[i]} are not written yet; finish the extraction first")
        int8 = self.meta.precision == "int8"
        past_rows = past[valid].tolist()
        own = [(name, i) for name in RECORD_ARRAYS + (("bev_scale", "bev_offset") if int8 else ())]
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
                    f"cache {self.path}: array `{name}` row {row_names(self.tokens, [r])} does not match the row's "
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
        problems += [f"`prev_index` row {row_names(self.tokens, [row])}: {what}"
                     for row, what in prev_index_problems(self._prev)[:3]]
        counts = self._rows("box_count", None)
        bad = np.flatnonzero((counts < 0) | (counts > self.meta.box_capacity))
        if len(bad):
            problems.append(f"`box_count` of rows {row_names(self.tokens, bad)} is {counts[bad[0]]}; expected "
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
        try:
            return read_rows_concurrently([(self._arrays[name], r) for name, r in requests])
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
            bad = [r for r in candidates if fails_to_decode(array, r)] or list(candidates)
            tokens = getattr(self, "tokens", [])
            raise CacheCorruptError(
                f"cache {self.path}: array `{name}` row {row_names(tokens, bad)} cannot be decoded "
                f"({type(exc).__name__}: {exc}); the stored chunk is corrupt; run `stxd-cache verify` to list every "
                "damaged sample, then re-extract the cache") from exc


def open_cache(path: str | os.PathLike[str]) -> CacheReader:
    """A read-only reader (the store is opened with mode "r"); see `CacheReader.require_complete`."""
    path = os.fspath(path)
    group = open_group(path, "r")
    return CacheReader(path=path, group=group, meta=read_meta(group, path))
