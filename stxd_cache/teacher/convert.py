"""Key maps that turn mmdet3d and OpenPCDet CenterPoint checkpoints into the teacher's state dict.

`checkpoint.load_teacher` calls `from_mmdet3d` / `from_openpcdet` with the raw checkpoint dict and the built
`CenterPoint`, then `load_state_strict` checks the result. Every rule is a `Rule` (source key → our key, and what
to do with the tensor); `mmdet3d_key_map` / `openpcdet_key_map` list them. Facts below were read in the public
sources named in brackets.

**Names.** Our modules mirror mmdet3d's, so an mmdet3d key is ours with the detector's prefix swapped
(`MMDET3D_PREFIXES`) [mmdet3d `middle_encoders/sparse_encoder.py`, `layers/sparse_block.py`, `backbones/second.py`,
`necks/second_fpn.py`, `dense_heads/centerpoint_head.py`]. OpenPCDet names differ module by module:

- `VoxelResBackBone8x` [pcdet `backbones_3d/spconv_backbone.py`] is the same layer sequence as mmdet3d's
  `basicblock` SparseEncoder of CenterPoint nuScenes, grouped differently: OpenPCDet *starts* stages 2-4 with the
  stride-2 conv, mmdet3d *ends* stages 1-3 with it (`OPENPCDET_ENCODER_MODULES`). Its table is fixed, like
  OpenPCDet's class: any other encoder layout leaves our extra keys missing and its extra keys unexpected.
- `BaseBEVBackbone` [pcdet `backbones_2d/base_bev_backbone.py`] starts every block with `nn.ZeroPad2d(1)` and an
  unpadded conv, which equals our padded conv: its layer j + 1 is our layer j. Its stride-1 deblock is a 1x1
  `ConvTranspose2d` (weight (in, out, 1, 1)) where ours, like mmdet3d's `use_conv_for_no_stride=True`, is a 1x1
  `Conv2d` (weight (out, in, 1, 1)); the two compute the same map with the weight's first two axes swapped.
- `CenterHead` [pcdet `dense_heads/center_head.py`]: `shared_conv.{0,1}` and `heads_list.i.<name>.j.{0,1}` are
  (conv, BN), ours `conv`/`bn`; outputs `center`, `center_z`, `hm` are our `reg`, `height`, `heatmap`.
- `vfe` (MeanVFE) and `map_to_bev` (HeightCompression) have no tensors; `global_step`, the training-step counter of
  `Detector3DTemplate`, is dropped explicitly (`OPENPCDET_IGNORED_KEYS`).

**Conv biases before BatchNorm (OpenPCDet).** OpenPCDet's `SparseBasicBlock` convs always have a bias
(`bias = norm_fn is not None`), and with `USE_BIAS_BEFORE_NORM: True` (cbgs_voxel0075_res3d_centerpoint) so do the
head's shared conv and hidden convs; ours have none. Each such bias b feeds only a BatchNorm, so it is folded into
that BN: running_mean - b. This is exact in eval (BN is per-channel affine in x + b - mean) and in training (batch
statistics cancel b). A bias without its BN, or of another shape, stays an unexpected key.

**Sparse kernels.** Our spconv 2.3 stores `SubMConv3d` / `SparseConv3d` weights as (out, kD, kH, kW, in) ("KRSC",
`ALL_WEIGHT_IS_KRSC = True` in `spconv/constants.py`, used by `spconv/pytorch/conv.py` for every algorithm), kD
along z, in torch's cross-correlation order (checked against `F.conv3d` on a dense grid). spconv 1.x, mmdet3d's
own ops (< 1.0.0rc1) and mmcv's store (kD, kH, kW, in, out) [mmdet3d `ops/spconv/conv.py`]; mmdet3d >= 1.0.0rc2
with spconv 2 installed saves KRSC and permutes older weights on load [mmdet3d
`layers/spconv/overwrite_spconv/write_spconv2.py`]; OpenPCDet runs on either spconv. So the layout is decided by
shape: KRSC is kept, (kD, kH, kW, in, out) is permuted, anything else raises `CheckpointError` listing every such
key with both accepted shapes. The shapes coincide only when in = out = every kernel size (never in CenterPoint);
then the mmdet3d state dict's `_metadata` module version decides (2 = saved by spconv 2), else mmdet3d is read in
the mmcv layout and OpenPCDet in KRSC. spconv 2.0/2.1's native (kD, kH, kW, out, in) layout cannot be told from
the mmcv one when in = out and is not supported. If `SPCONV_SAVED_WEIGHT_LAYOUT` is set, spconv would permute our
KRSC tensors again while loading, so conversion refuses.

**Head outputs.** Ours: `dim` = log(w, l, h), `rot` = (sin θ, cos θ), θ about +z, 0 along +x (nuScenes yaw in the
LiDAR frame, `pipelines/boxes.py`); `reg`, `height`, `vel` and `heatmap` already agree with both sources (offset
from the cell's lower corner in cells, gravity-centre z, LiDAR-frame vx, vy, one channel per task class in task
order). The final conv's output channels (weight rows and bias entries) are permuted, so the converted model
emits our convention exactly:

- mmdet3d >= 1.0.0rc0 ("coordinate system refactor", PR #677; docs `compatibility.md`): LiDAR boxes are (x_size,
  y_size, z_size) = (l, w, h) and yaw is the nuScenes yaw (`nuscenes_converter.py` writes `dims[:, [1, 0, 2]]`,
  `rots`); `get_targets_single` regresses log(box[3:6]) and (sin, cos) of box[6]. So `dim` rows 0 and 1 swap,
  `rot` is kept.
- mmdet3d 0.x: boxes are (w, l, h) with yaw φ = -θ - π/2 (`nuscenes_converter.py`: `dims`, `-rots - np.pi / 2`).
  `dim` is kept; (sin φ, cos φ) = (-cos θ, -sin θ), so our rot = (-row 1, -row 0) (the same map mmdet3d's own
  DETR3D project README gives for its old checkpoints).
- OpenPCDet: (dx, dy, dz) = (l, w, h), heading = nuScenes yaw (`nuscenes_utils.fill_trainval_infos`), targets
  log(dx, dy, dz) and (cos, sin) (`assign_target_of_single_head`). `dim` rows 0, 1 swap and `rot` rows swap.

Which mmdet3d convention applies: the `mmdet3d_version` argument if given, else `meta["mmdet3d_version"]` (written
by the mmcv-runner `tools/train.py` of mmdet3d < 1.1; mmengine-based checkpoints are not known to record it), else
the current (>= 1.0) one. Major version 0 means the old convention, with a warning, because the official
"v1.0.0_models" CenterPoint files are dated 2021-08, before 1.0.0rc0, and may record a 0.x version although they
use the new boxes (mmdet3d issue #1596); forks built on mmdet3d 0.x may also have changed the boxes. Pass
`mmdet3d_version` when in doubt.

**Missing and unexpected keys.** Our keys without a source tensor are left out and source tensors that no rule uses
are kept under their own name (prefixed `<source>:` if that name is one of ours), so `load_state_strict` lists both.
The one invented tensor: a BN `num_batches_tracked` missing from the source (checkpoints from before torch 0.4.1)
is filled with 0; it only matters for BN with `momentum=None`, which the teacher does not use.

**Not checked here:** that the teacher config matches the checkpoint beyond shapes (voxel size, range, the class
order of each task, the input point features).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from pipelines.errors import CheckpointError
from stxd_cache.teacher.sparse_encoder import SparseBasicBlock, spconv

Kind = Literal["copy", "sparse_kernel", "deconv1x1_as_conv", "head_rows", "fold_bias"]
Layout = Literal["krsc", "rsck"]
MMDet3DConvention = Literal["v0", "v1"]
#: A permutation of a head output's channels: our channel i = sign_i * source channel j_i, as ((j_i, sign_i), ...).
RowMap = tuple[tuple[int, float], ...]

LWH_TO_WLH: RowMap = ((1, 1.0), (0, 1.0), (2, 1.0))
"""log(l, w, h) → log(w, l, h)."""
COS_SIN_TO_SIN_COS: RowMap = ((1, 1.0), (0, 1.0))
"""(cos θ, sin θ) → (sin θ, cos θ)."""
LEGACY_YAW_TO_SIN_COS: RowMap = ((1, -1.0), (0, -1.0))
"""(sin φ, cos φ) with φ = -θ - π/2, i.e. (-cos θ, -sin θ) → (sin θ, cos θ)."""

#: Head outputs whose final conv is permuted, per mmdet3d box convention (0.x, and 1.0.0rc0 onwards).
MMDET3D_HEAD_ROWS: dict[MMDet3DConvention, dict[str, RowMap]] = {
    "v0": {"rot": LEGACY_YAW_TO_SIN_COS},
    "v1": {"dim": LWH_TO_WLH},
}
#: Head outputs whose final conv is permuted for OpenPCDet.
OPENPCDET_HEAD_ROWS: dict[str, RowMap] = {"dim": LWH_TO_WLH, "rot": COS_SIN_TO_SIN_COS}

#: (mmdet3d prefix, our prefix): the CenterPoint detector's attributes; below them the names are identical.
MMDET3D_PREFIXES: tuple[tuple[str, str], ...] = (
    ("pts_middle_encoder.", "middle_encoder."),
    ("pts_backbone.", "backbone."),
    ("pts_neck.", "neck."),
    ("pts_bbox_head.", "head."),
)
#: (VoxelResBackBone8x module under `backbone_3d.`, our SparseEncoder module under `middle_encoder.`).
OPENPCDET_ENCODER_MODULES: tuple[tuple[str, str], ...] = (
    ("conv_input", "conv_input"),
    ("conv1.0", "encoder_layers.encoder_layer1.0"),
    ("conv1.1", "encoder_layers.encoder_layer1.1"),
    ("conv2.0", "encoder_layers.encoder_layer1.2"),   # stride-2 conv 16 → 32
    ("conv2.1", "encoder_layers.encoder_layer2.0"),
    ("conv2.2", "encoder_layers.encoder_layer2.1"),
    ("conv3.0", "encoder_layers.encoder_layer2.2"),   # stride-2 conv 32 → 64
    ("conv3.1", "encoder_layers.encoder_layer3.0"),
    ("conv3.2", "encoder_layers.encoder_layer3.1"),
    ("conv4.0", "encoder_layers.encoder_layer3.2"),   # stride-2 conv 64 → 128, padding (0, 1, 1)
    ("conv4.1", "encoder_layers.encoder_layer4.0"),
    ("conv4.2", "encoder_layers.encoder_layer4.1"),
    ("conv_out", "conv_out"),
)
#: Our head output name → OpenPCDet's `SEPARATE_HEAD_CFG` / heatmap name.
OPENPCDET_HEAD_NAMES: dict[str, str] = {
    "reg": "center", "height": "center_z", "dim": "dim", "rot": "rot", "vel": "vel", "heatmap": "hm"}
#: OpenPCDet `model_state` keys that are not weights, with the reason they are dropped.
OPENPCDET_IGNORED_KEYS: dict[str, str] = {"global_step": "Detector3DTemplate's training-step counter"}


@dataclass(frozen=True)
class Rule:
    """How one source tensor becomes (part of) one of our tensors."""

    src: str
    dst: str
    kind: Kind = "copy"
    """`copy`; `sparse_kernel` (to KRSC, see the module doc); `deconv1x1_as_conv` (swap axes 0 and 1);
    `head_rows` (permute output channels by `rows`); `fold_bias` (dst, a BN running_mean, minus src)."""
    rows: RowMap = ()


def _final_head_convs(model: Any) -> Iterator[tuple[int, str, int]]:
    """(task, output name, index of the final conv in its Sequential) of every head branch."""
    for t, task_head in enumerate(model.head.task_heads):
        for name in task_head.output_names:
            yield t, name, len(getattr(task_head, name)) - 1


def _kinds(model: Any, head_rows: Mapping[str, RowMap], deconv_1x1: bool) -> dict[str, tuple[Kind, RowMap]]:
    """Our keys that need more than a copy."""
    kinds: dict[str, tuple[Kind, RowMap]] = {}
    for name, module in model.named_modules():
        if isinstance(module, spconv.conv.SparseConvolution):
            kinds[f"{name}.weight"] = ("sparse_kernel", ())
    if deconv_1x1:  # OpenPCDet's stride-1 deblock is a 1x1 ConvTranspose2d where ours is a 1x1 Conv2d
        for i, deblock in enumerate(model.neck.deblocks):
            if isinstance(deblock[0], nn.Conv2d) and tuple(deblock[0].kernel_size) == (1, 1):
                kinds[f"neck.deblocks.{i}.0.weight"] = ("deconv1x1_as_conv", ())
    for t, name, last in _final_head_convs(model):
        if name in head_rows:
            for param in ("weight", "bias"):
                kinds[f"head.task_heads.{t}.{name}.{last}.{param}"] = ("head_rows", head_rows[name])
    return kinds


def _rules(model: nn.Module, prefixes: list[tuple[str, str]], kinds: Mapping[str, tuple[Kind, RowMap]]) -> list[Rule]:
    """One rule per key of ours under one of `prefixes` (source prefix, our prefix); the longest match wins."""
    by_length = sorted(prefixes, key=lambda p: len(p[1]), reverse=True)
    rules = []
    for ours in model.state_dict():
        for src_prefix, our_prefix in by_length:
            if ours.startswith(our_prefix):
                kind, rows = kinds.get(ours, ("copy", ()))
                rules.append(Rule(src_prefix + ours[len(our_prefix):], ours, kind, rows))
                break
    return rules


def mmdet3d_rules(model: nn.Module, *, convention: MMDet3DConvention = "v1") -> list[Rule]:
    """The rules from an mmdet3d CenterPoint `state_dict` to `model`'s, for one box convention."""
    return _rules(model, list(MMDET3D_PREFIXES), _kinds(model, MMDET3D_HEAD_ROWS[convention], deconv_1x1=False))


