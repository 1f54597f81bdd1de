"""Checkpoint files: atomic writes, safe loading, RNG state capture, and the run's `config.yaml`.

Layout of a run folder: `checkpoints/last.pt` (always the newest), optional `checkpoints/step_XXXXXX.pt`
copies, `config.yaml`, `metrics.jsonl` and `tb/`. What goes inside a checkpoint is the trainer's
business (`Trainer.state_dict`); this module only writes and reads it. Every file of a run is written through
`atomic_write`, whose `CheckpointWriteError` says what to free when the disk is full.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import random
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, TypeVar

import numpy as np
import torch
import yaml

from pipelines.errors import CheckpointError, torch_load_reason
from stxd_train.configs import RUN_KEYS, load_run_config  # noqa: F401  (re-exported)
from stxd_train.engine.distributed import is_main_process

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.pt"
#: The next step after a failed write of a training run's file.
RESUME_ADVICE = ("then continue the run with the same command and --resume: it starts again from the run's last "
                 "checkpoint, checkpoints/last.pt, which a failed write leaves as it was")
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
T = TypeVar("T")


class CheckpointWriteError(CheckpointError):
    """A checkpoint or another file of a run cannot be written: a full disk, a read-only or unmounted folder."""


@contextlib.contextmanager
def write_errors(path: str | Path, *, then: str = RESUME_ADVICE) -> Iterator[None]:
    """Turn an `OSError` raised while writing `path` into a `CheckpointWriteError` that names the file, the cause,
    what to free or fix, and `then`, the next step (default: resume the run)."""
    try:
        yield
    except OSError as exc:
        if exc.errno in _DISK_FULL:
            cause = "the disk is full"
            fix = (f"free space on the disk that holds {Path(path).parent} (old runs, `checkpoints/step_*.pt` "
                   "copies, caches no longer used)")
        else:
            cause, fix = "the file system refused it", "fix that (permissions, a read-only or unmounted disk)"
        raise CheckpointWriteError(f"writing {path} failed: {cause} ({exc}); {fix}, {then}") from exc


def checkpoint_dir(out_dir: str | Path) -> Path:
    """Folder of a run's checkpoints."""
    return Path(out_dir) / CHECKPOINT_DIR


def step_checkpoint_name(step: int) -> str:
    """File name of the kept copy after `step` optimizer steps."""
    return f"step_{step:06d}.pt"


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None], *, then: str = RESUME_ADVICE) -> Path:
    """Write `path` through `write(file)` into a temporary file of the same folder, then rename it.

    Readers see the old file or the complete new one, never a partial one; on failure the temporary
    file is removed and the old file stays as it was. An `OSError` (a full disk, ...) becomes a
    `CheckpointWriteError` whose advice ends with `then`.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with write_errors(path, then=then):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str, *, then: str = RESUME_ADVICE) -> Path:
    """`atomic_write` of a UTF-8 text."""
    return atomic_write(path, _bytes_writer(text.encode()), then=then)


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not every platform can open a folder.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _bytes_writer(data: bytes) -> Callable[[IO[bytes]], None]:
    def write(f: IO[bytes]) -> None:
        f.write(data)

    return write


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> Path:
    """Write `state` with `torch.save`, atomically."""
    return atomic_write(path, lambda f: torch.save(dict(state), f))


def keep_copy(src: str | Path, dst: str | Path) -> Path:
    """Keep `src` as `dst` too: a hard link (free; `src` is later replaced, not rewritten) or a copy."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        return atomic_write(dst, _bytes_writer(src.read_bytes()))
    os.replace(tmp, dst)
    return dst


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint onto the CPU (tensors only, no arbitrary pickled objects)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {path}: nothing to resume; train without --resume to start this run, "
            "or point the output folder at a run that has one"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"checkpoint {path} holds objects that safe loading refuses ({torch_load_reason(exc)}); "
                              "it was not unpickled, so none of its code ran. stxd-train writes checkpoints of "
                              "tensors and plain values only, so this file was altered or not written by it: resume "
                              f"from another file in {path.parent}, or start a new run") from exc
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read ({torch_load_reason(exc)}); "
                              f"resume from another file in {path.parent}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, expected a dict")
    return state


def capture_rng_state() -> dict[str, Any]:
    """This process's Python, NumPy, torch CPU and current-CUDA-device generator states, as plain types and tensors."""
    # The legacy global NumPy generator on purpose: it is what third-party augmentation code draws from.
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # noqa: NPY002
    return {
        "python": random.getstate(),
        "numpy": [kind, np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        # The current device only: asking for every device would create a CUDA context on each GPU of the node.
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Undo `capture_rng_state` (the CUDA state goes to the current device)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_run_config(out_dir: str | Path, cfg: Mapping[str, Any]) -> Path:
    """Write the resolved config as `out_dir/config.yaml`, atomically and on rank 0 only."""
    path = Path(out_dir) / "config.yaml"
    if is_main_process():
        atomic_write_text(path, yaml.safe_dump(dict(cfg), sort_keys=False))
    return path


#: Run-config fields a resumed run may change: how it is logged or loaded, and `train.max_steps` to extend a
#: run (the schedule's horizon then becomes the new length).
RESUMABLE_CHANGES = frozenset({"train.checkpoint_every", "train.log_every", "data.num_workers", "train.max_steps"})


def config_changes(saved: Mapping[str, Any], config: Mapping[str, Any], *,
                   allowed: frozenset[str] = RESUMABLE_CHANGES) -> list[str]:
    """The dotted fields, outside `allowed`, where a run's saved config differs from `config` (sorted), each as
    "field: run has X, now Y"."""
    import json

    from pipelines.config import flatten

    old, new = flatten(dict(saved)), flatten(json.loads(json.dumps(dict(config))))
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in allowed)
    return [f"{k}: run has {old.get(k)!r}, now {new.get(k)!r}" for k in changed]


def check_run_config(out_dir: str | Path, config: Mapping[str, Any]) -> None:
    """Refuse to resume the run in `out_dir` with a config other than its `config.yaml` (fields in
    `RESUMABLE_CHANGES` aside); the error names the fields that differ."""
    from pipelines.config import read_yaml
    from pipelines.errors import ConfigError

    out_dir = Path(out_dir)
    path = out_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"cannot resume {out_dir}: {path} does not exist (the run never started); start it "
                          "without --resume")
    changed = config_changes(read_yaml(path), config)
    if changed:
        listing = "; ".join(changed[:6])
        raise ConfigError(f"cannot resume {out_dir} with another config ({len(changed)} field(s) differ: {listing}); "
                          f"resume with `--config {path}` (its run config) and the run's own --dataroot, --version "
                          "and teacher option (--cache or --teacher-online), or train into a new --out")
