"""The teacher cache on disk (Zarr v3, one group): create or resume, write work units, finalise, read.

Lifecycle: `create_or_resume` makes the store (or reopens one with the same fingerprint), `CacheWriter.write_unit`
writes R rows at a time and sets their `done` flags last, `finalize` sets `complete` once every row is done.
`open_cache` reads; `stxd_cache.verify` decodes every chunk and checks the invariants, and summarises.
The contract (arrays, attributes, row encoding, invariants) lives in `stxd_cache.schema`; the zarr helpers in
`zarr_io`, the writer in `writer`, the reader in `reader`.
"""

from stxd_cache.schema import CacheLayout, CacheMeta, CacheRecord, DatasetInfo, TeacherInfo, TeacherRecord
from stxd_cache.store.reader import CacheReader, open_cache
from stxd_cache.store.writer import CacheWriter, WriterLock, create_or_resume
from stxd_cache.store.zarr_io import is_complete

__all__ = [
    "CacheLayout", "CacheMeta", "CacheReader", "CacheRecord", "CacheWriter", "DatasetInfo", "TeacherInfo",
    "TeacherRecord", "WriterLock", "create_or_resume", "is_complete", "open_cache",
]
