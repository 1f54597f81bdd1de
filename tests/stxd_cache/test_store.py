"""The teacher cache on real Zarr stores in tmp_path: round trips, resume, fingerprints, corruption, alignment."""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import zarr
from scipy.ndimage import gaussian_filter

from pipelines.grid import BEVGrid
from stxd_cache.errors import (
    CacheCorruptError,
    CacheIncompleteError,
    CacheReadOnlyError,
    FingerprintMismatchError,
    LayoutMismatchError,
    NotACacheError,
    RecordError,
    SampleNotFoundError,
)
from stxd_cache.schema import pool_tokens
from stxd_cache.store import CacheMeta, TeacherRecord, create_or_resume, open_cache
from stxd_cache.verify import cache_info, verify
from tiny import flip_byte_of_row

C, HW, M, K = 4, 8, 5, 2
SCENES = ["scene-a"] * 4 + ["scene-b"] * 6  # S = 10
TOKENS = [hashlib.md5(f"sample-{i}".encode()).hexdigest() for i in range(len(SCENES))]
CREATED = "2025-01-01T00:00:00+00:00"


def make_meta(**overrides) -> CacheMeta:
    fields = dict(
        grid=BEVGrid.square(4.0, HW), token_grid=2, channels=C, box_capacity=M,
        teacher={"name": "tiny", "config": {"channels": C, "layers": [2, 2]},
                 "sha256": hashlib.sha256(b"teacher").hexdigest()},
        dataset={"version": "v1.0-synth", "splits": ["synth_val"], "sample_count": len(TOKENS)},
        precision="fp16", k_max=K, created=CREATED,
    )
    fields.update(overrides)
    return CacheMeta(**fields)


def prev_rows(scenes: list[str], k_max: int) -> np.ndarray:
    prev = np.full((len(scenes), k_max), -1, np.int32)
    for i in range(len(scenes)):
        earlier = [j for j in range(i) if scenes[j] == scenes[i]][::-1][:k_max]
        prev[i, : len(earlier)] = earlier
    return prev


def smooth_features(rng: np.random.Generator, c: int, hw: int) -> np.ndarray:
    """Low-pass filtered noise with per-channel offsets and gains, like teacher BEV features."""
    noise = gaussian_filter(rng.standard_normal((c, hw, hw)), sigma=(0, hw / 8, hw / 8), mode="wrap")
    noise /= noise.std(axis=(1, 2), keepdims=True)
    return (noise * rng.uniform(0.5, 3.0, (c, 1, 1)) + rng.uniform(-1, 1, (c, 1, 1))).astype(np.float32)


def make_records(seed: int = 0, n: int = len(TOKENS)) -> list[TeacherRecord]:
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        boxes_n = [0, 3, 8][i % 3]  # none, fewer than M, more than M
        records.append(TeacherRecord(
            bev=smooth_features(rng, C, HW), boxes=rng.normal(size=(boxes_n, 9)).astype(np.float32),
            scores=rng.uniform(size=boxes_n).astype(np.float32), labels=rng.integers(0, 10, boxes_n),
            probs=rng.uniform(size=(boxes_n, 10)).astype(np.float32)))
    return records