def _openpcdet_prefixes(model: Any) -> list[tuple[str, str]]:
    pairs = [(f"backbone_3d.{src}.", f"middle_encoder.{ours}.") for src, ours in OPENPCDET_ENCODER_MODULES]
    for i, block in enumerate(model.backbone.blocks):
        pairs += [(f"backbone_2d.blocks.{i}.{j + 1}.", f"backbone.blocks.{i}.{j}.") for j in range(len(block))]
    pairs += [("backbone_2d.deblocks.", "neck.deblocks."),
              ("dense_head.shared_conv.0.", "head.shared_conv.conv."),
              ("dense_head.shared_conv.1.", "head.shared_conv.bn.")]
    for t, name, last in _final_head_convs(model):
        src, ours = f"dense_head.heads_list.{t}.{OPENPCDET_HEAD_NAMES[name]}", f"head.task_heads.{t}.{name}"
        for j in range(last):
            pairs += [(f"{src}.{j}.0.", f"{ours}.{j}.conv."), (f"{src}.{j}.1.", f"{ours}.{j}.bn.")]
        pairs.append((f"{src}.{last}.", f"{ours}.{last}."))
    return pairs


def _openpcdet_folds(model: Any) -> list[Rule]:
    """The conv biases OpenPCDet puts before a BatchNorm where our convs have none."""
    modules = dict(model.middle_encoder.named_modules())
    folds = []
    for src, ours in OPENPCDET_ENCODER_MODULES:
        if isinstance(modules.get(ours), SparseBasicBlock):
            for conv, bn in (("conv1", "bn1"), ("conv2", "bn2")):
                folds.append(Rule(f"backbone_3d.{src}.{conv}.bias", f"middle_encoder.{ours}.{bn}.running_mean",
                                  "fold_bias"))
    folds.append(Rule("dense_head.shared_conv.0.bias", "head.shared_conv.bn.running_mean", "fold_bias"))
    for t, name, last in _final_head_convs(model):
        for j in range(last):
            folds.append(Rule(f"dense_head.heads_list.{t}.{OPENPCDET_HEAD_NAMES[name]}.{j}.0.bias",
                              f"head.task_heads.{t}.{name}.{j}.bn.running_mean", "fold_bias"))
    return folds


