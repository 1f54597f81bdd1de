"""The students' ResNet and FPN: torchvision's state-dict layout, truncation, freezing and checkpoint loading."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.errors import ConfigError
from stxd_train.students.fpn import FPN
from stxd_train.students.resnet import ResNet, load_pretrained


def torchvision_resnet_table(depth: int) -> dict[str, tuple[int, ...]]:
    """State-dict key -> shape of torchvision's `resnet{depth}` without `fc`, from its architecture rules."""
    blocks = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}[depth]
    bottleneck = depth >= 50
    table: dict[str, tuple[int, ...]] = {}

    def add_bn(prefix: str, channels: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            table[f"{prefix}.{name}"] = (channels,)
        table[f"{prefix}.num_batches_tracked"] = ()

    table["conv1.weight"] = (64, 3, 7, 7)
    add_bn("bn1", 64)
    inplanes = 64
    for stage, count in enumerate(blocks, start=1):
        width = 64 * 2 ** (stage - 1)
        out = 4 * width if bottleneck else width
        for b in range(count):
            p = f"layer{stage}.{b}"
            if bottleneck:
                table[f"{p}.conv1.weight"] = (width, inplanes, 1, 1)
                table[f"{p}.conv2.weight"] = (width, width, 3, 3)
                table[f"{p}.conv3.weight"] = (out, width, 1, 1)
                add_bn(f"{p}.bn3", out)
            else:
                table[f"{p}.conv1.weight"] = (width, inplanes, 3, 3)
                table[f"{p}.conv2.weight"] = (width, width, 3, 3)
            add_bn(f"{p}.bn1", width)
            add_bn(f"{p}.bn2", width)
            # torchvision adds a projection when the first block changes stride (stages 2-4) or width
            if b == 0 and (stage > 1 or inplanes != out):
                table[f"{p}.downsample.0.weight"] = (out, inplanes, 1, 1)
                add_bn(f"{p}.downsample.1", out)
            inplanes = out
    return table


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@functools.cache
def _full_width(depth: int) -> ResNet:
    """One full-width network per depth for the read-only layout tests (building ResNet-50 takes a while)."""
    return ResNet(depth=depth)


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_state_dict_is_torchvisions(depth: int) -> None:
    assert _shapes(_full_width(depth)) == torchvision_resnet_table(depth)


@pytest.mark.parametrize(("depth", "key", "shape"), [
    (18, "layer3.0.downsample.0.weight", (256, 128, 1, 1)),
    (18, "layer4.1.conv2.weight", (512, 512, 3, 3)),
    (18, "layer2.0.conv1.weight", (128, 64, 3, 3)),
    (34, "layer3.5.bn2.running_var", (256,)),
    (50, "layer4.2.conv3.weight", (2048, 512, 1, 1)),
    (50, "layer1.0.downsample.0.weight", (256, 64, 1, 1)),
    (50, "layer2.0.conv2.weight", (128, 128, 3, 3)),
    (50, "layer3.5.bn3.weight", (1024,)),
])
def test_state_dict_spot_checks(depth: int, key: str, shape: tuple[int, ...]) -> None:
    shapes = _shapes(_full_width(depth))
    assert shapes[key] == shape
    assert not any(k.startswith(("fc.", "avgpool")) for k in shapes)
    assert "layer1.0.downsample.0.weight" not in _shapes(_full_width(18))


@pytest.mark.parametrize(("depth", "params"), [(18, 11_176_512), (50, 23_508_032)])
def test_parameter_count_is_torchvisions_without_fc(depth: int, params: int) -> None:
    assert sum(p.numel() for p in _full_width(depth).parameters()) == params
    table = torchvision_resnet_table(depth)
    counted = sum(torch.Size(s).numel() for k, s in table.items() if k.endswith(("weight", "bias")))
    assert counted == params


@pytest.mark.parametrize(("depth", "base", "channels"), [(18, 64, (128, 256)), (50, 16, (128, 256)),
                                                         (34, 8, (16, 32))])
def test_truncated_outputs(depth: int, base: int, channels: tuple[int, int]) -> None:
    model = ResNet(depth=depth, num_stages=3, out_indices=(1, 2), base_channels=base).eval()
    outs = model(torch.randn(1, 3, 64, 96))
    assert model.out_channels == channels
    assert model.strides == (8, 16)
    assert [tuple(o.shape) for o in outs] == [(1, channels[0], 8, 12), (1, channels[1], 4, 6)]
    assert not any(k.startswith("layer4") for k in model.state_dict())


def test_all_four_stages_have_strides_4_to_32() -> None:
    model = ResNet(depth=18, out_indices=(0, 1, 2, 3), base_channels=8).eval()
    outs = model(torch.randn(2, 3, 64, 64))
    assert model.strides == (4, 8, 16, 32)
    assert [tuple(o.shape) for o in outs] == [(2, 8, 16, 16), (2, 16, 8, 8), (2, 32, 4, 4), (2, 64, 2, 2)]


@pytest.mark.parametrize("kwargs", [{"num_stages": 3, "out_indices": (3,)}, {"out_indices": ()},
                                    {"out_indices": (2, 1)}, {"depth": 26}, {"num_stages": 5},
                                    {"frozen_stages": 5}])
def test_invalid_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="ResNet"):
        ResNet(**kwargs)  # type: ignore[arg-type]


