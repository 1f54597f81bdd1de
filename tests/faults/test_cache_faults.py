"""Fault injection on the cache side: `stxd-cache extract` killed at random points and while it finalises, a disk
that fills up, damaged stores, and many processes reading one cache while it is verified. Every case ends in a
store compared byte for byte against an uninterrupted run, or in a message that names the store and the samples."""

from __future__ import annotations

import errno
import inspect
import itertools
import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from stxd_cache.errors import CacheCorruptError, CacheIncompleteError
from stxd_cache.schema import ATTRS_KEY
from stxd_cache.store import open_cache
from stxd_cache.verify import verify
from tiny import BIN, cache_config_file, error_paragraph, extract_args, flip_byte_of_row, shard_path

# Importing torch and spconv costs about 8 s of CPU here, so every `stxd-cache` process below is forked from a
# server that imported them once; the process then runs `stxd_cache.cli.main` on its arguments, which is all the
# console script does.
_PRELOAD = ["torch", "spconv.pytorch", "nuscenes.nuscenes", "pipelines.lidar", "pipelines.nuscenes", "stxd_cache.cli",
            "stxd_cache.extract", "stxd_cache.store", "stxd_cache.teacher.checkpoint", "zarr"]
SAMPLES = 12


@pytest.fixture(scope="module")
def processes() -> Iterator[Any]:
    """A multiprocessing context whose processes fork from a server that has imported the heavy modules."""
    from multiprocessing import forkserver

    forkserver._forkserver._stop()  # a server started elsewhere would not have the modules imported
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    yield context
    forkserver._forkserver._stop()  # else it holds torch in memory for the rest of the session


# ------------------------------------------------------------------------------------ running `stxd-cache` here


def _sets_complete(root_metadata: bytes) -> bool:
    """Whether a root `zarr.json` about to be written is finalize's, the one with `complete` set."""
    return json.loads(root_metadata).get("attributes", {}).get(ATTRS_KEY, {}).get("complete") is True


def _install_store_faults(*, full_after: int | None, full_at_finalize: bool, pause_marker: str | None) -> None:
    """Make zarr's LocalStore fail or stop: ENOSPC from write `full_after + 1` on, or on the write of the
    `complete` flag; or, at that write, touch `pause_marker` and sleep until killed."""
    from zarr.storage import LocalStore

    real_set = LocalStore.set
    writes = itertools.count(1)

    async def set_with_faults(self: LocalStore, key: str, value: Any) -> None:
        finalizing = key == "zarr.json" and _sets_complete(value.to_bytes())
        if pause_marker and finalizing:
            Path(pause_marker).touch()
            time.sleep(600)
        if (full_after is not None and next(writes) > full_after) or (full_at_finalize and finalizing):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        await real_set(self, key, value)

    LocalStore.set = set_with_faults  # type: ignore[method-assign]


