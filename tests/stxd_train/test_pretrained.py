"""`model.load_from`: a whole student initialised from a stxd, mmdetection3d or torchvision checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipelines.config import from_dict
from pipelines.errors import ConfigError
from stxd_train.fit import StudentRunConfig, fit
from stxd_train.students.config import StudentConfig
from stxd_train.students.pretrained import load_from
from stxd_train.students.registry import build_student
from tiny import tiny_student


def _student(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_student(from_dict(StudentConfig, tiny_student("bevformer")["model"]))


def _backbone_and_neck(student: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    state = student.state_dict()
    backbone = {k.removeprefix("image_encoder.backbone."): v for k, v in state.items()
                if k.startswith("image_encoder.backbone.")}
    neck = {k.removeprefix("image_encoder.neck."): v for k, v in state.items() if k.startswith("image_encoder.neck.")}
    return backbone, neck


def _same(a: torch.nn.Module, b: torch.nn.Module, prefix: str = "") -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if k.startswith(prefix))


def test_a_stxd_student_loads_whole(tmp_path: Path) -> None:
    source, target = _student(1), _student(2)
    assert not _same(source, target)
    path = tmp_path / "student.pt"
    torch.save({"config": {}, "state_dict": source.state_dict(), "adapter": None}, path)
    report = load_from(target, path)
    assert report.layout == "stxd" and not report.skipped and not report.initial
    assert _same(source, target)
    assert report.lines()[0] == (f"load_from {path} (stxd layout): {len(report.loaded)} tensors loaded, 0 skipped, "
                                 "0 left at their initial value")


def test_an_mmdet3d_checkpoint_loads_its_image_backbone_and_neck(tmp_path: Path) -> None:
    """BEVFormer-style keys: img_backbone and img_neck load; a DCN offset and a foreign head are refused unless
    load_from_strict is false, and then reported as skipped."""
    source, target = _student(1), _student(2)
    backbone, neck = _backbone_and_neck(source)
    foreign = {"img_backbone.layer1.0.conv2.conv_offset.weight": torch.zeros(18, 8, 3, 3),
               "pts_bbox_head.cls_branches.0.0.weight": torch.zeros(10, 16)}
    state = {**{f"img_backbone.{k}": v for k, v in backbone.items()},
             **{f"img_neck.{k}": v for k, v in neck.items()}, **foreign}
    path = tmp_path / "bevformer_r101.pth"
    torch.save({"meta": {"epoch": 24}, "state_dict": state}, path)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ConfigError) as caught:
        load_from(target, path)
    assert str(caught.value).startswith(f"model.load_from {path} (mmdetection3d layout): 2 of its tensors cannot be "
                                        "used by this student: img_backbone.layer1.0.conv2.conv_offset.weight (no "
                                        "student key image_encoder.backbone.layer1.0.conv2.conv_offset.weight), "
                                        "pts_bbox_head.cls_branches.0.0.weight (no such student key)")
    assert "model.load_from_strict: false" in str(caught.value)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())   # nothing half-loaded
    report = load_from(target, path, strict=False)
    assert report.layout == "mmdetection3d" and set(report.skipped) == set(foreign)
    assert _same(source, target, "image_encoder.") and not _same(source, target, "head.")
    assert report.initial and all(not k.startswith("image_encoder.") for k in report.initial)
    assert "  skipped: img_backbone.layer1.0.conv2.conv_offset.weight" in report.lines()[1]


def test_a_torchvision_resnet_loads_into_the_backbone(tmp_path: Path) -> None:
    """torchvision keys: the classifier and the stages a truncated student lacks are left out without complaint."""
    source, target = _student(1), _student(2)
    backbone, _ = _backbone_and_neck(source)
    extra = {"fc.weight": torch.zeros(1000, 16), "fc.bias": torch.zeros(1000),
             "layer3.0.conv1.weight": torch.zeros(32, 16, 3, 3)}   # the tiny student keeps 2 stages
    path = tmp_path / "resnet18.pth"
    torch.save({**backbone, **extra}, path)
    report = load_from(target, path)
    assert report.layout == "torchvision" and not report.skipped
    assert len(report.loaded) == len(backbone)
    assert _same(source, target, "image_encoder.backbone.") and not _same(source, target, "image_encoder.neck.")


def test_bad_files_are_named(tmp_path: Path) -> None:
    target = _student(0)
    with pytest.raises(ConfigError, match="no such file"):
        load_from(target, tmp_path / "missing.pth")
    other = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, other)
    with pytest.raises(ConfigError, match=r"its keys \(encoder.weight\) are none of the layouts"):
        load_from(target, other)
    wide = tmp_path / "wide.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "layer1.0.conv1.weight": torch.zeros(64, 64, 3, 3)}, wide)
    with pytest.raises(ConfigError, match="none of its 2 tensors fits this student"):
        load_from(target, wide)


def test_fit_starts_from_load_from_and_reports_it(tmp_path: Path, synth_root: Path) -> None:
    source = _student(5)
    path = tmp_path / "init.pt"
    torch.save({"config": {}, "state_dict": source.state_dict(), "adapter": None}, path)
    raw = tiny_student("bevformer")
    raw["model"]["load_from"] = str(path)
    raw["train"].update(max_steps=1, checkpoint_every=1)
    raw["optim"]["lr"] = 1e-12   # one step that barely moves the weights
    out = tmp_path / "run"
    fit(from_dict(StudentRunConfig, raw), dataroot=str(synth_root), version="v1.0-synth", out=out, device="cpu")
    assert (out / "load_from.txt").read_text().startswith(f"load_from {path} (stxd layout): ")
    trained = torch.load(out / "student.pt", weights_only=True)["state_dict"]
    weight = "image_encoder.backbone.conv1.weight"
    torch.testing.assert_close(trained[weight], source.state_dict()[weight], rtol=0, atol=1e-6)