def _trained(model: ResNet) -> ResNet:
    """Move every BatchNorm parameter and statistic away from its init, so that eval outputs depend on all."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(7)
    return model.eval()


def test_load_pretrained_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = _trained(ResNet(depth=18, base_channels=16))
    wrapped = {f"module.{k}": v for k, v in source.state_dict().items()}
    wrapped |= {"module.fc.weight": torch.zeros(1000, 128), "module.fc.bias": torch.zeros(1000)}
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": wrapped, "meta": {"epoch": 3}}, path)

    torch.manual_seed(1)
    target = ResNet(depth=18, base_channels=16)
    x = torch.randn(1, 3, 48, 64)
    assert not torch.allclose(target.eval()(x)[-1], source(x)[-1])
    report = load_pretrained(target, path)
    assert sorted(report["ignored"]) == ["fc.bias", "fc.weight"]
    assert set(report["loaded"]) == set(source.state_dict())
    for a, b in zip(target.eval()(x), source(x), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_load_pretrained_backbone_prefix_and_model_entry(tmp_path: Path) -> None:
    source = _trained(ResNet(depth=50, base_channels=8))
    path = tmp_path / "det.pth"
    torch.save({"model": {f"backbone.{k}": v for k, v in source.state_dict().items()}}, path)
    target = ResNet(depth=50, base_channels=8)
    assert load_pretrained(target, path)["ignored"] == []
    torch.testing.assert_close(target.state_dict()["layer4.2.bn3.running_mean"],
                               source.state_dict()["layer4.2.bn3.running_mean"], rtol=0, atol=0)


def test_load_pretrained_into_truncated_model_ignores_missing_stages(tmp_path: Path) -> None:
    full = _trained(ResNet(depth=18, base_channels=16))
    path = tmp_path / "r18.pth"
    torch.save(full.state_dict(), path)
    truncated = ResNet(depth=18, num_stages=3, out_indices=(2,), base_channels=16)
    report = load_pretrained(truncated, path)
    assert set(report["ignored"]) == {k for k in full.state_dict() if k.startswith("layer4.")}
    assert len(report["ignored"]) == 2 * 2 * (1 + 5) + (1 + 5)  # two blocks of two conv+BN pairs, a projection
    assert set(report["loaded"]) == set(truncated.state_dict())
    torch.testing.assert_close(truncated.layer3[1].conv2.weight, full.layer3[1].conv2.weight, rtol=0, atol=0)


def test_load_pretrained_accepts_checkpoints_without_bn_counters(tmp_path: Path) -> None:
    source = ResNet(depth=18, base_channels=8)
    path = tmp_path / "old.pth"
    torch.save({k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}, path)
    report = load_pretrained(ResNet(depth=18, base_channels=8), path)
    assert "bn1.weight" in report["loaded"] and "bn1.num_batches_tracked" not in report["loaded"]


def test_load_pretrained_wrong_width_names_keys_and_shapes(tmp_path: Path) -> None:
    path = tmp_path / "narrow.pth"
    torch.save(ResNet(depth=18, base_channels=32).state_dict(), path)
    model = ResNet(depth=18)
    before = model.conv1.weight.clone()
    with pytest.raises(ConfigError) as info:
        load_pretrained(model, path)
    message = str(info.value)
    assert str(path) in message
    assert "conv1.weight found (32, 3, 7, 7) expected (64, 3, 7, 7)" in message
    assert "mis-shaped" in message and "torchvision resnet18" in message and "base_channels 64" in message
    assert "\n" not in message
    assert torch.equal(model.conv1.weight, before)  # nothing is half-loaded


def test_load_pretrained_wrong_depth_lists_missing_and_unexpected(tmp_path: Path) -> None:
    path = tmp_path / "r50.pth"
    torch.save(ResNet(depth=50, base_channels=8).state_dict(), path)
    with pytest.raises(ConfigError, match="unexpected keys") as info:
        load_pretrained(ResNet(depth=18, base_channels=8), path)
    message = str(info.value)
    assert "layer1.0.conv3.weight" in message and "more" in message
    assert "base_channels 8" in message and "ImageNet weights do not exist" in message


def test_load_pretrained_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "resnet18.pth"
    with pytest.raises(ConfigError, match="no such file") as info:
        load_pretrained(ResNet(depth=18, base_channels=8), path)
    assert str(path) in str(info.value)


class _Payload:
    """Not a tensor: `torch.load(weights_only=True)` must refuse to unpickle it."""


def test_load_pretrained_refuses_arbitrary_pickles(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"conv1.weight": _Payload()}}, path)
    with pytest.raises(ConfigError, match="weights_only") as info:
        load_pretrained(ResNet(depth=18, base_channels=8), path)
    assert str(path) in str(info.value) and "_Payload" in str(info.value)


def test_load_pretrained_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "junk.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read") as info:
        load_pretrained(ResNet(depth=18, base_channels=8), path)
    assert str(path) in str(info.value)


def test_frozen_stages_and_norm_eval() -> None:
    model = ResNet(depth=18, frozen_stages=1, base_channels=8)
    assert not model.conv1.weight.requires_grad and not model.bn1.weight.requires_grad
    assert not any(p.requires_grad for p in model.layer1.parameters())
    assert all(p.requires_grad for name in ("layer2", "layer3", "layer4")
               for p in getattr(model, name).parameters())
    model.train()
    assert model.training and not model.bn1.training and not model.layer1[1].bn2.training
    assert model.layer2[0].bn1.training

    frozen_stats = model.bn1.running_mean.clone()
    model(torch.randn(2, 3, 32, 32) + 5)
    assert torch.equal(model.bn1.running_mean, frozen_stats)
    assert not torch.equal(model.layer2[0].bn1.running_mean, torch.zeros(16))

    norm_eval = ResNet(depth=18, norm_eval=True, base_channels=8).train()
    bns = [m for m in norm_eval.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norm_eval.training and len(bns) == 20 and not any(m.training for m in bns)
    assert all(p.requires_grad for p in norm_eval.parameters())


def test_fpn_shapes_names_and_extra_levels() -> None:
    fpn = FPN(in_channels=(8, 16, 32), out_channels=12, num_outs=5)
    shapes = _shapes(fpn)
    assert shapes["lateral_convs.2.conv.weight"] == (12, 32, 1, 1)
    assert shapes["fpn_convs.0.conv.weight"] == (12, 12, 3, 3)
    assert shapes["fpn_convs.2.conv.bias"] == (12,)
    assert len(shapes) == 12
    feats = [torch.randn(2, 8, 15, 23), torch.randn(2, 16, 8, 12), torch.randn(2, 32, 4, 6)]
    outs = fpn(feats)
    assert [tuple(o.shape) for o in outs] == [(2, 12, 15, 23), (2, 12, 8, 12), (2, 12, 4, 6), (2, 12, 2, 3),
                                              (2, 12, 1, 2)]
    torch.testing.assert_close(outs[4], outs[2][:, :, ::4, ::4], rtol=0, atol=0)


def test_fpn_top_down_sums_upsampled_coarser_levels() -> None:
    fpn = FPN(in_channels=(4, 4), out_channels=4)
    with torch.no_grad():
        for lateral, out in zip(fpn.lateral_convs, fpn.fpn_convs, strict=True):
            lateral.conv.weight.copy_(torch.eye(4)[:, :, None, None])
            out.conv.weight.zero_()
            out.conv.weight[:, :, 1, 1] = torch.eye(4)
    fine, coarse = torch.randn(1, 4, 5, 7), torch.randn(1, 4, 3, 4)
    outs = fpn([fine, coarse])
    torch.testing.assert_close(outs[1], coarse)
    torch.testing.assert_close(outs[0], fine + F.interpolate(coarse, size=(5, 7), mode="nearest"))


def test_fpn_gradient_reaches_every_input_and_backbone() -> None:
    backbone = ResNet(depth=18, num_stages=3, out_indices=(1, 2), base_channels=8)
    fpn = FPN(in_channels=backbone.out_channels, out_channels=16, num_outs=3)
    images = torch.randn(2, 3, 32, 48, requires_grad=True)
    outs = fpn(backbone(images))
    assert [tuple(o.shape) for o in outs] == [(2, 16, 4, 6), (2, 16, 2, 3), (2, 16, 1, 2)]
    sum(o.square().mean() for o in outs).backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert backbone.conv1.weight.grad is not None and backbone.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in fpn.parameters())


def test_fpn_with_fewer_outputs_than_inputs_builds_only_what_is_read() -> None:
    """One output from two stages (the synthetic students' layout): the coarse stage reaches it through the
    top-down path, every parameter gets a gradient (DDP requires it), and no output conv of level 1 exists."""
    backbone = ResNet(depth=18, num_stages=3, out_indices=(1, 2), base_channels=8)
    fpn = FPN(in_channels=backbone.out_channels, out_channels=16, num_outs=1)
    assert len(fpn.fpn_convs) == 1 and len(fpn.lateral_convs) == 2
    outs = fpn(backbone(torch.randn(2, 3, 32, 48)))
    assert [tuple(o.shape) for o in outs] == [(2, 16, 4, 6)]
    outs[0].square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fpn.parameters())
    assert all(p.grad is not None for p in backbone.parameters())


def test_a_stage_that_nothing_reads_is_a_config_error() -> None:
    from pipelines.errors import ConfigError
    from stxd_train.students.config import ImageBackboneConfig

    ImageBackboneConfig(num_stages=3, out_indices=(1, 2))
    with pytest.raises(ConfigError, match=r"`num_stages`: found 4, expected 3, one past the last stage of "
                                          r"out_indices \[1, 2\]"):
        ImageBackboneConfig(num_stages=4, out_indices=(1, 2))


def test_fpn_rejects_mismatched_levels() -> None:
    with pytest.raises(ValueError, match="num_outs"):
        FPN(in_channels=(8, 16), out_channels=4, num_outs=0)
    with pytest.raises(ValueError, match=r"expected \(8, 16\)"):
        FPN(in_channels=(8, 16), out_channels=4)([torch.randn(1, 8, 4, 4), torch.randn(1, 32, 2, 2)])
