"""mmdet3d and OpenPCDet CenterPoint checkpoints → teacher state dict: key maps against hand-written (key, shape)
tables of the public nuScenes configs, sparse kernel layouts, head conventions, strict-load errors, and tiny
teachers whose outputs survive a round trip through each source format."""

from __future__ import annotations

import math
import re
import warnings
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipelines.boxes import encode_boxes
from pipelines.errors import CheckpointError
from stxd_cache.teacher import (
    BackboneConfig,
    DecodeConfig,
    EncoderConfig,
    HeadConfig,
    NeckConfig,
    TeacherConfig,
    VoxelConfig,
    build_teacher,
)
from stxd_cache.teacher.checkpoint import load_state_strict, load_teacher, load_teacher_config
from stxd_cache.teacher.convert import (
    OPENPCDET_IGNORED_KEYS,
    from_mmdet3d,
    from_openpcdet,
    mmdet3d_convention,
    mmdet3d_key_map,
    openpcdet_key_map,
    openpcdet_rules,
)

REPO = Path(__file__).resolve().parents[2]
Shapes = dict[str, tuple[int, ...]]
K3 = (3, 3, 3)
#: Classes per task of CenterPoint nuScenes (car | truck, c.v. | bus, trailer | barrier | moto, bike | ped, cone).
NUS_TASK_SIZES = (1, 2, 2, 1, 2, 2)


def _bn(shapes: Shapes, prefix: str, channels: int) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        shapes[f"{prefix}.{name}"] = (channels,)
    shapes[f"{prefix}.num_batches_tracked"] = ()


def _sparse(shapes: Shapes, key: str, cin: int, cout: int, layout: str, kernel: tuple[int, ...] = K3) -> None:
    """spconv 2 (out, kD, kH, kW, in), or spconv 1.x / mmcv (kD, kH, kW, in, out)."""
    shapes[key] = (cout, *kernel, cin) if layout == "spconv2" else (*kernel, cin, cout)


def mmdet3d_nus_shapes(layout: str = "mmcv") -> Shapes:
    """mmdet3d CenterPoint 0.075 nuScenes `state_dict`, from configs/_base_/models/centerpoint_01voxel_second_secfpn_
    nus.py (the 0075 config only changes voxel size and sparse_shape), middle_encoders/sparse_encoder.py
    (block_type='basicblock'), layers/sparse_block.py, backbones/second.py, necks/second_fpn.py and
    dense_heads/centerpoint_head.py."""
    s: Shapes = {}
    enc = "pts_middle_encoder"
    _sparse(s, f"{enc}.conv_input.0.weight", 5, 16, layout)
    _bn(s, f"{enc}.conv_input.1", 16)
    stages, cin = ((16, 16, 32), (32, 32, 64), (64, 64, 128), (128, 128)), 16
    for i, stage in enumerate(stages, 1):
        for j, cout in enumerate(stage):
            p = f"{enc}.encoder_layers.encoder_layer{i}.{j}"
            if j == len(stage) - 1 and i < len(stages):  # make_sparse_convmodule SparseConv3d, stride 2
                _sparse(s, f"{p}.0.weight", cin, cout, layout)
                _bn(s, f"{p}.1", cout)
            else:  # SparseBasicBlock (mmdet BasicBlock names), convs without bias
                for n in (1, 2):
                    _sparse(s, f"{p}.conv{n}.weight", cout, cout, layout)
                    _bn(s, f"{p}.bn{n}", cout)
            cin = cout
    _sparse(s, f"{enc}.conv_out.0.weight", 128, 128, layout, (3, 1, 1))
    _bn(s, f"{enc}.conv_out.1", 128)
    for i, (cin, cout) in enumerate(((256, 128), (128, 256))):  # SECOND: conv, BN, ReLU, then 5 x the same
        for n in range(6):
            s[f"pts_backbone.blocks.{i}.{3 * n}.weight"] = (cout, cin if n == 0 else cout, 3, 3)
            _bn(s, f"pts_backbone.blocks.{i}.{3 * n + 1}", cout)
    s["pts_neck.deblocks.0.0.weight"] = (256, 128, 1, 1)  # use_conv_for_no_stride: Conv2d (out, in, 1, 1)
    s["pts_neck.deblocks.1.0.weight"] = (256, 256, 2, 2)  # ConvTranspose2d (in, out, 2, 2)
    for i in (0, 1):
        _bn(s, f"pts_neck.deblocks.{i}.1", 256)
    s["pts_bbox_head.shared_conv.conv.weight"] = (64, 512, 3, 3)  # ConvModule, bias='auto' → no bias
    _bn(s, "pts_bbox_head.shared_conv.bn", 64)
    for t, n_cls in enumerate(NUS_TASK_SIZES):
        for name, ch in (("reg", 2), ("height", 1), ("dim", 3), ("rot", 2), ("vel", 2), ("heatmap", n_cls)):
            p = f"pts_bbox_head.task_heads.{t}.{name}"
            s[f"{p}.0.conv.weight"] = (64, 64, 3, 3)
            _bn(s, f"{p}.0.bn", 64)
            s[f"{p}.1.weight"], s[f"{p}.1.bias"] = (ch, 64, 3, 3), (ch,)
    return s


