"""Teacher checkpoints: the native format (state dict + config dict), and the loader that also accepts
mmdet3d and OpenPCDet CenterPoint checkpoints through explicit key maps (`convert.py`).

Every file is read with `torch.load(weights_only=True)`; a checkpoint that needs full unpickling is
refused unless the caller passes `trust=True` (`--trust-checkpoint`), because unpickling runs code.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipelines.config import from_dict, to_dict
from pipelines.errors import CheckpointError, torch_load_reason

NATIVE_FORMAT = "stxd-teacher/1"


@dataclass(frozen=True)
class LoadedTeacher:
    """A teacher ready for inference, with the config it was built from and the file's sha256."""

    model: Any            # stxd_cache.teacher.model.CenterPoint
    config: Any           # stxd_cache.teacher.config.TeacherConfig
    sha256: str
    source_format: str    # "native", "mmdet3d" or "openpcdet"


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_teacher(model: torch.nn.Module, config: Any, path: str | Path) -> str:
    """Write a native checkpoint atomically (synced to disk before it replaces `path`); returns its sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": NATIVE_FORMAT, "config": to_dict(config), "state_dict": state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return sha256_file(path)


def read_checkpoint(path: str | Path, *, trust: bool = False, written_by: str | None = None) -> dict[str, Any]:
    """The raw checkpoint dict, read safely.

    written_by: the stxd command that exported `path` (e.g. "`stxd-train teacher`" for RUN/teacher.pt), when the
        caller reads its own export: a file that safe loading refuses was then altered, and trusting it is not
        offered.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"teacher checkpoint {path} does not exist; train one with `stxd-train teacher` "
                              "or pass the path of an existing .pt/.pth file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as exc:
        if trust:
            raise CheckpointError(f"teacher checkpoint {path} cannot be unpickled: {exc}") from None
        refused = (f"teacher checkpoint {path} holds objects that safe loading refuses ({torch_load_reason(exc)}); "
                   "it was not unpickled, so none of its code ran")
        if written_by is not None:
            raise CheckpointError(f"{refused}. {written_by} writes it with tensors and plain values only, so the "
                                  f"file was altered or replaced: write it again with {written_by} (the run's own "
                                  "command with --resume rewrites it from the run's last checkpoint)") from None
        raise CheckpointError(f"{refused}. If you trust the file, pass --trust-checkpoint to unpickle it (this can "
                              "run code)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"teacher checkpoint {path} is corrupt or not a torch checkpoint "
                              f"({torch_load_reason(exc)}); re-download or re-export it") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"teacher checkpoint {path} holds a {type(data).__name__}, expected a dict with a "
                              "state dict")
    return data


def load_teacher_config(path: str | Path) -> Any:
    """The `TeacherConfig` of a teacher YAML: the `model:` section of a run config, or a bare model config."""
    from pipelines.config import read_yaml
    from stxd_cache.teacher.config import TeacherConfig

    data = read_yaml(path)
    return from_dict(TeacherConfig, data["model"] if "model" in data else data, where=f"{path}:model")


def detect_format(data: dict[str, Any]) -> str:
    """'native', 'mmdet3d' or 'openpcdet', from the checkpoint's keys."""
    if data.get("format") == NATIVE_FORMAT:
        return "native"
    if isinstance(data.get("model_state"), dict):
        return "openpcdet"
    state = data.get("state_dict", data)
    if isinstance(state, dict) and any(str(k).startswith(("pts_middle_encoder.", "pts_backbone.")) for k in state):
        return "mmdet3d"
    return "unknown"


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` into `model`, listing every missing, unexpected and mis-shaped key on failure."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        def show(items: list[str]) -> str:
            return ", ".join(items[:12]) + (f" … ({len(items)} in all)" if len(items) > 12 else "")

        parts = [f"{name} keys: {show(items)}" for name, items in
                 (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)) if items]
        raise CheckpointError(f"{source} does not fit the teacher architecture; " + "; ".join(parts)
                              + ". Check that the teacher config matches the checkpoint (widths, tasks, grid)")
    model.load_state_dict(state, strict=True)


def load_teacher(path: str | Path, *, device: torch.device | str = "cpu", config_path: str | Path | None = None,
                 trust: bool = False, written_by: str | None = None) -> LoadedTeacher:
    """Build the teacher and load its weights from a native, mmdet3d or OpenPCDet checkpoint.

    Native checkpoints carry their config; for mmdet3d and OpenPCDet ones, `config_path` names the
    teacher YAML (e.g. configs/teacher/centerpoint_nus.yaml) that describes the same architecture.
    `written_by`: see `read_checkpoint`.
    """
    from stxd_cache.teacher.config import TeacherConfig
    from stxd_cache.teacher.model import build_teacher

    data = read_checkpoint(path, trust=trust, written_by=written_by)
    fmt = detect_format(data)
    if fmt == "unknown":
        raise CheckpointError(f"teacher checkpoint {path} is not a stxd, mmdet3d or OpenPCDet CenterPoint "
                              f"checkpoint (top-level keys: {', '.join(sorted(map(str, data))[:8])})")
    if config_path is not None:
        cfg = load_teacher_config(config_path)
    elif fmt == "native":
        cfg = from_dict(TeacherConfig, data["config"], where=f"{path}:config")
    else:
        raise CheckpointError(f"teacher checkpoint {path} is a {fmt} checkpoint without a stxd config; pass "
                              "--teacher-config with the matching YAML (e.g. configs/teacher/centerpoint_nus.yaml)")
    model = build_teacher(cfg, device=device)   # spconv's algorithm is chosen for this device
    if fmt == "native":
        state = data["state_dict"]
    else:
        from stxd_cache.teacher import convert

        state = convert.from_mmdet3d(data, model) if fmt == "mmdet3d" else convert.from_openpcdet(data, model)
    load_state_strict(model, state, f"teacher checkpoint {path} ({fmt})")
    return LoadedTeacher(model=model, config=cfg, sha256=sha256_file(path), source_format=fmt)