def write(path: Path, records: list[TeacherRecord], *, meta: CacheMeta | None = None, rows_per_shard: int = 4,
          units: list[int] | None = None, finalize: bool = True):
    writer = create_or_resume(path, meta or make_meta(), TOKENS, prev_rows(SCENES, K), rows_per_shard=rows_per_shard)
    all_units = writer.units
    for u in range(len(all_units)) if units is None else units:
        rows = all_units[u]
        writer.write_unit(rows, [records[i] for i in rows])
    if finalize:
        writer.finalize()
    return writer


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_round_trip_fp16_boxes_and_past_tokens(tmp_path: Path) -> None:
    records = make_records()
    write(tmp_path / "c.zarr", records)
    reader = open_cache(tmp_path / "c.zarr")
    reader.require_complete()
    assert len(reader) == 10 and reader.tokens == TOKENS and reader.index_of(TOKENS[7]) == 7
    prev = prev_rows(SCENES, K)
    for i, rec in enumerate(records):
        out = reader.read(i)
        assert out.token == TOKENS[i] and out.bev.dtype == np.float32
        np.testing.assert_allclose(out.bev, rec.bev, rtol=2**-11, atol=1e-7)
        np.testing.assert_allclose(out.tokens, pool_tokens(rec.bev, 2), rtol=2**-10, atol=1e-6)
        # token t = row * P + col: the top-left token is the mean of the top-left 4x4 cells
        np.testing.assert_allclose(out.tokens[0], rec.bev[:, :4, :4].mean(axis=(1, 2)), rtol=2**-10, atol=1e-6)
        order = np.argsort(-rec.scores, kind="stable")[:M]
        n = len(order)
        assert out.count == n == min(len(rec.scores), M)
        np.testing.assert_array_equal(out.boxes[:n], rec.boxes[order])
        np.testing.assert_array_equal(out.scores[:n], rec.scores[order])
        assert np.all(np.diff(out.scores[:n]) <= 0)
        np.testing.assert_array_equal(out.labels[:n], rec.labels[order])
        np.testing.assert_allclose(out.probs[:n], rec.probs[order], rtol=2**-10)
        assert not out.boxes[n:].any() and not out.scores[n:].any() and np.all(out.labels[n:] == -1)
        np.testing.assert_array_equal(out.past_valid, prev[i] >= 0)
        for k in range(K):
            expected = reader.read(int(prev[i, k])).tokens if prev[i, k] >= 0 else np.zeros_like(out.tokens)
            np.testing.assert_array_equal(out.past_tokens[k], expected)
    assert reader.read(4).past_valid.tolist() == [False, False]  # first row of scene-b
    assert reader.read(6).past_valid.tolist() == [True, True]
    # read(k=...) gives the nearest k past frames of the full read, and only those.
    for k in range(K + 1):
        part, full = reader.read(7, k=k), reader.read(7)
        assert part.past_tokens.shape == (k, *full.past_tokens.shape[1:]) and len(part.past_valid) == k
        np.testing.assert_array_equal(part.past_tokens, full.past_tokens[:k])
        np.testing.assert_array_equal(part.bev, full.bev)
    with pytest.raises(ValueError, match=r"read\(k=3\).*expected 0 <= k <= 2"):
        reader.read(7, k=K + 1)
    with pytest.raises(SampleNotFoundError, match="not-a-token"):
        reader.index_of("not-a-token")
    assert verify(tmp_path / "c.zarr", scenes=SCENES, timestamps=list(range(10))).ok


def test_round_trip_int8_error_is_small(tmp_path: Path) -> None:
    records = make_records(seed=1)
    write(tmp_path / "c.zarr", records, meta=make_meta(precision="int8"))
    reader = open_cache(tmp_path / "c.zarr")
    errors = []
    for i, rec in enumerate(records):
        out = reader.read(i)
        errors.append(np.linalg.norm(out.bev - rec.bev) / np.linalg.norm(rec.bev))
        np.testing.assert_allclose(out.tokens, pool_tokens(rec.bev, 2), rtol=2**-10, atol=1e-6)
    print(f"int8 relative L2 error: max {max(errors):.2e}, mean {np.mean(errors):.2e}")
    assert max(errors) < 1e-2
    assert zarr.open_group(tmp_path / "c.zarr", mode="r")["bev"].dtype == np.int8
    assert verify(tmp_path / "c.zarr").ok


def test_plain_zarr_reads_the_same_bev(tmp_path: Path) -> None:
    write(tmp_path / "c.zarr", make_records())
    group = zarr.open_group(tmp_path / "c.zarr", mode="r")
    np.testing.assert_array_equal(group["bev"][3].astype(np.float32), open_cache(tmp_path / "c.zarr").read(3).bev)
    assert bytes(group["sample_token"][3]).rstrip(b"\0").decode() == TOKENS[3]
    assert group.attrs["stxd"]["complete"] is True and group.attrs["stxd"]["grid"]["x_range"] == [-4.0, 4.0]


def test_resume_gives_byte_identical_store(tmp_path: Path) -> None:
    records = make_records()
    write(tmp_path / "straight.zarr", records)
    first = write(tmp_path / "resumed.zarr", records, units=[0], finalize=False)
    assert first.pending_units() == [range(4, 8), range(8, 10)]
    # A kill after a unit's arrays were written but before its done flags: other data, done still False.
    first.write_unit(range(4, 8), make_records(seed=9)[4:8])
    zarr.open_group(tmp_path / "resumed.zarr", mode="r+")["done"][4:8] = False
    again = create_or_resume(tmp_path / "resumed.zarr", make_meta(), TOKENS, prev_rows(SCENES, K))
    assert again.rows_per_shard == 4 and again.pending_units() == [range(4, 8), range(8, 10)]
    for rows in reversed(again.pending_units()):
        again.write_unit(rows, [records[i] for i in rows])
    again.write_unit(range(0, 4), records[:4])  # rewriting a done unit changes nothing
    again.finalize()
    again.finalize()  # a second finalize is a no-op
    straight, resumed = files(tmp_path / "straight.zarr"), files(tmp_path / "resumed.zarr")
    assert len(straight) > 20 and straight.keys() == resumed.keys()
    assert [k for k in straight if straight[k] != resumed[k]] == []


