"""`model.load_from`: initialise a whole camera student from a checkpoint of another layout.

Three layouts are recognised from the keys:

- a stxd student (`RUN/student.pt` or a training checkpoint): keys as the student's own (`image_encoder.*`, `head.*`,
  the view transform), taken as they are;
- an mmdetection3d-style detector (BEVFormer, FCOS3D, DETR3D, ...): `img_backbone.*` / `backbone.*` go to the
  student's ResNet (`image_encoder.backbone.*`) and `img_neck.*` / `neck.*` to its FPN (`image_encoder.neck.*`);
  mmdet's FPN keys (`lateral_convs.i.conv`, `fpn_convs.i.conv`) are the student's own;
- a torchvision ResNet (`conv1.weight`, `layer1.*`, `fc.*`): into `image_encoder.backbone.*`; its classifier
  `fc.*` and the stages a truncated ResNet lacks are not part of any student and are always left out.

A file key that maps to no student key, or to one of another shape (DCN offsets, a foreign head, another width), is
refused unless `model.load_from_strict` is false, which skips it; the report lists what was loaded, skipped and
left at its initial value.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipelines.errors import ConfigError, torch_load_reason

#: (file prefix, student prefix) of the mmdetection3d layout, tried in order.
MMDET_PREFIXES = (("img_backbone.", "image_encoder.backbone."), ("img_neck.", "image_encoder.neck."),
                  ("backbone.", "image_encoder.backbone."), ("neck.", "image_encoder.neck."))
_SHOWN = 4


@dataclass(frozen=True)
class LoadReport:
    """What `load_from` did: the layout it recognised, the student keys it set, the file keys it skipped (with the
    reason) and the student keys left at their initial value."""

    path: str
    layout: str
    loaded: list[str]
    skipped: dict[str, str]
    initial: list[str]

    def lines(self) -> list[str]:
        """The report as a few lines for the console and the run folder."""
        out = [f"load_from {self.path} ({self.layout} layout): {len(self.loaded)} tensors loaded, {len(self.skipped)} "
               f"skipped, {len(self.initial)} left at their initial value"]
        if self.skipped:
            out.append("  skipped: " + _listing([f"{k} ({why})" for k, why in self.skipped.items()]))
        if self.initial:
            out.append("  initial: " + _listing(_modules(self.initial)))
        return out


def read_state(path: str | Path, *, what: str = "model.load_from") -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file (read with `weights_only=True`): a bare state dict, or the `state_dict`
    or `model` entry of a dict (stxd's `student.pt` and training checkpoints, mmdet and torchvision files);
    `module.` prefixes stripped. Errors name the file as `what` (the config field that gave it)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path}: no such file; give the path of a checkpoint (a stxd student.pt, an "
                          "mmdetection3d .pth or a torchvision ResNet .pth)")
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as exc:
        raise ConfigError(f"{what} {path}: torch.load(weights_only=True) cannot read it ({torch_load_reason(exc)}); "
                          "expected a checkpoint of tensors only, such as torchvision's resnet*.pth (re-save a "
                          "foreign one as a plain state dict)") from None
    if isinstance(obj, Mapping):
        for entry in ("state_dict", "model"):
            if isinstance(obj.get(entry), Mapping):
                obj = obj[entry]
                break
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, Mapping) else {}
    if not tensors:
        raise ConfigError(f"{what} {path}: found no tensors (a {type(obj).__name__}); expected a state dict or a "
                          "dict with a 'state_dict' or 'model' entry")
    return {k.removeprefix("module."): v for k, v in tensors.items()}


def map_keys(keys: list[str], own: Mapping[str, Any]) -> tuple[str, dict[str, str | None]]:
    """(layout, {file key: student key, or None when the layout has no place for it})."""
    if any(k.startswith("image_encoder.") for k in keys):
        return "stxd", {k: k for k in keys}
    if any(k.startswith(("img_backbone.", "backbone.", "img_neck.")) for k in keys):
        mapped: dict[str, str | None] = {}
        for key in keys:
            mapped[key] = next((new + key[len(old):] for old, new in MMDET_PREFIXES if key.startswith(old)), None)
        return "mmdetection3d", mapped
    if "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys):
        return "torchvision", {k: f"image_encoder.backbone.{k}" for k in keys}
    return "unknown", {k: None for k in keys}


def _expected_absence(layout: str, key: str, student: nn.Module) -> bool:
    """Keys of a torchvision classification ResNet that no student has: the classifier and truncated stages."""
    if layout != "torchvision":
        return False
    stage = re.match(r"layer(\d+)\.", key)
    stages = getattr(getattr(getattr(student, "image_encoder", None), "backbone", None), "num_stages", 4)
    return key.startswith("fc.") or (stage is not None and int(stage.group(1)) > stages)


def load_from(student: nn.Module, path: str | Path, *, strict: bool = True) -> LoadReport:
    """Load the checkpoint at `path` into `student` (see the module docs); returns what was done. With `strict`,
    a file key that cannot be used raises `ConfigError` before anything is loaded."""
    state = read_state(path)
    own = student.state_dict()
    layout, mapping = map_keys(list(state), own)
    if layout == "unknown":
        raise ConfigError(f"model.load_from {path}: its keys ({_listing(list(state))}) are none of the layouts stxd "
                          "reads: a stxd student (image_encoder.*), mmdetection3d (img_backbone.* / backbone.*, "
                          "img_neck.* / neck.*) or a torchvision ResNet (conv1.*, layer1.*)")
    loaded: dict[str, torch.Tensor] = {}
    skipped: dict[str, str] = {}
    for key, target in mapping.items():
        value = state[key]
        if _expected_absence(layout, key, student):
            continue
        if target is None or target not in own:
            skipped[key] = "no such student key" if target is None else f"no student key {target}"
        elif value.shape != own[target].shape:
            skipped[key] = f"shape {tuple(value.shape)}, the student's {target} is {tuple(own[target].shape)}"
        else:
            loaded[target] = value
    if not loaded:
        raise ConfigError(f"model.load_from {path} ({layout} layout): none of its {len(state)} tensors fits this "
                          f"student ({_listing([f'{k} ({why})' for k, why in skipped.items()])}); check that the "
                          "checkpoint is of this architecture and width")
    if skipped and strict:
        raise ConfigError(f"model.load_from {path} ({layout} layout): {len(skipped)} of its tensors cannot be used by "
                          f"this student: {_listing([f'{k} ({why})' for k, why in skipped.items()])}. Set "
                          "model.load_from_strict: false to skip them (e.g. DCN offsets or another detector's head), "
                          "or give a checkpoint of this architecture")
    student.load_state_dict(loaded, strict=False)
    initial = [k for k in own if k not in loaded and not k.endswith("num_batches_tracked")]
    return LoadReport(path=str(path), layout=layout, loaded=sorted(loaded), skipped=skipped, initial=initial)


def _modules(keys: list[str]) -> list[str]:
    """Parameter names grouped by their top two modules, e.g. `head.task_heads (36 tensors)`."""
    groups: dict[str, int] = {}
    for key in keys:
        prefix = ".".join(key.split(".")[:2])
        groups[prefix] = groups.get(prefix, 0) + 1
    return [f"{p} ({n} tensors)" for p, n in groups.items()]


def _listing(items: list[str]) -> str:
    head = ", ".join(items[:_SHOWN])
    return head if len(items) <= _SHOWN else f"{head} and {len(items) - _SHOWN} more"
