"""`stxd-cache extract` end to end on the tiny synthetic root with a tiny real teacher: equivalence with
a fresh forward, int8 error, dask workers, fingerprints and bad inputs (kills, a full disk and corruption are in
tests/faults/test_cache_faults.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.errors import CheckpointError
from pipelines.grid import resample
from pipelines.lidar import load_sweeps
from stxd_cache.extract import extract
from stxd_cache.store import open_cache
from stxd_cache.verify import verify
from tiny import BIN, CACHE, TINY_TEACHER, cache_arrays
from tiny import extract_job as _job


def test_cached_record_equals_a_fresh_teacher_forward(cache: Path, teacher_ckpt: Path, train_index) -> None:
    from stxd_cache.teacher.checkpoint import load_teacher

    reader = open_cache(cache)
    reader.require_complete()
    assert len(reader) == 12 and verify(cache).ok
    teacher = load_teacher(teacher_ckpt).model.eval()
    sample = train_index[2]
    record = reader.read(reader.index_of(sample.token))
    points = torch.from_numpy(load_sweeps(sample, num_sweeps=2, point_range=TINY_TEACHER["voxel"]["point_range"]))
    with torch.inference_mode():
        out = teacher([points])
        bev = resample(out.bev, teacher.bev_grid, CACHE.grid)[0].numpy()
        det = teacher.decode(out)[0]
    assert record.bev.shape == (32, 16, 16)
    np.testing.assert_allclose(record.bev, bev, rtol=2e-3, atol=2e-3)   # fp16 storage
    n = min(len(det.scores), CACHE.box_capacity)
    assert record.count == n > 0
    order = np.argsort(-det.scores.numpy(), kind="stable")[:n]
    np.testing.assert_allclose(record.boxes[:n], det.boxes.numpy()[order], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(record.labels[:n], det.labels.numpy()[order])
    # past frames: the sample two keyframes back in the same scene
    assert sample.frame_index == 2 and record.past_valid.tolist() == [True, True]
    past = reader.read(reader.index_of(sample.prev_tokens[1]))
    np.testing.assert_array_equal(record.past_tokens[1], past.tokens)


def test_int8_error_is_small(synth_root: Path, teacher_ckpt: Path, cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "int8.zarr"
    extract(_job(synth_root, teacher_ckpt, out, precision="int8"))
    fp16, int8 = open_cache(cache), open_cache(out)
    errors = []
    for i in range(len(fp16)):
        a, b = fp16.read(i).bev, int8.read(i).bev
        errors.append(np.linalg.norm(a - b) / np.linalg.norm(a))
    print(f"int8 relative L2 error vs fp16: max {max(errors):.2e}, mean {np.mean(errors):.2e}")
    assert max(errors) < 1e-2


def test_dask_two_workers_write_the_same_cache(synth_root: Path, teacher_ckpt: Path, cache: Path,
                                               tmp_path: Path) -> None:
    """Two worker processes of `local_cluster`, which keeps dask's thread limits but not its malloc trim threshold
    (it slowed the teacher 1.6x), write the same arrays as one process."""
    from distributed import Client

    from stxd_cache.extract import local_cluster

    out = tmp_path / "dask.zarr"
    with local_cluster(2) as cluster, Client(cluster) as client:
        env = client.run(lambda: (os.environ.get("MALLOC_TRIM_THRESHOLD_"), os.environ.get("OMP_NUM_THREADS")))
        extract(_job(synth_root, teacher_ckpt, out), scheduler=cluster.scheduler_address)
    assert len(env) == 2 and set(env.values()) == {(None, "1")}
    single, dask = cache_arrays(cache), cache_arrays(out)
    assert single.keys() == dask.keys()
    for name in single:
        np.testing.assert_array_equal(single[name], dask[name], err_msg=name)


def test_fingerprint_mismatch_names_the_field(synth_root: Path, teacher_ckpt: Path, cache: Path,
                                              tmp_path: Path) -> None:
    from stxd_cache.errors import FingerprintMismatchError

    out = tmp_path / "partial.zarr"
    shutil.copytree(cache, out)
    with pytest.raises(FingerprintMismatchError, match="token_grid"):
        extract(_job(synth_root, teacher_ckpt, out, token_grid=2))


def test_complete_cache_is_not_rewritten(synth_root: Path, teacher_ckpt: Path, cache: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}
    meta = extract(_job(synth_root, teacher_ckpt, cache))
    assert meta.complete
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()} == before


def test_bad_checkpoints(synth_root: Path, teacher_ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        extract(_job(synth_root, tmp_path / "none.pt", tmp_path / "a.zarr"))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(teacher_ckpt.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="corrupt"):
        extract(_job(synth_root, corrupt, tmp_path / "b.zarr"))
    other = torch.load(teacher_ckpt, weights_only=True)
    other["config"]["head"]["share_conv_channels"] = 24       # the weights are for 16 channels
    wrong = tmp_path / "wrong.pt"
    torch.save(other, wrong)
    with pytest.raises(CheckpointError, match=r"mis-shaped keys: head\.shared_conv"):
        extract(_job(synth_root, wrong, tmp_path / "c.zarr"))
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "c.zarr").exists()


def test_missing_lidar_leaves_an_incomplete_cache(synth_root: Path, teacher_ckpt: Path, tmp_path: Path) -> None:
    from pipelines.errors import SensorFileError
    from stxd_cache.errors import CacheIncompleteError

    root = tmp_path / "root"
    shutil.copytree(synth_root, root)
    victim = sorted((root / "samples" / "LIDAR_TOP").iterdir())[5]
    saved = victim.read_bytes()
    victim.unlink()
    out = tmp_path / "cache.zarr"
    with pytest.raises(SensorFileError, match=victim.name):
        extract(_job(root, teacher_ckpt, out))
    with pytest.raises(CacheIncompleteError):
        open_cache(out).require_complete()
    victim.write_bytes(saved)
    extract(_job(root, teacher_ckpt, out))
    assert open_cache(out).meta.complete and verify(out).ok


def test_no_samples_in_splits(synth_root: Path, teacher_ckpt: Path, tmp_path: Path) -> None:
    import json

    from pipelines.errors import DatasetError

    root = tmp_path / "root"
    shutil.copytree(synth_root, root, ignore=shutil.ignore_patterns("sweeps", "samples"))
    splits = json.loads((root / "v1.0-synth" / "splits.json").read_text())
    (root / "v1.0-synth" / "splits.json").write_text(json.dumps({**splits, "empty": []}))
    job = replace(_job(root, teacher_ckpt, tmp_path / "x.zarr"), splits=("empty",))
    with pytest.raises(DatasetError, match="split 'empty' selects no sample of .*: it names no scene; the splits "
                                           r"with samples here are synth_train \(8 samples\), synth_val \(4 samples\)"):
        extract(job)


def test_cli_info_verify_and_show(cache: Path, synth_root: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.zarr"
    shutil.copytree(cache, copy)
    info = subprocess.run([BIN / "stxd-cache", "info", str(copy)], capture_output=True, text=True, check=True)
    counts = open_cache(copy).box_counts()
    lines = info.stdout.splitlines()
    assert lines[0] == f"{copy}: complete, 12 of 12 rows written (finalized)"
    teacher = open_cache(copy).meta.teacher
    assert lines[1] == (f"samples: 12 of v1.0-synth synth_train, synth_val; teacher {teacher.name} (sha256 "
                        f"{teacher.sha256[:12]})")
    assert re.fullmatch(r"size: [\d.]+ MiB on disk, [\d.]+ MiB per sample, compression x[\d.]+ \(fp16\)", lines[2])
    none = int((counts == 0).sum())
    assert lines[3] == (f"teacher boxes per row: mean {counts.mean():.1f}, min {counts.min()}, max {counts.max()} "
                        f"(capacity 40); {none} row{'' if none == 1 else 's'} without a box")
    full = json.loads(subprocess.run([BIN / "stxd-cache", "info", str(copy), "--json"], capture_output=True,
                                     text=True, check=True).stdout)
    assert full["complete"] and full["boxes_per_row"]["max"] == counts.max() and "arrays" in full
    ok = subprocess.run([BIN / "stxd-cache", "verify", str(copy), "--dataroot", str(synth_root)],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    reader = open_cache(copy)
    png = tmp_path / "x.png"
    subprocess.run([BIN / "stxd-cache", "show", str(copy), "--sample", reader.tokens[3], "--out", str(png),
                    "--dataroot", str(synth_root)], check=True, capture_output=True)
    assert png.stat().st_size > 1000


def test_unsafe_checkpoint_needs_trust(teacher_ckpt: Path, tmp_path: Path) -> None:
    import argparse

    from stxd_cache.teacher.checkpoint import load_teacher, read_checkpoint

    data = torch.load(teacher_ckpt, weights_only=True)
    data["args"] = argparse.Namespace(lr=0.1)   # an arbitrary object: weights_only refuses to unpickle it
    path = tmp_path / "pickled.pt"
    torch.save(data, path)
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        read_checkpoint(path)
    assert load_teacher(path, trust=True).source_format == "native"
