"""Errors of the teacher cache. Every message names the store path, the array or field, the sample token where
there is one, what was found, what was expected and what to do next."""

from __future__ import annotations

from pipelines.errors import StxdError


class CacheError(StxdError):
    """Base class of every teacher-cache error."""


class NotACacheError(CacheError):
    """A path that does not exist, or exists but is not an stxd teacher cache."""


class CacheIncompleteError(CacheError):
    """A cache whose rows are not all written, or that was never finalised."""


class FingerprintMismatchError(CacheError):
    """An existing cache that was made with a different teacher, grid, dataset or precision than requested."""

    def __init__(self, message: str, differences: list[str] | None = None) -> None:
        super().__init__(message)
        self.differences: list[str] = list(differences or [])
        """One line per differing field: `field: store has X, requested Y`."""


class LayoutMismatchError(CacheError):
    """Resuming a cache with a chunk layout (rows per shard, zstd level) other than the one it was created with."""


class CacheCorruptError(CacheError):
    """A chunk that fails its checksum or cannot be decoded, or arrays that do not match the cache's metadata."""


class CacheWriteError(CacheError):
    """A write into the cache that the file system refused (disk full, quota, permissions, read-only disk).

    Rows already done stay done, so re-running the same extraction once the cause is fixed resumes."""


class CacheLockedError(CacheError):
    """A cache that another process is writing: one writer per store."""


class CacheReadOnlyError(CacheError):
    """A write into a cache that is complete (finalised); complete caches are never modified."""


class RecordError(CacheError):
    """A teacher record that does not fit the cache schema (shape, dtype, non-finite values, labels)."""


class SampleNotFoundError(CacheError, KeyError):
    """A sample token that the cache does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
