"""Faults around `stxd-train fit`: a run SIGKILLed after a checkpoint and resumed through the CLI matches an
uninterrupted run exactly; a damaged or unfinished teacher cache is refused with a one-paragraph error that
names the sample, never trained on and never left looking like a finished run; a full disk and a non-finite
loss stop the run with the file or the samples named and the way on."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from stxd_cache.store import open_cache
from stxd_train.cli import main as train_main
from stxd_train.engine import ResumableSampler
from tiny import BIN, cli_error, flip_byte_of_row, shard_path, tiny_student

VERSION = "v1.0-synth"
DISTILL = {"terms": ["cd", "td", "rd"], "alpha_cd": 0.1, "k": 2}
#: Fields of a metrics line that do not depend on the wall clock.
LOGGED = ("step", "epoch", "lr", "loss", "terms", "grad_norm")


def _student_config(tmp_path: Path, **train: object) -> Path:
    raw = tiny_student("bevformer")
    raw["distill"] = DISTILL
    raw["train"].update(train)
    path = tmp_path / "student.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _fit_command(config: Path, root: Path, cache: Path, out: Path, *extra: str) -> list[str]:
    return [str(BIN / "stxd-train"), "fit", "--config", str(config), "--dataroot", str(root), "--version", VERSION,
            "--out", str(out), "--cache", str(cache), "--device", "cpu", *extra]


def _env() -> dict[str, str]:
    # One thread: the CPU kernels then reduce in one fixed order in every process.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def _metrics(run: Path) -> list[dict]:
    return [{k: line[k] for k in LOGGED} for line in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def _kill_after_checkpoint(command: list[str], run: Path, timeout: float = 240.0) -> int:
    """Start `command`, SIGKILL it as soon as `run/checkpoints/last.pt` exists; the step that checkpoint holds."""
    last = run / "checkpoints" / "last.pt"
    proc = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while not last.exists():
            if proc.poll() is not None:
                pytest.fail(f"fit ended (exit {proc.returncode}) before its first checkpoint: {proc.stderr.read()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no checkpoint after {timeout} s")
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    return int(torch.load(last, weights_only=True)["step"])


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path: Path, synth_root: Path, cache: Path) -> None:
    """Real processes through the CLI: the killed run loses the steps after its checkpoint; `--resume` continues
    from it. Losses, every term, learning rates and gradient norms of every step, and the final weights, are
    compared for exact equality: both processes run the same deterministic single-thread CPU kernels from
    bit-identical states (model, optimizer, schedule, sampler and RNGs restored from the checkpoint), and JSON
    keeps every float32 value exactly, so no rounding difference can arise; any difference is a resume bug."""
    config = _student_config(tmp_path, max_steps=8, checkpoint_every=2, log_every=1)
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    done = subprocess.run(_fit_command(config, synth_root, cache, reference), env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    step = _kill_after_checkpoint(_fit_command(config, synth_root, cache, killed), killed)
    assert step in (2, 4, 6), step
    assert not (killed / "student.pt").exists()   # killed before the end: the run does not look finished
    logged = [line["step"] for line in _metrics(killed)]
    assert logged[:step] == list(range(1, step + 1))   # lines past the checkpoint (if any) are lost work

    resumed = subprocess.run(_fit_command(config, synth_root, cache, killed, "--resume"), env=_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = _metrics(reference), _metrics(killed)
    assert [m["step"] for m in got] == list(range(1, 9))
    assert set(got[-1]["terms"]) == {"loss_heatmap", "loss_bbox", "loss_cd", "loss_td", "loss_rd"}
    assert got[step:] == want[step:], f"resumed after step {step}"
    assert got == want
    a = torch.load(reference / "student.pt", weights_only=True)
    b = torch.load(killed / "student.pt", weights_only=True)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert all(torch.equal(a["adapter"][k], b["adapter"][k]) for k in a["adapter"])


# ------------------------------------------------------------------------------------------- damaged caches


def _fit_fails(*args: object) -> str:
    """Run `stxd-train fit` in this process; it must exit 2 with one paragraph and no traceback (a progress bar
    of the steps that ran may precede it on stderr). The message, unwrapped from the terminal width."""
    return cli_error(train_main, "fit", *args)


def _flip_byte(store: Path, row: int, rows_per_shard: int) -> None:
    flip_byte_of_row(store / "bev", row, rows_per_shard)


def _delete_shard(store: Path, row: int, rows_per_shard: int) -> None:
    shard_path(store / "bev", row, rows_per_shard).unlink()


def _truncate_shard(store: Path, row: int, rows_per_shard: int) -> None:
    shard = shard_path(store / "bev", row, rows_per_shard)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


CORRUPTIONS: dict[str, Callable[[Path, int, int], None]] = {
    "flipped_byte": _flip_byte, "deleted_shard": _delete_shard, "truncated_shard": _truncate_shard}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_cache_is_refused_naming_the_sample(corruption: str, tmp_path: Path, synth_root: Path, cache: Path,
                                                    train_index) -> None:
    """A damaged `bev` shard of a training sample that is not the first one, so that it is read by a DataLoader
    worker process: fit stops with the sample's token (at start-up for an absent object, which zarr would read
    as zeros; at the first read for a chunk that fails its checksum), and no `student.pt` is written."""
    store = tmp_path / "cache.zarr"
    shutil.copytree(cache, store)
    reader = open_cache(store)
    per_shard = reader.meta.layout.rows_per_shard
    rows = [reader.index_of(t) for t in train_index.tokens]
    first = rows[0] // per_shard        # `fit` reads the first sample itself, before any worker starts
    candidates = [r for r in rows if r // per_shard != first]
    target = candidates[len(candidates) // 2]
    shard_tokens = {reader.tokens[r] for r in rows if r // per_shard == target // per_shard}
    CORRUPTIONS[corruption](store, target, per_shard)

    raw = tiny_student("bevformer")
    raw["distill"] = DISTILL
    raw["data"]["num_workers"] = 1
    config = tmp_path / "student.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    message = _fit_fails("--config", config, "--dataroot", synth_root, "--version", VERSION, "--out", out,
                         "--cache", store, "--device", "cpu")
    assert str(store) in message and "`bev`" in message and "re-extract" in message
    named = {t for t in reader.tokens if t in message}
    assert named and named <= shard_tokens, (named, shard_tokens)
    if corruption == "flipped_byte":
        assert named == {reader.tokens[target]}
        assert "cannot be decoded" in message and message.endswith("(raised in DataLoader worker process 0)")
    elif corruption == "deleted_shard":
        # the first three rows of the shard are named, then "and 1 more"
        assert len(named) == min(3, len(shard_tokens))
        assert "lacks 1 stored object" in message and "read them as zeros" in message
        assert not out.exists()   # refused before anything was written
    else:
        assert "cannot be decoded" in message
    assert not (out / "student.pt").exists()


def test_unfinished_cache_is_refused_at_start_up(tmp_path: Path, synth_root: Path, cache: Path) -> None:
    """Every row written but `complete` false (finalize never ran): fit names the cache and the next step."""
    store = tmp_path / "cache.zarr"
    shutil.copytree(cache, store)
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["stxd"]["complete"] = False
    (store / "zarr.json").write_text(json.dumps(meta))
    config = _student_config(tmp_path)
    out = tmp_path / "run"
    message = _fit_fails("--config", config, "--dataroot", synth_root, "--version", VERSION, "--out", out,
                         "--cache", store, "--device", "cpu")
    assert f"cache {store} is not complete (every row done, finalize not run)" in message
    assert "re-run the same `stxd-cache extract` to finish it" in message
    assert not out.exists()


# ----------------------------------------------------------------------------------- a full disk, a NaN loss


def _fit_args(config: Path, root: Path, cache: Path, out: Path, *extra: str) -> list[object]:
    return ["--config", config, "--dataroot", root, "--version", VERSION, "--out", out, "--cache", cache,
            "--device", "cpu", *extra]


@pytest.mark.parametrize(("target", "failing_save"), [("last.pt", 2), ("student.pt", 1)],
                         ids=["second-checkpoint", "student-file"])
def test_a_full_disk_fails_cleanly_then_resume_finishes_the_run(target: str, failing_save: int, tmp_path: Path,
                                                                synth_root: Path, cache: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC from `torch.save` into `target` (after a few bytes are written) from its `failing_save`-th write on: fit
    stops with a one-paragraph error that names the file and the next step, leaves no partial or temporary file,
    and `--resume` then finishes the run from the last checkpoint."""
    real_save, saves = torch.save, []

    def save(obj: object, f: object, *args: object, **kwargs: object) -> None:
        if Path(getattr(f, "name", str(f))).name.startswith(f".{target}."):
            saves.append(1)
            if len(saves) >= failing_save:   # a full disk stays full
                f.write(b"the first bytes")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, f, *args, **kwargs)

    config = _student_config(tmp_path, max_steps=4, checkpoint_every=2)
    run = tmp_path / "run"
    monkeypatch.setattr(torch, "save", save)
    message = _fit_fails(*_fit_args(config, synth_root, cache, run))
    monkeypatch.undo()
    path = run / "checkpoints" / "last.pt" if target == "last.pt" else run / "student.pt"
    assert message.startswith(f"writing {path} failed: the disk is full ([Errno 28] No space left on device); free "
                              f"space on the disk that holds {path.parent} (old runs, `checkpoints/step_*.pt` copies")
    assert message.endswith("then continue the run with the same command and --resume: it starts again from the "
                            "run's last checkpoint, checkpoints/last.pt, which a failed write leaves as it was")
    assert not (run / "student.pt").exists()
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]
    assert int(torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"]) == (2 if target == "last.pt"
                                                                                             else 4)
    seconds = (run / "train_seconds.txt").read_text() if target == "student.pt" else None

    result = CliRunner().invoke(train_main, ["fit", *map(str, _fit_args(config, synth_root, cache, run, "--resume"))])
    assert result.exit_code == 0, result.output
    assert [line["step"] for line in _metrics(run)] == [1, 2, 3, 4]
    assert int(torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"]) == 4
    assert set(torch.load(run / "student.pt", weights_only=True)) == {"config", "state_dict", "adapter"}
    if seconds is not None:   # the resume trained no step: the time of the run that did is kept
        assert (run / "train_seconds.txt").read_text() == seconds


@pytest.mark.parametrize("checkpoint_every", [1, 100], ids=["after-a-checkpoint", "before-any-checkpoint"])
def test_a_non_finite_loss_names_the_samples_and_the_cache(checkpoint_every: int, tmp_path: Path, synth_root: Path,
                                                           cache: Path, train_index) -> None:
    """An absurd learning rate blows the weights up in step 1, so the loss of step 2 is not finite: the error names
    that batch's samples and the command that verifies the cache, and offers --resume only when a checkpoint
    exists."""
    config = _student_config(tmp_path, max_steps=4, checkpoint_every=checkpoint_every)
    run = tmp_path / "run"
    message = _fit_fails(*_fit_args(config, synth_root, cache, run, "--set", "optim.lr=1.0e+30"))
    # The second batch of epoch 0: what the sampler that fit builds gives.
    order = ResumableSampler(len(train_index), batch_size=2, shuffle=True, seed=0, drop_last=True).order(0)
    tokens = [train_index.tokens[i] for i in order[2:4]]
    assert message.startswith("step 2 (epoch 0, batch 1 of the epoch): loss term(s) ")
    assert (f"Check this batch's inputs and targets (sample(s) {tokens[0]}, {tokens[1]}); its teacher records come "
            f"from the cache {cache}: check them with `stxd-cache verify {cache}`; lower optim.lr") in message
    assert {t for t in train_index.tokens if t in message} == set(tokens)
    last = run / "checkpoints" / "last.pt"
    if checkpoint_every == 1:
        assert message.endswith(f"the last checkpoint {last} is intact: continue from it with --resume")
    else:
        assert "--resume" not in message and not last.exists()
        assert message.endswith("so there is nothing to resume: train again from the start")
    assert not (run / "student.pt").exists()