def test_fingerprint_mismatch_names_the_field(tmp_path: Path) -> None:
    write(tmp_path / "c.zarr", make_records(), units=[0], finalize=False)
    other = make_meta(teacher={"name": "tiny", "config": {"channels": C, "layers": [2, 3]},
                               "sha256": hashlib.sha256(b"other").hexdigest()})
    with pytest.raises(FingerprintMismatchError) as info:
        create_or_resume(tmp_path / "c.zarr", other, TOKENS, prev_rows(SCENES, K))
    message = str(info.value)
    assert "teacher.sha256" in message and hashlib.sha256(b"other").hexdigest()[:20] in message
    assert "teacher.config.layers: store has [2, 2], requested [2, 3]" in message
    assert sorted(d.split(":")[0] for d in info.value.differences) == ["teacher.config.layers", "teacher.sha256"]
    with pytest.raises(FingerprintMismatchError, match="token_grid: store has 2, requested 4"):
        create_or_resume(tmp_path / "c.zarr", make_meta(token_grid=4), TOKENS, prev_rows(SCENES, K))
    with pytest.raises(FingerprintMismatchError, match="precision: store has 'fp16', requested 'int8'"):
        create_or_resume(tmp_path / "c.zarr", make_meta(precision="int8"), TOKENS, prev_rows(SCENES, K))
    swapped = [TOKENS[1], TOKENS[0], *TOKENS[2:]]
    with pytest.raises(FingerprintMismatchError, match="`sample_token` row 0"):
        create_or_resume(tmp_path / "c.zarr", make_meta(), swapped, prev_rows(SCENES, K))
    with pytest.raises(LayoutMismatchError, match="rows_per_shard = 4"):
        create_or_resume(tmp_path / "c.zarr", make_meta(), TOKENS, prev_rows(SCENES, K), rows_per_shard=8)
    # `created` and the layout are not part of the fingerprint
    resumed = create_or_resume(tmp_path / "c.zarr", make_meta(created=""), TOKENS, prev_rows(SCENES, K))
    assert resumed.meta.created == CREATED


def test_complete_store_refuses_writing(tmp_path: Path) -> None:
    records = make_records()
    writer = write(tmp_path / "c.zarr", records)
    with pytest.raises(CacheReadOnlyError, match="already complete"):
        create_or_resume(tmp_path / "c.zarr", make_meta(), TOKENS, prev_rows(SCENES, K))
    with pytest.raises(CacheReadOnlyError, match="already complete"):
        writer.write_unit(range(0, 4), records[:4])
    group = zarr.open_group(tmp_path / "c.zarr", mode="r")
    with pytest.raises(ValueError, match="read-only"):
        group["done"][0] = False