def openpcdet_rules(model: nn.Module) -> list[Rule]:
    """The rules from an OpenPCDet CenterPoint `model_state` (VoxelResBackBone8x, BaseBEVBackbone, CenterHead)."""
    kinds = _kinds(model, OPENPCDET_HEAD_ROWS, deconv_1x1=True)
    return _rules(model, _openpcdet_prefixes(model), kinds) + _openpcdet_folds(model)


def mmdet3d_key_map(model: nn.Module) -> dict[str, str]:
    """mmdet3d key → our key, for every key of `model` (the same for both box conventions)."""
    return {rule.src: rule.dst for rule in mmdet3d_rules(model)}


def openpcdet_key_map(model: nn.Module) -> dict[str, str]:
    """OpenPCDet key → our key; folded conv biases map to the BN running_mean they are folded into."""
    return {rule.src: rule.dst for rule in openpcdet_rules(model)}


def _major(version: str) -> int | None:
    match = re.match(r"\s*v?(\d+)\.\d+", version)
    return int(match.group(1)) if match else None


def mmdet3d_convention(data: Mapping[str, Any], mmdet3d_version: str | None = None) -> MMDet3DConvention:
    """`v0` (boxes before mmdet3d 1.0.0rc0) or `v1`, from `mmdet3d_version`, else the checkpoint's
    `meta["mmdet3d_version"]`, else `v1` (see the module doc)."""
    if mmdet3d_version is not None:
        major = _major(mmdet3d_version)
        if major is None:
            raise CheckpointError(f"mmdet3d_version is {mmdet3d_version!r}; expected a version such as '0.17.3' "
                                  "(trained before mmdet3d's 1.0 coordinate refactor) or '1.0.0rc4'")
        return "v0" if major == 0 else "v1"
    meta = data.get("meta")
    recorded = meta.get("mmdet3d_version") if isinstance(meta, Mapping) else None
    if isinstance(recorded, str) and _major(recorded) == 0:
        warnings.warn(
            f"mmdet3d checkpoint meta records mmdet3d_version {recorded!r}: converting its head from the pre-1.0 "
            "box convention (dims w, l, h; yaw -θ - π/2). Checkpoints trained on the 1.0 refactor branch before "
            "its release may record 0.x too; if this is one, pass mmdet3d_version='1.0'", stacklevel=3)
        return "v0"
    return "v1"


