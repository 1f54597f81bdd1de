"""The camera students: every registry entry end to end on a real tiny batch, and the geometry they rely on."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipelines.config import from_dict
from pipelines.errors import ConfigError
from pipelines.grid import BEVGrid
from stxd_train.data import CameraDataset, collate
from stxd_train.students.common import align_bev, project
from stxd_train.students.config import StudentConfig
from stxd_train.students.registry import STUDENTS, build_student
from tiny import REPO, tiny_student


def _batch(index, cfg: StudentConfig, items=(1, 2)):
    dataset = CameraDataset(index, image_size=(64, 32), grid=cfg.grid, queue=cfg.queue)
    return collate([dataset[i] for i in items])


@pytest.mark.parametrize("name", sorted(STUDENTS))
def test_every_student_trains_one_step(name: str, train_index) -> None:
    """Forward and backward on a real batch: shapes on the student grid, finite values, gradients everywhere,
    and decoded boxes inside the grid."""
    torch.manual_seed(0)
    cfg = from_dict(StudentConfig, tiny_student(name)["model"])
    student = build_student(cfg)
    batch = _batch(train_index, cfg)
    assert batch.images.shape == (2, 1 + cfg.queue, 6, 3, 32, 64)
    out = student(batch)
    assert out.bev.shape == (2, cfg.embed_dims, 8, 8)
    assert len(out.preds) == len(cfg.head.tasks)
    for task, preds in zip(cfg.head.tasks, out.preds, strict=True):
        assert preds["heatmap"].shape == (2, len(task), 8, 8)
        assert preds["reg"].shape == (2, 2, 8, 8) and preds["vel"].shape == (2, 2, 8, 8)
    assert torch.isfinite(out.bev).all()
    losses = student.loss(out, batch.gt_boxes, batch.gt_labels)
    assert set(losses) == {"loss_heatmap", "loss_bbox"}
    total = sum(losses.values())
    assert torch.isfinite(total) and total > 0
    total.backward()
    # Every trainable parameter of the current frame's path receives a gradient.
    missing = [n for n, p in student.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    student.eval()
    with torch.no_grad():
        dets = student.decode(student(batch))
    assert len(dets) == 2 and len(dets[0].scores) > 0
    assert (dets[0].boxes[:, :2].abs() <= 25.6 + 1.6).all()


def test_unknown_student_lists_the_registry() -> None:
    with pytest.raises(ConfigError, match="bevformer, uvtr"):
        from_dict(StudentConfig, tiny_student("detr3d")["model"])


def test_each_registry_entry_owns_its_section_and_checks() -> None:
    """The past frames come from the student's own section, and a check of one student does not bind another."""
    for name, entry in STUDENTS.items():
        raw = tiny_student(name)["model"]
        assert entry.section in raw
        cfg = from_dict(StudentConfig, raw)
        assert cfg.queue == entry.queue(getattr(cfg, entry.section))
    bevformer = from_dict(StudentConfig, {**tiny_student("bevformer")["model"], "bevformer": {"queue": 2}})
    uvtr = from_dict(StudentConfig, {**tiny_student("uvtr")["model"], "uvtr": {"sweeps": 3}, "bevformer": {"queue": 2}})
    assert (bevformer.queue, uvtr.queue) == (2, 3)
    # embed_dims must split into BEVFormer's heads; UVTR has no heads, so its width is free.
    odd = {"embed_dims": 18, "bevformer": {"num_heads": 4}}
    assert from_dict(StudentConfig, {**tiny_student("uvtr")["model"], **odd}).embed_dims == 18
    with pytest.raises(ConfigError, match=r"student config model \(bevformer\) field `embed_dims`: found 18"):
        from_dict(StudentConfig, {**tiny_student("bevformer")["model"], **odd})
    assert build_student(bevformer).bev_channels == bevformer.embed_dims