def openpcdet_nus_shapes(layout: str = "spconv2") -> Shapes:
    """OpenPCDet cbgs_voxel0075_res3d_centerpoint `model_state`, from tools/cfgs/nuscenes_models/cbgs_voxel0075_
    res3d_centerpoint.yaml, backbones_3d/spconv_backbone.py (VoxelResBackBone8x), backbones_2d/base_bev_backbone.py
    and dense_heads/center_head.py (USE_BIAS_BEFORE_NORM: True)."""
    s: Shapes = {"global_step": (1,)}
    enc = "backbone_3d"
    _sparse(s, f"{enc}.conv_input.0.weight", 5, 16, layout)
    _bn(s, f"{enc}.conv_input.1", 16)
    for i, (cin, cout) in enumerate(((16, 16), (16, 32), (32, 64), (64, 128)), 1):
        first = 0
        if i > 1:  # post_act_block spconv, stride 2
            _sparse(s, f"{enc}.conv{i}.0.0.weight", cin, cout, layout)
            _bn(s, f"{enc}.conv{i}.0.1", cout)
            first = 1
        for b in (first, first + 1):  # SparseBasicBlock: bias = norm_fn is not None
            for n in (1, 2):
                _sparse(s, f"{enc}.conv{i}.{b}.conv{n}.weight", cout, cout, layout)
                s[f"{enc}.conv{i}.{b}.conv{n}.bias"] = (cout,)
                _bn(s, f"{enc}.conv{i}.{b}.bn{n}", cout)
    _sparse(s, f"{enc}.conv_out.0.weight", 128, 128, layout, (3, 1, 1))
    _bn(s, f"{enc}.conv_out.1", 128)
    for i, (cin, cout) in enumerate(((256, 128), (128, 256))):  # ZeroPad2d, conv, BN, ReLU, then 5 x conv, BN, ReLU
        for n in range(6):
            s[f"backbone_2d.blocks.{i}.{3 * n + 1}.weight"] = (cout, cin if n == 0 else cout, 3, 3)
            _bn(s, f"backbone_2d.blocks.{i}.{3 * n + 2}", cout)
    s["backbone_2d.deblocks.0.0.weight"] = (128, 256, 1, 1)  # ConvTranspose2d (in, out, 1, 1) for stride 1
    s["backbone_2d.deblocks.1.0.weight"] = (256, 256, 2, 2)
    for i in (0, 1):
        _bn(s, f"backbone_2d.deblocks.{i}.1", 256)
    s["dense_head.shared_conv.0.weight"], s["dense_head.shared_conv.0.bias"] = (64, 512, 3, 3), (64,)
    _bn(s, "dense_head.shared_conv.1", 64)
    for t, n_cls in enumerate(NUS_TASK_SIZES):
        for name, ch in (("center", 2), ("center_z", 1), ("dim", 3), ("rot", 2), ("vel", 2), ("hm", n_cls)):
            p = f"dense_head.heads_list.{t}.{name}"
            s[f"{p}.0.0.weight"], s[f"{p}.0.0.bias"] = (64, 64, 3, 3), (64,)
            _bn(s, f"{p}.0.1", 64)
            s[f"{p}.1.weight"], s[f"{p}.1.bias"] = (ch, 64, 3, 3), (ch,)
    return s