def _to_krsc(tensor: torch.Tensor, target: tuple[int, ...], ambiguous: Layout) -> torch.Tensor | None:
    """A sparse kernel in our (out, kD, kH, kW, in) layout, or None if its shape fits neither layout."""
    rsck = (*target[1:4], target[4], target[0]) if len(target) == 5 else None
    shape = tuple(tensor.shape)
    if shape == target and (shape != rsck or ambiguous == "krsc"):
        return tensor
    if shape == rsck:
        return tensor.permute(4, 0, 1, 2, 3).contiguous()
    return None


def _permute_rows(tensor: torch.Tensor, rows: RowMap) -> torch.Tensor:
    if tensor.ndim == 0 or tensor.shape[0] != len(rows):
        return tensor  # wrong shape: load_state_strict reports it
    index = torch.tensor([j for j, _ in rows])
    signs = torch.tensor([s for _, s in rows], dtype=tensor.dtype).reshape(-1, *[1] * (tensor.ndim - 1))
    return tensor[index] * signs


def _convert(state: Mapping[str, Any], rules: list[Rule], model: nn.Module, *, source: str,
             ambiguous: Callable[[str], Layout], ignored: Mapping[str, str]) -> dict[str, torch.Tensor]:
    from spconv.constants import SAVED_WEIGHT_LAYOUT

    if SAVED_WEIGHT_LAYOUT:
        raise CheckpointError(f"SPCONV_SAVED_WEIGHT_LAYOUT={SAVED_WEIGHT_LAYOUT} is set, so spconv would permute the "
                              f"converted {source} sparse kernels a second time while loading; unset it")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source} checkpoint entry `{key}` is a {type(value).__name__}, expected a "
                                  "tensor; is this a CenterPoint checkpoint?")
    own = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    bad_layouts = []
    for rule in (r for r in rules if r.kind != "fold_bias"):
        if rule.src not in state:
            if rule.dst.endswith(".num_batches_tracked"):
                out[rule.dst] = torch.zeros((), dtype=torch.long)
            continue
        tensor, target = state[rule.src], tuple(own[rule.dst].shape)
        used.add(rule.src)
        if rule.kind == "sparse_kernel":
            kernel = _to_krsc(tensor, target, ambiguous(rule.src))
            if kernel is None:
                bad_layouts.append(f"`{rule.src}` {tuple(tensor.shape)} for `{rule.dst}`: expected {target} "
                                   f"or {(*target[1:4], target[4], target[0])}")
                continue
            tensor = kernel
        elif rule.kind == "deconv1x1_as_conv" and tensor.ndim == 4:
            tensor = tensor.transpose(0, 1).contiguous()
        elif rule.kind == "head_rows":
            tensor = _permute_rows(tensor, rule.rows)
        out[rule.dst] = tensor
    if bad_layouts:
        raise CheckpointError(
            f"{source} sparse conv weights fit neither the spconv 2 layout (out, kD, kH, kW, in) nor the spconv 1.x "
            f"/ mmcv layout (kD, kH, kW, in, out): {'; '.join(bad_layouts)}. The checkpoint's sparse encoder differs "
            "from the teacher config: check `encoder` and `voxel.num_point_features` in the teacher YAML")
    for rule in (r for r in rules if r.kind == "fold_bias"):
        bias, mean = state.get(rule.src), out.get(rule.dst)
        if bias is not None and mean is not None and bias.shape == mean.shape:
            out[rule.dst] = (mean.double() - bias.double()).to(mean.dtype)
            used.add(rule.src)
    for key, value in state.items():
        if key not in used and key not in ignored:
            out[f"{source}:{key}" if key in own else key] = value
    return out