def _stxd_cache(argv: list[str], log: str, full_after: int | None = None, full_at_finalize: bool = False,
                pause_marker: str | None = None) -> None:
    """Body of a forked process: `stxd-cache ARGV` with its stdout and stderr in `LOG.out` and `LOG.err`, and the
    store faults of `_install_store_faults`."""
    for fd, suffix in ((1, ".out"), (2, ".err")):
        target = os.open(log + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    os.environ["TQDM_DISABLE"] = "1"
    # tqdm and numcodecs make multiprocessing locks; under the fork method they are unlinked at once instead of
    # being tracked until exit, which a SIGKILLed process never reaches (the tracker would warn of leaks).
    multiprocessing.set_start_method("fork", force=True)
    _install_store_faults(full_after=full_after, full_at_finalize=full_at_finalize, pause_marker=pause_marker)
    from stxd_cache.cli import main

    main(args=argv, prog_name="stxd-cache")


def _start(processes: Any, argv: list[str], log: Path, **faults: Any) -> Any:
    process = processes.Process(target=_stxd_cache, args=(argv, str(log)), kwargs=faults, daemon=True)
    process.start()
    return process


def _run(processes: Any, argv: list[str], log: Path, **faults: Any) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `stxd-cache ARGV` run to its end."""
    process = _start(processes, argv, log, **faults)
    process.join(180)
    if process.exitcode is None:
        process.kill()
        pytest.fail(f"stxd-cache {' '.join(argv)} did not end within 180 s")
    return process.exitcode, Path(f"{log}.out").read_text(), Path(f"{log}.err").read_text()


def _done_rows(out: Path) -> int:
    """Rows marked done in the cache at `out`, or -1 while it does not exist or is still being created."""
    try:
        group = zarr.open_group(str(out), mode="r")
        if ATTRS_KEY not in group.attrs:
            return -1
        return int(np.count_nonzero(group["done"][...]))
    except Exception:  # absent, or caught between two writes of its creation
        return -1


def _wait_for(condition: Callable[[], bool], process: Any, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.is_alive(), f"the extraction ended (exit {process.exitcode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.01)


def _kill(process: Any) -> None:
    process.kill()
    process.join()
    assert process.exitcode == -signal.SIGKILL, "the extraction finished before it could be killed"


def _store_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_same_store(expected: Path, actual: Path) -> None:
    """Every file of `actual` equals `expected`'s byte for byte, the root metadata too once `created` is set
    aside, and no other file is there."""
    want, have = _store_files(expected), _store_files(actual)
    assert sorted(have) == sorted(want)
    assert [name for name in want if name != "zarr.json" and want[name] != have[name]] == []
    roots = [json.loads(files["zarr.json"]) for files in (want, have)]
    for root in roots:
        root["attributes"][ATTRS_KEY].pop("created")
    assert roots[0] == roots[1]


# ------------------------------------------------------------------------------------------------- kill, resume


def _assert_not_complete(out: Path) -> str:
    """How far a killed extraction got; fails if the cache reads as complete."""
    try:
        reader = open_cache(out)
    except CacheIncompleteError as exc:
        assert "still being created" in str(exc)
        return "store still being created"
    with pytest.raises(CacheIncompleteError, match="is not complete"):
        reader.require_complete()
    assert not reader.meta.complete
    return f"{int(reader._done.sum())} rows done"


def test_kills_anywhere_then_resume_give_the_uninterrupted_store(processes: Any, synth_root: Path,
                                                                 teacher_ckpt: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(20240611)
    config = cache_config_file(tmp_path, rows_per_shard=1)  # one row per unit: a kill can land on any row
    ref, out = tmp_path / "ref.zarr", tmp_path / "killed.zarr"
    code, _, err = _run(processes, extract_args(synth_root, teacher_ckpt, ref, config), tmp_path / "ref")
    assert code == 0, err
    argv = extract_args(synth_root, teacher_ckpt, out, config)

    # Five kills: one as soon as the store's root metadata appears (mostly inside its creation), four once a
    # random number of rows is done, each after a random extra delay so that it lands inside a unit.
    targets = [-1, *sorted(int(t) for t in rng.choice(np.arange(1, 9), size=4, replace=False))]
    progress: list[str] = []
    done_before = -1
    for n, target in enumerate(targets):
        process = _start(processes, argv, tmp_path / f"kill{n}")
        if target < 0:
            _wait_for((out / "zarr.json").exists, process, "store metadata")
        else:
            _wait_for(lambda target=target: _done_rows(out) >= target, process, f"{target} rows done")
            time.sleep(rng.uniform(0.0, 0.05))
        _kill(process)
        progress.append(_assert_not_complete(out))
        done = _done_rows(out)
        assert done >= max(target, done_before), "a kill must never undo finished rows"
        done_before = max(done, done_before)
    print("after each kill:", "; ".join(progress))

    # A kill while finalize writes the `complete` flag: every row is done, yet the cache is not complete.
    marker = tmp_path / "finalizing"
    process = _start(processes, argv, tmp_path / "finalize", pause_marker=str(marker))
    _wait_for(marker.exists, process, "write of the `complete` flag")
    _kill(process)
    assert _done_rows(out) == SAMPLES
    # What a kill inside zarr's write-then-rename of an object leaves behind; finalize must clear it away.
    (out / "bev" / "c" / "3" / "0" / "0" / f"0.{uuid.uuid4().hex}.partial").write_bytes(b"half a chunk")
    with pytest.raises(CacheIncompleteError, match="every row done, finalize not run"):
        open_cache(out).require_complete()
    report = verify(out)
    assert len(report.problems) == 1 and "finalize has not run" in report.problems[0], report.problems

    code, stdout, err = _run(processes, argv, tmp_path / "resume")
    assert code == 0, err
    assert f"cache {out} complete: {SAMPLES} samples (0 extracted now" in stdout  # only finalize was left
    counts = open_cache(out).box_counts()
    assert f"teacher boxes per row: mean {counts.mean():.1f}, min {counts.min()}, max {counts.max()}" in stdout
    assert verify(out).ok
    _assert_same_store(ref, out)


# ------------------------------------------------------------------------------------------------- a full disk


@pytest.mark.parametrize(("fault", "writing", "state"), [
    pytest.param({"full_after": 5}, "the new store", "store still being created", id="while-creating"),
    pytest.param({"full_after": 26}, "rows 4 (", "4 rows done", id="inside-the-second-unit"),
    pytest.param({"full_at_finalize": True}, "the `complete` flag", "12 rows done", id="at-finalize"),
])
def test_a_full_disk_fails_cleanly_then_resumes_to_the_same_store(
        processes: Any, synth_root: Path, teacher_ckpt: Path, cache: Path, tmp_path: Path, fault: dict[str, Any],
        writing: str, state: str) -> None:
    out = tmp_path / "full.zarr"
    argv = extract_args(synth_root, teacher_ckpt, out, cache_config_file(tmp_path))  # the `cache` fixture's config
    code, _, err = _run(processes, argv, tmp_path / "full", **fault)
    message = error_paragraph(err)
    assert code == 2, err
    assert message.startswith(f"cache {out}: writing {writing}"), message
    assert "failed: the disk is full ([Errno 28] No space left on device); free space on the disk that holds the " \
           "cache, then re-run the same `stxd-cache extract` command: it keeps the rows already done" in message
    assert _assert_not_complete(out) == state

    code, stdout, err = _run(processes, argv, tmp_path / "space-returned")  # the same command, the fault gone
    assert code == 0, err
    assert f"cache {out} complete" in stdout
    assert verify(out).ok
    _assert_same_store(cache, out)


def test_a_full_disk_with_debug_shows_the_traceback(processes: Any, synth_root: Path, teacher_ckpt: Path,
                                                     tmp_path: Path) -> None:
    argv = extract_args(synth_root, teacher_ckpt, tmp_path / "full.zarr", cache_config_file(tmp_path))
    code, _, err = _run(processes, ["--debug", *argv], tmp_path / "debug", full_after=26)
    assert code == 1
    assert "Traceback" in err and "OSError: [Errno 28] No space left on device" in err
    assert "stxd_cache.errors.CacheWriteError: cache " in err


# ------------------------------------------------------------------------------------------------- damaged bev


def _damage(copy: Path, how: str) -> None:
    """Damage the `bev` of rows 4..7 of a copy of the `cache` fixture (4 rows per shard)."""
    shard = shard_path(copy / "bev", 5, rows_per_shard=4)
    if how == "flipped-byte":
        flip_byte_of_row(copy / "bev", 5, rows_per_shard=4)
    elif how == "deleted":
        shard.unlink()
    elif how == "truncated":
        shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
    elif how == "emptied":
        shard.write_bytes(b"")


@pytest.mark.parametrize(("how", "rows", "says"), [
    pytest.param("flipped-byte", [5], "row 5 ({}) fails to decode (corrupt chunk)", id="flipped-byte"),
    pytest.param("deleted", [4, 5, 6, 7], "stored object `bev/c/1/0/0/0` is missing (rows 4 ({})", id="deleted"),
    pytest.param("truncated", [4, 5, 6, 7], "row 4 ({}) fails to decode (corrupt chunk)", id="truncated"),
    pytest.param("emptied", [4, 5, 6, 7], "stored object `bev/c/1/0/0/0` is empty (0 bytes: a truncated write or "
                 "copy; rows 4 ({})", id="emptied"),
])
def test_verify_cli_names_the_samples_of_a_damaged_bev(cache: Path, tmp_path: Path, how: str, rows: list[int],
                                                       says: str) -> None:
    copy = tmp_path / "copy.zarr"
    shutil.copytree(cache, copy)
    tokens = open_cache(copy).tokens
    _damage(copy, how)
    result = subprocess.run([BIN / "stxd-cache", "verify", str(copy)], capture_output=True, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1"})
    assert result.returncode == 1, result.stdout
    lines = result.stderr.splitlines()
    assert "Traceback" not in result.stderr
    assert lines[-1] == "bad samples: " + ", ".join(tokens[r] for r in rows)
    assert all("array `bev`" in line for line in lines[1:-1]), lines
    assert says.format(tokens[rows[0]]) in result.stderr, result.stderr
    reader = open_cache(copy)
    assert reader.read(3).count > 0 and reader.read(8).count > 0  # the shards around it still read
    if how != "deleted":  # zarr reads an absent shard back as fill values: finding those is verify's job
        with pytest.raises(CacheCorruptError, match=f"`bev` row 5 \\({tokens[5]}\\) cannot be decoded"):
            reader.read(5)


def test_a_lost_done_chunk_of_a_complete_cache_is_corruption(cache: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.zarr"
    shutil.copytree(cache, copy)
    tokens = open_cache(copy).tokens
    (copy / "done" / "c" / "1").unlink()  # rows 4..7 read back as not done
    result = subprocess.run([BIN / "stxd-cache", "verify", str(copy)], capture_output=True, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1"})
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == "bad samples: " + ", ".join(tokens[4:8])
    assert "stored object `done/c/1` is missing" in result.stderr
    assert "4 of 12 rows are not done" in result.stderr and "although the cache is marked complete" in result.stderr
    with pytest.raises(CacheCorruptError, match=f"marked complete, but the `done` flags of rows 5 \\({tokens[5]}\\)"):
        open_cache(copy).read(5)


# ------------------------------------------------------------------------------------------ many readers, verify


def record_digests(path: str, rows: list[int] | None = None) -> dict[str, dict[str, str]]:
    """sha256 of every field of every record of the cache at `path` (read in the order `rows`), by sample token.

    Self-contained, imports included: its source is also the reader processes' script."""
    import dataclasses
    import hashlib

    import numpy as np

    from stxd_cache.store import open_cache

    reader = open_cache(path)
    digests = {}
    for i in range(len(reader)) if rows is None else rows:
        record = reader.read(i)
        digests[record.token] = {
            field.name: hashlib.sha256(np.ascontiguousarray(getattr(record, field.name)).tobytes()).hexdigest()
            for field in dataclasses.fields(record)}
    return digests


# Each reader says it is ready, waits for the common start, then prints its digests as JSON.
_READER = inspect.getsource(record_digests) + """
import json, sys, time
from pathlib import Path

Path(sys.argv[2]).touch()
while not Path(sys.argv[3]).exists():
    time.sleep(0.005)
print(json.dumps(record_digests(sys.argv[1], json.loads(sys.argv[4]))))
"""


def test_four_readers_and_verify_at_once_see_the_same_bytes(cache: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    go = tmp_path / "go"
    env = {**os.environ, "TQDM_DISABLE": "1"}
    readers = [subprocess.Popen([sys.executable, "-c", _READER, str(cache), str(tmp_path / f"ready{k}"), str(go),
                                 json.dumps(rng.permutation(SAMPLES).tolist())],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
               for k in range(4)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{k}").exists() for k in range(4)):
        assert all(r.poll() is None for r in readers), [r.communicate() for r in readers if r.poll() is not None]
        assert time.monotonic() < deadline, "the readers did not start within 120 s"
        time.sleep(0.01)
    checker = subprocess.Popen([BIN / "stxd-cache", "verify", str(cache)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    go.touch()
    outputs = [r.communicate(timeout=120) for r in readers]
    checked = checker.communicate(timeout=120)
    assert [r.returncode for r in readers] == [0] * 4, [err for _, err in outputs]
    assert checker.returncode == 0 and checked[0].strip() == f"ok: {cache} verified", checked
    expected = record_digests(str(cache))
    assert len(expected) == SAMPLES
    for out, _ in outputs:
        assert json.loads(out) == expected


def _stamps(root: Path) -> dict[Path, tuple[int, bytes]]:
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()}


def test_extract_into_a_complete_cache_writes_nothing(processes: Any, synth_root: Path, teacher_ckpt: Path,
                                                      cache: Path, tmp_path: Path) -> None:
    copy = tmp_path / "complete.zarr"
    shutil.copytree(cache, copy)
    before = _stamps(copy)
    argv = extract_args(synth_root, teacher_ckpt, copy, cache_config_file(tmp_path))
    code, stdout, err = _run(processes, argv, tmp_path / "same")
    assert code == 0, err
    assert f"cache {copy} is already complete ({SAMPLES} samples, created " in stdout
    assert "nothing was extracted or written" in stdout
    code, _, err = _run(processes, [*argv, "--set", "token_grid=2"], tmp_path / "other")
    assert code == 2
    message = error_paragraph(err)
    assert message.startswith(f"cache {copy} was made for something else") and \
           "token_grid: store has 4, requested 2" in message, message
    assert _stamps(copy) == before


# ----------------------------------------------------------------------------------------- one writer per store


@pytest.fixture(scope="module")
def other_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny teacher (other weights, same architecture): its cache has another fingerprint."""
    from tiny import tiny_teacher_checkpoint

    return tiny_teacher_checkpoint(tmp_path_factory.mktemp("other") / "teacher.pt", seed=1)


def _teacher_sha(out: Path) -> str:
    return open_cache(out).meta.teacher.sha256


def _file_sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holder_blocks_nothing(
        processes: Any, synth_root: Path, teacher_ckpt: Path, other_teacher: Path, tmp_path: Path) -> None:
    import socket

    out, config = tmp_path / "cache.zarr", cache_config_file(tmp_path)
    marker = tmp_path / "finalizing"
    holder = _start(processes, extract_args(synth_root, teacher_ckpt, out, config), tmp_path / "a",
                    pause_marker=str(marker))
    _wait_for(marker.exists, holder, "finalize")   # every row written, the lock held
    for name, ckpt in (("b", other_teacher), ("same", teacher_ckpt)):
        code, _, err = _run(processes, extract_args(synth_root, ckpt, out, config), tmp_path / name)
        assert code == 2, err
        message = error_paragraph(err)
        assert message.startswith(f"cache {out} is being written by another extraction (pid {holder.pid} on host "
                                  f"{socket.gethostname()}, since "), message
    _kill(holder)
    code, _, err = _run(processes, extract_args(synth_root, teacher_ckpt, out, config), tmp_path / "resume")
    assert code == 0, err
    assert verify(out).ok and _teacher_sha(out) == _file_sha(teacher_ckpt)
    assert "stxd_writer" not in zarr.open_group(str(out), mode="r").attrs   # finalize drops the holder's name


def test_two_extractions_started_together_leave_one_teachers_verified_cache(
        processes: Any, synth_root: Path, teacher_ckpt: Path, other_teacher: Path, tmp_path: Path) -> None:
    out, config = tmp_path / "cache.zarr", cache_config_file(tmp_path)
    runs = {ckpt: _start(processes, extract_args(synth_root, ckpt, out, config), tmp_path / ckpt.parent.name)
            for ckpt in (teacher_ckpt, other_teacher)}
    codes = {}
    for ckpt, process in runs.items():
        process.join(180)
        codes[ckpt] = process.exitcode
    winners = [ckpt for ckpt, code in codes.items() if code == 0]
    assert len(winners) == 1, codes
    loser = next(ckpt for ckpt in runs if ckpt != winners[0])
    assert codes[loser] == 2
    message = error_paragraph(Path(f"{tmp_path / loser.parent.name}.err").read_text())
    assert "is being written by another extraction" in message or "was made for something else" in message, message
    report = verify(out)
    assert report.ok, report.problems   # the row digests tie every row to the winner's fingerprint
    assert _teacher_sha(out) == _file_sha(winners[0])


def test_ctrl_c_of_a_dask_extraction_prints_one_line_and_the_store_resumes(
        synth_root: Path, teacher_ckpt: Path, cache: Path, tmp_path: Path) -> None:
    """SIGINT to the whole process group, as a terminal's Ctrl-C sends it: the command, the dask nanny and workers."""
    out = tmp_path / "cache.zarr"
    argv = [str(BIN / "stxd-cache"), *extract_args(synth_root, teacher_ckpt, out, cache_config_file(tmp_path)),
            "--workers", "2"]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 180
    while _done_rows(out) < 1:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no row done within 180 s"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert re.fullmatch(rf"interrupted: \d+ of {SAMPLES} rows of {out} are written; re-run the same command to "
                        "resume from there", lines[0]), lines[0]
    resumed = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_store(cache, out)