def random_state(shapes: Shapes, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked") or key == "global_step":
            state[key] = torch.randint(1, 10**6, shape, generator=g)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            state[key] = torch.randn(shape, generator=g)
    return state


@pytest.fixture(scope="module")
def nus_model():
    return build_teacher(load_teacher_config(REPO / "configs/teacher/centerpoint_nus.yaml"), "cpu")


@pytest.fixture(scope="module")
def mmdet3d_state() -> dict[str, torch.Tensor]:
    return random_state(mmdet3d_nus_shapes("mmcv"), seed=1)


@pytest.fixture(scope="module")
def openpcdet_state() -> dict[str, torch.Tensor]:
    return random_state(openpcdet_nus_shapes("spconv2"), seed=2)


def check_complete(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    assert state.keys() == own.keys()
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in own.items()}
    load_state_strict(model, state, "test checkpoint")


def test_key_maps_cover_the_public_nuscenes_checkpoints(nus_model) -> None:
    own = set(nus_model.state_dict())
    mm = mmdet3d_key_map(nus_model)
    assert mm.keys() == mmdet3d_nus_shapes().keys() and set(mm.values()) == own
    pc = openpcdet_key_map(nus_model)
    assert pc.keys() | OPENPCDET_IGNORED_KEYS.keys() == openpcdet_nus_shapes().keys()
    assert set(pc.values()) == own
    folded = [r for r in openpcdet_rules(nus_model) if r.kind == "fold_bias"]
    assert len(folded) == 8 * 2 + 1 + 6 * 6  # 8 basic blocks x 2 convs, shared conv, 6 tasks x 6 hidden convs
    assert all(r.src.endswith(".bias") and r.dst.endswith(".running_mean") for r in folded)


@pytest.mark.parametrize("layout", ["mmcv", "spconv2"])
def test_mmdet3d_checkpoint_converts_and_loads(nus_model, mmdet3d_state, layout: str) -> None:
    if layout == "mmcv":  # an old checkpoint: mmcv kernel layout, no num_batches_tracked buffers
        src = {k: v for k, v in mmdet3d_state.items() if not k.endswith("num_batches_tracked")}
    else:
        src = random_state(mmdet3d_nus_shapes("spconv2"), seed=3)
    state = from_mmdet3d({"state_dict": src, "meta": {"mmdet3d_version": "1.0.0rc4"}}, nus_model)
    check_complete(nus_model, state)

    def kernel(key: str) -> torch.Tensor:
        return src[key].permute(4, 0, 1, 2, 3) if layout == "mmcv" else src[key]

    enc = "pts_middle_encoder"
    for src_key, param in [(f"{enc}.conv_input.0.weight", nus_model.middle_encoder.conv_input[0].weight),
                           (f"{enc}.encoder_layers.encoder_layer3.2.0.weight",
                            nus_model.middle_encoder.encoder_layers.encoder_layer3[2][0].weight),
                           (f"{enc}.encoder_layers.encoder_layer4.1.conv2.weight",
                            nus_model.middle_encoder.encoder_layers.encoder_layer4[1].conv2.weight),
                           (f"{enc}.conv_out.0.weight", nus_model.middle_encoder.conv_out[0].weight)]:
        assert torch.equal(param, kernel(src_key)), src_key
    head = nus_model.head.task_heads[0]
    dim = "pts_bbox_head.task_heads.0.dim.1"
    assert torch.equal(head.dim[1].weight, src[f"{dim}.weight"][[1, 0, 2]])  # log(l, w, h) → log(w, l, h)
    assert torch.equal(head.dim[1].bias, src[f"{dim}.bias"][[1, 0, 2]])
    assert torch.equal(head.rot[1].weight, src["pts_bbox_head.task_heads.0.rot.1.weight"])
    assert torch.equal(nus_model.head.task_heads[4].heatmap[1].bias, src["pts_bbox_head.task_heads.4.heatmap.1.bias"])
    assert torch.equal(nus_model.backbone.blocks[1][16].running_var, src["pts_backbone.blocks.1.16.running_var"])
    tracked = nus_model.head.shared_conv.bn.num_batches_tracked
    assert int(tracked) == (0 if layout == "mmcv" else int(src["pts_bbox_head.shared_conv.bn.num_batches_tracked"]))


def test_mmdet3d_version_picks_the_box_convention(nus_model, mmdet3d_state) -> None:
    rot, dim = "pts_bbox_head.task_heads.2.rot.1", "pts_bbox_head.task_heads.2.dim.1"
    with pytest.warns(UserWarning, match="0.17.1"):
        old = from_mmdet3d({"state_dict": mmdet3d_state, "meta": {"mmdet3d_version": "0.17.1"}}, nus_model)
    ours = "head.task_heads.2"
    # 0.x: (sin φ, cos φ) with φ = -θ - π/2 → (sin θ, cos θ) = (-row 1, -row 0); dims already (w, l, h).
    assert torch.equal(old[f"{ours}.rot.1.weight"], -mmdet3d_state[f"{rot}.weight"][[1, 0]])
    assert torch.equal(old[f"{ours}.rot.1.bias"], -mmdet3d_state[f"{rot}.bias"][[1, 0]])
    assert torch.equal(old[f"{ours}.dim.1.weight"], mmdet3d_state[f"{dim}.weight"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = from_mmdet3d({"state_dict": mmdet3d_state, "meta": {"mmdet3d_version": "0.17.1"}}, nus_model,
                           mmdet3d_version="1.0.0rc0")
    assert torch.equal(new[f"{ours}.rot.1.weight"], mmdet3d_state[f"{rot}.weight"])
    assert torch.equal(new[f"{ours}.dim.1.bias"], mmdet3d_state[f"{dim}.bias"][[1, 0, 2]])


def test_mmdet3d_convention_resolution() -> None:
    assert mmdet3d_convention({}) == "v1"
    assert mmdet3d_convention({"meta": {"mmdet3d_version": "1.1.0"}}) == "v1"
    assert mmdet3d_convention({"meta": {"mmengine_version": "0.7.0"}}) == "v1"
    with pytest.warns(UserWarning, match="pass mmdet3d_version"):
        assert mmdet3d_convention({"meta": {"mmdet3d_version": "0.18.1"}}) == "v0"
    assert mmdet3d_convention({"meta": {"mmdet3d_version": "1.4.0"}}, "v0.17.3") == "v0"
    with pytest.raises(CheckpointError, match="'latest'"):
        mmdet3d_convention({}, "latest")


def _code_heads(state: dict[str, torch.Tensor], prefix: str, dim: list[float], rot: list[float]) -> None:
    """Make the final dim / rot convs of task 0 output constants: zero weights, biases = the codes."""
    for name, values in (("dim", dim), ("rot", rot)):
        state[f"{prefix}.{name}.1.weight"] = torch.zeros_like(state[f"{prefix}.{name}.1.weight"])
        state[f"{prefix}.{name}.1.bias"] = torch.tensor(values)


def test_converted_heads_emit_our_box_code(nus_model, mmdet3d_state, openpcdet_state) -> None:
    """A box's codes written in each source's convention (from their nuScenes converters) come out as ours."""
    box = np.array([[0.0, 0.0, 0.0, 1.9, 4.6, 1.7, 0.7, 0.0, 0.0]])  # w, l, h, nuScenes yaw θ
    width, length, height, yaw = 1.9, 4.6, 1.7, 0.7
    expected = torch.from_numpy(encode_boxes(box)[0, 3:8]).float()  # log w, log l, log h, sin θ, cos θ
    lwh = [math.log(length), math.log(width), math.log(height)]
    wlh, phi = [math.log(width), math.log(length), math.log(height)], -yaw - math.pi / 2
    cases = [("1.0.0rc4", lwh, [math.sin(yaw), math.cos(yaw)]),  # mmdet3d >= 1.0: (l, w, h), yaw θ
             ("0.17.3", wlh, [math.sin(phi), math.cos(phi)])]  # mmdet3d 0.x: (w, l, h), φ = -θ - π/2
    for version, dim, rot in cases:
        src = dict(mmdet3d_state)
        _code_heads(src, "pts_bbox_head.task_heads.0", dim, rot)
        state = from_mmdet3d({"state_dict": src}, nus_model, mmdet3d_version=version)
        got = torch.cat([state["head.task_heads.0.dim.1.bias"], state["head.task_heads.0.rot.1.bias"]])
        torch.testing.assert_close(got, expected, msg=version)
    src = dict(openpcdet_state)
    _code_heads(src, "dense_head.heads_list.0", lwh, [math.cos(yaw), math.sin(yaw)])  # (dx, dy, dz), (cos, sin)
    state = from_openpcdet({"model_state": src}, nus_model)
    got = torch.cat([state["head.task_heads.0.dim.1.bias"], state["head.task_heads.0.rot.1.bias"]])
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("layout", ["spconv2", "spconv1"])
def test_openpcdet_checkpoint_converts_and_loads(nus_model, openpcdet_state, layout: str) -> None:
    src = openpcdet_state if layout == "spconv2" else random_state(openpcdet_nus_shapes("spconv1"), seed=4)
    state = from_openpcdet({"model_state": src, "epoch": 20}, nus_model)
    check_complete(nus_model, state)
    enc, m = "backbone_3d", nus_model.middle_encoder.encoder_layers

    def kernel(key: str) -> torch.Tensor:
        return src[key] if layout == "spconv2" else src[key].permute(4, 0, 1, 2, 3)

    # Stages regroup: OpenPCDet's conv2.0 (first of its stage) is our encoder_layer1.2 (last of ours).
    assert torch.equal(m.encoder_layer1[2][0].weight, kernel(f"{enc}.conv2.0.0.weight"))
    assert torch.equal(m.encoder_layer3[2][0].weight, kernel(f"{enc}.conv4.0.0.weight"))
    assert torch.equal(m.encoder_layer4[1].conv1.weight, kernel(f"{enc}.conv4.2.conv1.weight"))
    torch.testing.assert_close(m.encoder_layer2[0].bn2.running_mean,
                               src[f"{enc}.conv2.1.bn2.running_mean"] - src[f"{enc}.conv2.1.conv2.bias"])
    head, dh = nus_model.head, "dense_head.heads_list"
    torch.testing.assert_close(head.shared_conv.bn.running_mean,
                               src["dense_head.shared_conv.1.running_mean"] - src["dense_head.shared_conv.0.bias"])
    torch.testing.assert_close(head.task_heads[3].vel[0].bn.running_mean,
                               src[f"{dh}.3.vel.0.1.running_mean"] - src[f"{dh}.3.vel.0.0.bias"])
    assert torch.equal(head.task_heads[3].vel[0].bn.weight, src[f"{dh}.3.vel.0.1.weight"])
    assert torch.equal(nus_model.backbone.blocks[1][15].weight, src["backbone_2d.blocks.1.16.weight"])  # ZeroPad2d
    assert torch.equal(nus_model.neck.deblocks[0][0].weight, src["backbone_2d.deblocks.0.0.weight"].transpose(0, 1))
    assert torch.equal(nus_model.neck.deblocks[1][0].weight, src["backbone_2d.deblocks.1.0.weight"])
    assert torch.equal(head.task_heads[2].reg[1].weight, src[f"{dh}.2.center.1.weight"])
    assert torch.equal(head.task_heads[2].height[1].bias, src[f"{dh}.2.center_z.1.bias"])
    assert torch.equal(head.task_heads[2].dim[1].weight, src[f"{dh}.2.dim.1.weight"][[1, 0, 2]])
    assert torch.equal(head.task_heads[2].rot[1].bias, src[f"{dh}.2.rot.1.bias"][[1, 0]])
    assert torch.equal(head.task_heads[5].heatmap[1].weight, src[f"{dh}.5.hm.1.weight"])

    # USE_BIAS_BEFORE_NORM: False: no head biases, nothing to fold.
    no_bias = {k: v for k, v in src.items() if not re.match(r"dense_head\..*(shared_conv|\.0)\.0\.bias$", k)}
    state = from_openpcdet({"model_state": no_bias}, nus_model)
    assert torch.equal(state["head.shared_conv.bn.running_mean"], src["dense_head.shared_conv.1.running_mean"])
    check_complete(nus_model, state)


@pytest.mark.parametrize("fmt", ["mmdet3d", "openpcdet"])
def test_load_teacher_reads_converted_files(tmp_path, mmdet3d_state, openpcdet_state, fmt: str) -> None:
    """The whole path: a file on disk, `torch.load(weights_only=True)`, format detection, conversion, strict load."""
    if fmt == "mmdet3d":
        data = {"meta": {"mmdet3d_version": "1.0.0rc4", "config": "..."}, "state_dict": mmdet3d_state}
        deconv = mmdet3d_state["pts_neck.deblocks.1.0.weight"]
    else:
        data = {"epoch": 20, "it": 0, "model_state": openpcdet_state, "optimizer_state": {}, "version": "pcdet+0.6.0"}
        deconv = openpcdet_state["backbone_2d.deblocks.1.0.weight"]
    torch.save(data, tmp_path / "teacher.pth")
    loaded = load_teacher(tmp_path / "teacher.pth", config_path=REPO / "configs/teacher/centerpoint_nus.yaml")
    assert loaded.source_format == fmt
    assert torch.equal(loaded.model.neck.deblocks[1][0].weight, deconv)


def test_1x1_transposed_conv_and_bias_before_batchnorm_equivalences() -> None:
    """The two identities the OpenPCDet map relies on."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 5)
    deconv, conv = nn.ConvTranspose2d(6, 4, 1, bias=False), nn.Conv2d(6, 4, 1, bias=False)
    conv.weight.data = deconv.weight.data.transpose(0, 1).clone()
    torch.testing.assert_close(conv(x), deconv(x))
    biased, plain = nn.Conv2d(6, 4, 3, padding=1), nn.Conv2d(6, 4, 3, padding=1, bias=False)
    plain.weight.data = biased.weight.data.clone()
    bn_a, bn_b = nn.BatchNorm2d(4).eval(), nn.BatchNorm2d(4).eval()
    bn_a.running_mean, bn_a.running_var = torch.randn(4), torch.rand(4) + 0.5
    bn_b.running_mean, bn_b.running_var = bn_a.running_mean - biased.bias.data, bn_a.running_var
    torch.testing.assert_close(bn_b(plain(x)), bn_a(biased(x)))


def test_unmapped_and_missing_keys_are_listed(nus_model, openpcdet_state) -> None:
    src = {k: v for k, v in openpcdet_state.items() if k != "dense_head.heads_list.5.hm.1.bias"}
    src["dense_head.heads_list.0.iou.1.weight"] = torch.zeros(1, 64, 3, 3)  # an IoU branch we do not have
    src["head.shared_conv.conv.weight"] = torch.zeros(64, 512, 3, 3)  # one of our names, not a source name
    state = from_openpcdet({"model_state": src}, nus_model)
    assert "global_step" not in state
    with pytest.raises(CheckpointError) as err:
        load_state_strict(nus_model, state, "x.pth (openpcdet)")
    assert ("missing keys: head.task_heads.5.heatmap.1.bias; unexpected keys: dense_head.heads_list.0.iou.1.weight, "
            "openpcdet:head.shared_conv.conv.weight.") in str(err.value)


def test_wrong_shape_is_reported_with_both_shapes(nus_model, mmdet3d_state) -> None:
    src = dict(mmdet3d_state)
    src["pts_backbone.blocks.1.3.weight"] = torch.zeros(256, 128, 3, 3)
    state = from_mmdet3d({"state_dict": src}, nus_model)
    with pytest.raises(CheckpointError, match=re.escape(
            "mis-shaped keys: backbone.blocks.1.3.weight: checkpoint (256, 128, 3, 3) vs model (256, 256, 3, 3)")):
        load_state_strict(nus_model, state, "x.pth (mmdet3d)")


def test_sparse_kernel_of_neither_layout_raises(nus_model, mmdet3d_state) -> None:
    src = dict(mmdet3d_state)
    src["pts_middle_encoder.conv_input.0.weight"] = torch.zeros(3, 3, 3, 4, 16)  # 4 point features, not 5
    with pytest.raises(CheckpointError) as err:
        from_mmdet3d({"state_dict": src}, nus_model)
    msg = str(err.value)
    assert "`pts_middle_encoder.conv_input.0.weight` (3, 3, 3, 4, 16)" in msg
    assert "expected (16, 3, 3, 3, 5) or (3, 3, 3, 5, 16)" in msg and "neither" in msg


def test_spconv_saved_weight_layout_is_refused(nus_model, mmdet3d_state, monkeypatch) -> None:
    monkeypatch.setattr("spconv.constants.SAVED_WEIGHT_LAYOUT", "RSKC")
    with pytest.raises(CheckpointError, match="SPCONV_SAVED_WEIGHT_LAYOUT"):
        from_mmdet3d({"state_dict": mmdet3d_state}, nus_model)


# ------------------------------------------------------------------------------------------------ round trips


def tiny_config(encoder: EncoderConfig, point_range: tuple[float, ...], voxel_size: tuple[float, ...]) -> TeacherConfig:
    return TeacherConfig(
        name="tiny",
        voxel=VoxelConfig(point_range=point_range, voxel_size=voxel_size, max_points_per_voxel=5, max_voxels=5000),
        encoder=encoder,
        backbone=BackboneConfig(layer_nums=(1, 1), layer_strides=(1, 2), out_channels=(16, 32)),
        neck=NeckConfig(upsample_strides=(1, 2), out_channels=(16, 16)),
        head=HeadConfig(tasks=(("car",), ("pedestrian", "traffic_cone")), share_conv_channels=8, head_conv_channels=8),
        decode=DecodeConfig(nms_radius=(2.0, 0.5)),
        num_sweeps=1,
    )


def randomized_teacher(cfg: TeacherConfig, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    teacher = build_teacher(cfg, "cpu").eval()
    with torch.no_grad():  # convs keep their (seeded) init; every BatchNorm gets its own statistics and affine
        for module in teacher.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.num_batches_tracked.fill_(7)
    return teacher


def points(seed: int, lo: tuple[float, ...], hi: tuple[float, ...], n: int = 1500) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    xyz = rng.uniform(lo, hi, size=(n, 3))
    return [torch.from_numpy(np.concatenate([xyz, rng.uniform(0, 1, (n, 2))], axis=1).astype(np.float32))]


def assert_same_outputs(a: nn.Module, b: nn.Module, pts: list[torch.Tensor], exact: bool) -> None:
    with torch.no_grad():
        out_a, out_b = a(pts), b(pts)
    pairs = [(out_a.bev, out_b.bev)] + [(pa[k], pb[k]) for pa, pb in zip(out_a.preds, out_b.preds, strict=True)
                                          for k in pa]
    for x, y in pairs:
        if exact:
            assert torch.equal(x, y)
        else:  # folded biases round once in float32
            torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5 * float(x.abs().max()))


def _inverse_rows(tensor: torch.Tensor, name: str, source: str) -> torch.Tensor:
    """Our dim / rot final-conv rows written in the source's convention (the documented inverse)."""
    if name == "dim" and source in ("v1", "openpcdet"):
        return tensor[[1, 0, 2]]        # (w, l, h) → (l, w, h)
    if name == "rot" and source == "openpcdet":
        return tensor[[1, 0]]           # (sin, cos) → (cos, sin)
    if name == "rot" and source == "v0":
        return -tensor[[1, 0]]          # (sin θ, cos θ) → (sin φ, cos φ) = (-cos θ, -sin θ)
    return tensor


@pytest.mark.parametrize("version", ["0.17.3", "1.0.0rc4"])
def test_tiny_teacher_round_trip_through_mmdet3d(version: str) -> None:
    encoder = EncoderConfig(block_type="basicblock", base_channels=8, encoder_channels=((8, 16), (16,)),
                            encoder_paddings=((0, 1), (0,)), output_channels=8)
    cfg = tiny_config(encoder, (-6.4, -6.4, -2.0, 6.4, 6.4, 1.6), (0.4, 0.4, 0.45))
    original, fresh = randomized_teacher(cfg, 0), randomized_teacher(cfg, 1)
    prefixes = {"middle_encoder": "pts_middle_encoder", "backbone": "pts_backbone", "neck": "pts_neck",
                "head": "pts_bbox_head"}
    convention = "v0" if version.startswith("0.") else "v1"
    src = {}
    for key, tensor in original.state_dict().items():
        top, rest = key.split(".", 1)
        if tensor.ndim == 5:  # sparse kernel → mmcv (kD, kH, kW, in, out)
            tensor = tensor.permute(1, 2, 3, 4, 0)
        if match := re.fullmatch(r"head\.task_heads\.\d+\.(dim|rot)\.1\.(weight|bias)", key):
            tensor = _inverse_rows(tensor, match.group(1), convention)
        src[f"{prefixes[top]}.{rest}"] = tensor.clone()
    state = from_mmdet3d({"state_dict": src, "meta": {"mmdet3d_version": version}}, fresh, mmdet3d_version=version)
    load_state_strict(fresh, state, "round trip")
    assert all(torch.equal(a, b) for a, b in zip(original.state_dict().values(), fresh.state_dict().values(),
                                                  strict=True))
    assert_same_outputs(original, fresh, points(0, (-6.3, -6.3, -1.9), (6.3, 6.3, 1.5)), exact=True)


def test_tiny_teacher_round_trip_through_openpcdet() -> None:
    """VoxelResBackBone8x's block structure at a quarter of its widths on a 2.4 m grid, small BEV stages; biases
    folded, deconv transposed, blocks regrouped."""
    encoder = EncoderConfig(base_channels=4, encoder_channels=((4, 4, 8), (8, 8, 16), (16, 16, 32), (32, 32)),
                            output_channels=16)
    cfg = tiny_config(encoder, (-1.2, -1.2, -5.0, 1.2, 1.2, 3.0), (0.075, 0.075, 0.2))
    original, fresh = randomized_teacher(cfg, 0), randomized_teacher(cfg, 1)
    own = original.state_dict()
    g = torch.Generator().manual_seed(5)
    src: dict[str, torch.Tensor] = {"global_step": torch.tensor([1000])}
    rules = openpcdet_rules(original)
    for rule in (r for r in rules if r.kind != "fold_bias"):
        tensor = own[rule.dst].clone()
        if rule.kind == "deconv1x1_as_conv":
            tensor = tensor.transpose(0, 1)
        elif rule.kind == "head_rows":
            tensor = _inverse_rows(tensor, rule.dst.split(".")[3], "openpcdet")
        src[rule.src] = tensor
    means = {r.dst: r.src for r in rules if r.kind != "fold_bias"}
    for rule in (r for r in rules if r.kind == "fold_bias"):  # conv bias b, BN running_mean + b
        bias = torch.randn(own[rule.dst].shape, generator=g)
        src[rule.src] = bias
        src[means[rule.dst]] = src[means[rule.dst]] + bias
    state = from_openpcdet({"model_state": src}, fresh)
    load_state_strict(fresh, state, "round trip")
    assert_same_outputs(original, fresh, points(1, (-1.1, -1.1, -4.9), (1.1, 1.1, 2.9), n=300), exact=False)


def test_ambiguous_sparse_kernel_follows_the_saved_spconv_version() -> None:
    """3 point features into 3 channels with a 3x3x3 kernel: both layouts have shape (3, 3, 3, 3, 3)."""
    encoder = EncoderConfig(block_type="basicblock", base_channels=3, encoder_channels=((3, 6), (6,)),
                            encoder_paddings=((0, 1), (0,)), output_channels=4)
    cfg = tiny_config(encoder, (-6.4, -6.4, -2.0, 6.4, 6.4, 1.6), (0.4, 0.4, 0.45))
    teacher = randomized_teacher(replace(cfg, voxel=replace(cfg.voxel, num_point_features=3)), 0)
    ours = teacher.state_dict()["middle_encoder.conv_input.0.weight"]
    src = OrderedDict((f"pts_{k}" if k.startswith(("middle_encoder", "backbone", "neck")) else f"pts_bbox_{k}", v)
                      for k, v in teacher.state_dict().items())
    key = "pts_middle_encoder.conv_input.0.weight"
    src[key] = ours.permute(1, 2, 3, 4, 0)  # no record: read in the mmcv layout
    assert torch.equal(from_mmdet3d({"state_dict": src}, teacher)["middle_encoder.conv_input.0.weight"], ours)
    src[key] = ours.clone()  # saved by spconv 2 through mmdet3d (SparseModule._version = 2)
    src._metadata = OrderedDict([("pts_middle_encoder.conv_input.0", {"version": 2})])  # type: ignore[attr-defined]
    assert torch.equal(from_mmdet3d({"state_dict": src}, teacher)["middle_encoder.conv_input.0.weight"], ours)