def from_mmdet3d(data: dict[str, Any], model: nn.Module, *, mmdet3d_version: str | None = None
                 ) -> dict[str, torch.Tensor]:
    """Our state dict from an mmdet3d CenterPoint checkpoint (`data["state_dict"]`, or a bare state dict).

    mmdet3d_version: the mmdet3d version that trained it, which decides the head's box convention (see the module
    doc); None reads `data["meta"]["mmdet3d_version"]`, else assumes >= 1.0.
    """
    convention = mmdet3d_convention(data, mmdet3d_version)
    state = data["state_dict"] if isinstance(data.get("state_dict"), Mapping) else data
    versions = getattr(state, "_metadata", None)

    def ambiguous(src_key: str) -> Layout:
        entry = versions.get(src_key.rsplit(".", 1)[0]) if isinstance(versions, Mapping) else None
        return "krsc" if isinstance(entry, Mapping) and entry.get("version") == 2 else "rsck"

    return _convert(state, mmdet3d_rules(model, convention=convention), model, source="mmdet3d",
                    ambiguous=ambiguous, ignored={})


def from_openpcdet(data: dict[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """Our state dict from an OpenPCDet CenterPoint checkpoint (`data["model_state"]`)."""
    state = data.get("model_state")
    if not isinstance(state, Mapping):
        keys = ", ".join(sorted(map(str, data))[:8])
        raise CheckpointError(f"OpenPCDet checkpoint has no `model_state` dict (top-level keys: {keys}); expected a "
                              "file saved by OpenPCDet's train.py")
    return _convert(state, openpcdet_rules(model), model, source="openpcdet", ambiguous=lambda _: "krsc",
                    ignored=OPENPCDET_IGNORED_KEYS)