def test_non_cache_paths_are_refused(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hello")
    with pytest.raises(NotACacheError, match="not a Zarr v3 group"):
        create_or_resume(tmp_path / "notes", make_meta(), TOKENS, prev_rows(SCENES, K))
    zarr.open_group(tmp_path / "other.zarr", mode="w").create_array("x", shape=(3,), dtype="int8")
    with pytest.raises(NotACacheError, match="without the `stxd` attribute"):
        create_or_resume(tmp_path / "other.zarr", make_meta(), TOKENS, prev_rows(SCENES, K))
    with pytest.raises(NotACacheError, match="does not exist"):
        open_cache(tmp_path / "missing.zarr")
    interrupted = zarr.open_group(tmp_path / "interrupted.zarr", mode="w", attributes={"stxd_creating": True})
    interrupted.create_array("bev", shape=(2,), dtype="int8")  # creation was killed half way: it is redone
    assert create_or_resume(tmp_path / "interrupted.zarr", make_meta(), TOKENS, prev_rows(SCENES, K)).units
    (tmp_path / "empty").mkdir()  # an empty folder is a fine place for a new cache
    assert create_or_resume(tmp_path / "empty", make_meta(), TOKENS, prev_rows(SCENES, K)).pending_units()


@pytest.mark.parametrize("rows_per_shard", [1, 2])
def test_corrupt_chunk_is_named(tmp_path: Path, rows_per_shard: int) -> None:
    write(tmp_path / "c.zarr", make_records(), rows_per_shard=rows_per_shard)
    flip_byte_of_row(tmp_path / "c.zarr" / "bev", 3, rows_per_shard)
    report = verify(tmp_path / "c.zarr")
    assert not report.ok and report.bad_samples == [TOKENS[3]]
    assert any("`bev`" in p and TOKENS[3] in p for p in report.problems), report.problems
    reader = open_cache(tmp_path / "c.zarr")
    with pytest.raises(CacheCorruptError, match=f"`bev` row 3 \\({TOKENS[3]}\\)"):
        reader.read(3)
    np.testing.assert_array_equal(reader.read(2).bev.shape, (C, HW, HW))  # its neighbour in the shard still reads


def test_damaged_shard_index_and_done_chunk_cost_only_their_rows(tmp_path: Path) -> None:
    write(tmp_path / "c.zarr", make_records(), rows_per_shard=2)
    shard = tmp_path / "c.zarr" / "box_probs" / "c" / "1" / "0" / "0"  # rows 2 and 3
    raw = bytearray(shard.read_bytes())
    raw[-10] ^= 1  # inside the shard index, which carries its own crc32c
    shard.write_bytes(bytes(raw))
    done = tmp_path / "c.zarr" / "done" / "c" / "4"  # rows 8 and 9
    done.write_bytes(done.read_bytes()[:-1])
    report = verify(tmp_path / "c.zarr")
    assert report.bad_samples == [TOKENS[i] for i in (2, 3, 8, 9)]
    reader = open_cache(tmp_path / "c.zarr")
    with pytest.raises(CacheCorruptError, match=f"`box_probs` row 3 \\({TOKENS[3]}\\) cannot be decoded"):
        reader.read(3)
    with pytest.raises(CacheCorruptError, match=f"`done` flags of rows 8 \\({TOKENS[8]}\\)"):
        reader.read(8)
    assert reader.read(5).count == M  # past row 4 and row 5 are intact


def test_missing_chunk_file_is_named(tmp_path: Path) -> None:
    write(tmp_path / "c.zarr", make_records(), rows_per_shard=2)
    (tmp_path / "c.zarr" / "bev" / "c" / "2" / "0" / "0" / "0").unlink()  # rows 4 and 5
    (tmp_path / "c.zarr" / "done" / "c" / "4").unlink()  # rows 8 and 9
    report = verify(tmp_path / "c.zarr")
    assert not report.ok and report.bad_samples == [TOKENS[i] for i in (4, 5, 8, 9)]
    assert any("bev/c/2/0/0/0" in p and "is missing" in p for p in report.problems), report.problems
    assert any("done/c/4" in p and "is missing" in p for p in report.problems), report.problems


def test_incomplete_cache(tmp_path: Path) -> None:
    records = make_records()
    writer = write(tmp_path / "c.zarr", records, units=[0, 2], finalize=False)
    reader = open_cache(tmp_path / "c.zarr")
    with pytest.raises(CacheIncompleteError, match="4 of 10 rows not done"):
        reader.require_complete()
    with pytest.raises(CacheIncompleteError, match=TOKENS[5]):
        reader.read(5)
    report = verify(tmp_path / "c.zarr")
    assert report.bad_samples == TOKENS[4:8]
    assert any("4 of 10 rows are not done" in p for p in report.problems)
    assert any("not complete" in p for p in report.problems)
    with pytest.raises(CacheIncompleteError, match="4 of 10 rows are not done"):
        writer.finalize()
    writer.write_unit(range(4, 8), records[4:8])
    with pytest.raises(CacheIncompleteError, match="finalize not run"):
        open_cache(tmp_path / "c.zarr").require_complete()
    writer.finalize()
    open_cache(tmp_path / "c.zarr").require_complete()


def test_units_and_storage_objects_are_aligned(tmp_path: Path) -> None:
    writer = write(tmp_path / "c.zarr", make_records(), rows_per_shard=4, finalize=False)
    assert writer.units == [range(0, 4), range(4, 8), range(8, 10)]
    group = zarr.open_group(tmp_path / "c.zarr", mode="r")
    for name in ("bev", "tokens", "boxes", "box_scores", "box_labels", "box_probs"):
        assert group[name].shards[0] == 4 and group[name].chunks[0] == 1, name
        assert len(list((tmp_path / "c.zarr" / name / "c").iterdir())) == 3, name
    for name in ("box_count", "done"):
        assert group[name].shards is None and group[name].chunks[0] == 4, name
    for name in ("sample_token", "prev_index"):
        assert group[name].chunks[0] % 4 == 0, name
    with pytest.raises(ValueError, match="not a work unit"):
        writer.write_unit(range(2, 6), make_records()[2:6])


def test_verify_checks_prev_index_against_scenes(tmp_path: Path) -> None:
    write(tmp_path / "c.zarr", make_records())
    assert verify(tmp_path / "c.zarr", scenes=SCENES).ok
    other_scenes = ["scene-a"] * 3 + ["scene-b"] * 7
    report = verify(tmp_path / "c.zarr", scenes=other_scenes)
    assert report.bad_samples == [TOKENS[3], TOKENS[4]]  # row 3 links into scene-a, row 4 misses row 3
    reversed_time = verify(tmp_path / "c.zarr", timestamps=list(range(10, 0, -1)))
    assert not reversed_time.ok and "not strictly earlier in time" in reversed_time.problems[0]


def test_bad_records_and_inputs_are_refused(tmp_path: Path) -> None:
    records = make_records()
    writer = write(tmp_path / "c.zarr", records, units=[], finalize=False)
    wrong = dataclasses.replace(records[1], bev=np.zeros((C + 1, HW, HW), np.float32))
    with pytest.raises(RecordError, match=rf"sample {TOKENS[1]}: `bev` has shape \(5, 8, 8\); expected \(4, 8, 8\)"):
        writer.write_unit(range(0, 4), [records[0], wrong, *records[2:4]])
    nan = dataclasses.replace(records[2], bev=np.full((C, HW, HW), np.nan, np.float32))
    with pytest.raises(RecordError, match="non-finite"):
        writer.write_unit(range(0, 4), [*records[:2], nan, records[3]])
    assert writer.pending_units() == writer.units  # nothing was marked done
    bad_prev = prev_rows(SCENES, K)
    bad_prev[2, 0] = 5
    with pytest.raises(ValueError, match="prev_index row 2"):
        create_or_resume(tmp_path / "d.zarr", make_meta(), TOKENS, bad_prev)


def test_writer_pickles_and_k_max_zero_works(tmp_path: Path) -> None:
    records = make_records()
    meta = make_meta(k_max=0)
    writer = create_or_resume(tmp_path / "c.zarr", meta, TOKENS, np.zeros((10, 0), np.int32), rows_per_shard=4)
    clone = pickle.loads(pickle.dumps(writer))
    for rows in clone.pending_units():
        clone.write_unit(rows, [records[i] for i in rows])
    assert writer.pending_units() == []
    writer.finalize()
    out = open_cache(tmp_path / "c.zarr").read(5)
    assert out.past_tokens.shape == (0, 4, C) and out.past_valid.shape == (0,)
    assert verify(tmp_path / "c.zarr").ok


def test_cache_info_reports_sizes(tmp_path: Path) -> None:
    write(tmp_path / "c.zarr", make_records())
    info = cache_info(tmp_path / "c.zarr")
    assert info["sample_count"] == info["done_count"] == 10 and info["complete"] is True
    assert info["fingerprint"]["precision"] == "fp16" and "created" not in info["fingerprint"]
    on_disk = sum(p.stat().st_size for p in (tmp_path / "c.zarr").rglob("*") if p.is_file())
    assert info["bytes_on_disk"] == on_disk
    assert info["bytes_per_sample"] == pytest.approx(on_disk / 10)
    assert info["arrays"]["bev"]["uncompressed_bytes"] == 10 * C * HW * HW * 2
    assert info["compression_ratio"] == pytest.approx(info["uncompressed_bytes"] / on_disk)


def test_tensorstore_reads_every_array_as_zarr_does(cache: Path) -> None:
    """The store is plain zarr v3: tensorstore (another implementation) decodes every array, the sample tokens
    included, to the same values as zarr."""
    ts = pytest.importorskip("tensorstore")
    group = zarr.open_group(str(cache), mode="r")
    names = sorted(name for name, _ in group.arrays())
    assert {"sample_token", "bev", "tokens", "boxes", "digest", "done"} <= set(names)
    for name in names:
        store = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(cache / name)}},
                        read=True).result()
        np.testing.assert_array_equal(store.read().result(), group[name][:], err_msg=name)
    tokens = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(cache / "sample_token")}},
                     read=True).result().read().result()
    assert [bytes(t).rstrip(b"\0").decode() for t in tokens] == open_cache(cache).tokens
