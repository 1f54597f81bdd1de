"""`stxd-cache extract` end to end on the tiny synthetic root with a tiny real teacher: equivalence with
a fresh forward, int8 error, dask workers, SIGKILL and resume, fingerprints and bad inputs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipelines.grid import resample
from pipelines.lidar import load_sweeps
from stxd_cache.extract import extract
from stxd_cache.store import open_cache
from stxd_cache.teacher.checkpoint import CheckpointError
from stxd_cache.verify import verify
from tiny import CACHE, SPLITS, TINY_TEACHER
from tiny import extract_job as _job

BIN = Path(sys.executable).parent


def _arrays(path: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    return {name: np.asarray(arr[...]) for name, arr in group.arrays()}


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
    out = tmp_path / "dask.zarr"
    extract(_job(synth_root, teacher_ckpt, out), workers=2)
    single, dask = _arrays(cache), _arrays(out)
    assert single.keys() == dask.keys()
    for name in single:
        np.testing.assert_array_equal(single[name], dask[name], err_msg=name)


def _cli(root: Path, ckpt: Path, out: Path, config: Path) -> list[str]:
    return [str(BIN / "stxd-cache"), "extract", "--dataroot", str(root), "--version", "v1.0-synth",
            "--splits", ",".join(SPLITS), "--teacher", str(ckpt), "--config", str(config), "--out", str(out),
            "--device", "cpu"]


def _config_file(tmp_path: Path) -> Path:
    import yaml

    from pipelines.config import to_dict

    path = tmp_path / "cache.yaml"
    path.write_text(yaml.safe_dump(to_dict(replace(CACHE, rows_per_shard=1))))
    return path


def test_sigkill_then_resume_gives_identical_arrays(synth_root: Path, teacher_ckpt: Path, tmp_path: Path) -> None:
    config = _config_file(tmp_path)
    ref = tmp_path / "ref.zarr"
    subprocess.run(_cli(synth_root, teacher_ckpt, ref, config), check=True, capture_output=True)
    out = tmp_path / "killed.zarr"
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.Popen(_cli(synth_root, teacher_ckpt, out, config), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    done = 0
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:   # kill once a few rows are written
        try:
            done = int(np.sum(zarr.open_group(str(out), mode="r")["done"][...]))
        except Exception:  # the store is being created
            done = 0
        if done >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the extraction finished before it could be killed"
    assert 2 <= done < 12
    killed = open_cache(out) if (out / "zarr.json").exists() else None
    assert killed is None or not killed.meta.complete, "a killed extraction must not look complete"
    result = subprocess.run(_cli(synth_root, teacher_ckpt, out, config), capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert verify(out).ok
    a, b = _arrays(ref), _arrays(out)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


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


def test_missing_lidar_and_failed_writes_leave_an_incomplete_cache(synth_root: Path, teacher_ckpt: Path,
                                                                   tmp_path: Path, monkeypatch) -> None:
    from pipelines.errors import SensorFileError
    from stxd_cache import store
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

    calls = {"n": 0}
    real = store.CacheWriter.write_unit

    def disk_full(self, rows, records):   # the second unit finds the disk full
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(self, rows, records)

    monkeypatch.setattr(store.CacheWriter, "write_unit", disk_full)
    with pytest.raises(OSError, match="No space left"):
        extract(_job(root, teacher_ckpt, out))
    assert not open_cache(out).meta.complete
    monkeypatch.undo()
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
    with pytest.raises(DatasetError, match="no samples"):
        extract(job)


def test_cli_info_verify_show_and_corruption(cache: Path, synth_root: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.zarr"
    shutil.copytree(cache, copy)
    info = subprocess.run([BIN / "stxd-cache", "info", str(copy)], capture_output=True, text=True, check=True)
    assert '"complete": true' in info.stdout
    ok = subprocess.run([BIN / "stxd-cache", "verify", str(copy), "--dataroot", str(synth_root)],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    reader = open_cache(copy)
    png = tmp_path / "x.png"
    subprocess.run([BIN / "stxd-cache", "show", str(copy), "--sample", reader.tokens[3], "--out", str(png),
                    "--dataroot", str(synth_root)], check=True, capture_output=True)
    assert png.stat().st_size > 1000
    shard = next(p for p in sorted((copy / "bev" / "c").rglob("*")) if p.is_file())
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    bad = subprocess.run([BIN / "stxd-cache", "verify", str(copy)], capture_output=True, text=True)
    assert bad.returncode == 1
    assert any(token in bad.stderr for token in reader.tokens[:4])


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