def test_project_matches_lidar2img(train_index) -> None:
    """A point 10 m in front of CAM_FRONT lands where lidar2img puts it, and behind the camera is not visible."""
    sample = train_index[0]
    l2i = torch.tensor(np.stack([c.lidar2img for c in sample.cameras]), dtype=torch.float32)[None]
    size = sample.cameras[0].size
    cam2lidar = np.linalg.inv(sample.cameras[0].lidar2cam)
    ahead = cam2lidar @ np.array([0.0, 0.0, 10.0, 1.0])
    behind = cam2lidar @ np.array([0.0, 0.0, -10.0, 1.0])
    pts = torch.tensor(np.stack([ahead[:3], behind[:3]]), dtype=torch.float32)
    uv, depth, visible = project(pts, l2i, size)
    k = sample.cameras[0].intrinsic
    assert torch.allclose(uv[0, 0, 0], torch.tensor([k[0, 2] / size[0], k[1, 2] / size[1]], dtype=torch.float32),
                          atol=1e-4)
    assert math.isclose(float(depth[0, 0, 0]), 10.0, rel_tol=1e-4)
    assert bool(visible[0, 0, 0]) and not bool(visible[0, 0, 1])


def test_align_bev_moves_features_with_the_ego() -> None:
    """The ego drove 4 m forward (+x): a feature 8 m ahead in the previous frame is 4 m ahead now."""
    grid = BEVGrid.square(8.0, 8)          # 2 m cells
    prev = torch.zeros(1, 1, 8, 8)
    prev[0, 0, 4, 7] = 1.0                 # row y ≈ +1 m, column x ≈ +7 m
    prev2cur = torch.eye(4)[None].clone()
    prev2cur[0, 0, 3] = -4.0               # previous frame origin is 4 m behind the current one
    out = align_bev(prev, prev2cur, grid)
    assert out[0, 0, 4, 5] == pytest.approx(1.0)
    assert out.sum() == pytest.approx(1.0)
    # A 90° turn to the left: what was ahead (+x) is now on the right (-y).
    turn = torch.eye(4)[None].clone()
    turn[0, :2, :2] = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    rotated = align_bev(prev, turn, grid)
    assert rotated[0, 0, 0, 4] == pytest.approx(1.0)


def test_temporal_student_uses_the_previous_frame(train_index) -> None:
    """BEVFormer's output depends on the previous frame's images only when that frame is valid."""
    torch.manual_seed(0)
    cfg = from_dict(StudentConfig, tiny_student("bevformer")["model"])
    student = build_student(cfg).eval()
    batch = _batch(train_index, cfg, items=(2, 3))
    assert batch.frame_valid[:, 1].all()
    with torch.no_grad():
        ref = student(batch).bev
        changed = batch.images.clone()
        changed[:, 1] = torch.randn_like(changed[:, 1])
        other = student(type(batch)(**{**batch.__dict__, "images": changed})).bev
        invalid = student(type(batch)(**{**batch.__dict__, "images": changed,
                                         "frame_valid": batch.frame_valid & torch.tensor([True, False])})).bev
        first = student(type(batch)(**{**batch.__dict__, "frame_valid": batch.frame_valid & torch.tensor([True,
                                                                                                          False])})).bev
    assert not torch.allclose(ref, other)
    assert torch.allclose(invalid, first, atol=1e-5)


@pytest.mark.parametrize("name", ["bevformer_synth", "uvtr_synth", "bevformer_base_nus", "uvtr_c_nus"])
def test_shipped_configs_build(name: str) -> None:
    """Every shipped student config loads and builds; the nuScenes ones carry the real shapes."""
    from pipelines.config import load_config
    from stxd_train.fit import StudentRunConfig

    cfg = load_config(StudentRunConfig, REPO / "configs" / "student" / f"{name}.yaml")
    student = build_student(cfg.model)
    assert cfg.model.grid.same_range(BEVGrid.square(51.2, 128))   # the shipped caches' range
    state = student.state_dict()
    if name.endswith("_nus"):
        assert cfg.model.grid.shape == (200, 200) and cfg.model.embed_dims == 256
        assert cfg.data.image_size == (1600, 900)
        # ResNet-101 with torchvision's names and shapes, so ImageNet weights load.
        assert state["image_encoder.backbone.layer3.22.conv3.weight"].shape == (1024, 256, 1, 1)
        if name.startswith("bevformer"):
            assert len(student.layers) == 6 and student.bev_embedding.weight.shape == (40000, 256)
    else:
        assert cfg.model.grid.shape == (64, 64)
