"""The CenterPoint teacher on tiny inline configs: voxeliser, forward/backward, targets, loss, decoding, NMS,
a short overfit, and the nuScenes and synthetic configs' shapes."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.boxes import encode_boxes, points_in_boxes
from pipelines.classes import DETECTION_CLASSES
from pipelines.errors import ConfigError
from stxd_cache.teacher import (
    BackboneConfig,
    CenterTargets,
    DecodeConfig,
    EncoderConfig,
    HeadConfig,
    NeckConfig,
    TeacherConfig,
    VoxelConfig,
    build_teacher,
    circle_nms,
    rotated_nms,
)
from stxd_cache.teacher.checkpoint import load_teacher_config

REPO = Path(__file__).resolve().parents[2]
CAR, TRUCK, PED, CONE = (DETECTION_CLASSES.index(c) for c in ("car", "truck", "pedestrian", "traffic_cone"))


def tiny_config(block_type: str = "conv_module", **decode: object) -> TeacherConfig:
    """±6.4 m, 0.4 m voxels: sparse shape (9, 32, 32), BEV stride 2 → 16 x 16 cells of 0.8 m."""
    if block_type == "conv_module":
        encoder = EncoderConfig(block_type="conv_module", base_channels=8, encoder_channels=((8,), (16, 16)),
                                encoder_paddings=((1,), (1, 1)), output_channels=8)
    else:
        encoder = EncoderConfig(block_type="basicblock", base_channels=8, encoder_channels=((8, 16), (16,)),
                                encoder_paddings=((0, 1), (0,)), output_channels=8)
    return TeacherConfig(
        name="tiny",
        voxel=VoxelConfig(point_range=(-6.4, -6.4, -2.0, 6.4, 6.4, 1.6), voxel_size=(0.4, 0.4, 0.45),
                          max_points_per_voxel=5, max_voxels=5000),
        encoder=encoder,
        backbone=BackboneConfig(layer_nums=(1, 1), layer_strides=(1, 2), out_channels=(16, 32)),
        neck=NeckConfig(upsample_strides=(1, 2), out_channels=(16, 16)),
        head=HeadConfig(tasks=(("car",), ("pedestrian", "traffic_cone")), share_conv_channels=16,
                        head_conv_channels=8),
        decode=DecodeConfig(**{"nms_radius": (2.0, 0.5), "score_threshold": 0.1, **decode}),  # type: ignore[arg-type]
        num_sweeps=1,
    )


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_teacher(tiny_config(), "cpu")


def random_points(n: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    xyz = rng.uniform([-6.3, -6.3, -1.9], [6.3, 6.3, 1.5], size=(n, 3))
    extra = rng.uniform(0, 1, size=(n, 2))
    return torch.from_numpy(np.concatenate([xyz, extra], axis=1).astype(np.float32))


def scene_boxes() -> tuple[torch.Tensor, torch.Tensor]:
    """A car, a pedestrian and two cones at distinct cells, with yaw and velocity."""
    boxes = torch.tensor([
        [1.3, -2.1, -0.9, 1.9, 4.5, 1.6, 0.7, 3.0, -1.0],
        [-3.7, 2.9, -0.8, 0.6, 0.7, 1.7, -2.5, 0.5, 0.8],
        [4.1, 4.5, -1.4, 0.4, 0.4, 0.7, 0.0, 0.0, 0.0],
        [-4.6, -4.3, -1.4, 0.45, 0.42, 0.75, 1.2, 0.0, 0.0],
    ])
    return boxes, torch.tensor([CAR, PED, CONE, CONE])


def perfect_preds(targets: CenterTargets, shape: tuple[int, int]) -> list[dict[str, torch.Tensor]]:
    """Head outputs that reproduce the targets: logit heatmaps, codes written at the centre cells."""
    preds = []
    for heat, codes, index, mask in zip(targets.heatmaps, targets.codes, targets.indices, targets.masks,
                                        strict=True):
        reg = torch.zeros(heat.shape[0], 10, shape[0] * shape[1])
        for b in range(heat.shape[0]):
            reg[b][:, index[b][mask[b]]] = codes[b][mask[b]].T
        reg = reg.reshape(heat.shape[0], 10, *shape)
        maps = dict(zip(("reg", "height", "dim", "rot", "vel"), reg.split([2, 1, 3, 2, 2], dim=1), strict=True))
        preds.append({**maps, "heatmap": torch.logit(heat.clamp(1e-4, 1 - 1e-4))})
    return preds


def test_voxelizer_mean_feature_and_zyx_coords(model) -> None:
    vox = model.voxelizer
    # Three points in the voxel x 0.8..1.2, y -2.4..-2.0, z -0.2..0.25 m, i.e. (z, y, x) = (4, 10, 18).
    inside = np.array([[0.85, -2.3, 0.0, 10.0, 0.0], [0.95, -2.25, 0.1, 20.0, 0.1], [1.15, -2.05, 0.2, 60.0, 0.2]],
                      dtype=np.float32)
    far = np.array([[-5.0, 5.0, -1.0, 1.0, 0.0], [30.0, 0.0, 0.0, 1.0, 0.0]], dtype=np.float32)  # 2nd: off range
    pts = torch.from_numpy(np.concatenate([inside, far]))
    sparse = vox([pts, torch.from_numpy(far[:1])])
    lo, size = np.array([-6.4, -6.4, -2.0]), np.array([0.4, 0.4, 0.45])
    expected_xyz = np.floor((inside[:, :3] - lo) / size).astype(int)
    assert (expected_xyz == [18, 10, 4]).all()
    idx = sparse.indices.numpy()
    assert idx.shape == (3, 4) and sorted(idx[:, 0].tolist()) == [0, 0, 1]
    assert tuple(sparse.spatial_shape) == model.voxelizer.sparse_shape == (9, 32, 32)
    assert (idx[:, 1:] >= 0).all() and (idx[:, 1:] < np.array(sparse.spatial_shape)).all()
    row = np.flatnonzero((idx[:, 0] == 0) & (idx[:, 1:] == expected_xyz[0][::-1]).all(1))
    assert len(row) == 1  # coords are (z, y, x)
    np.testing.assert_allclose(sparse.features[row[0]].numpy(), inside.mean(axis=0), rtol=1e-6)
    far_z, far_y, far_x = np.floor((far[0, [2, 1, 0]] - lo[::-1]) / size[::-1]).astype(int)
    assert [0, far_z, far_y, far_x] in idx.tolist() and [1, far_z, far_y, far_x] in idx.tolist()


@pytest.mark.parametrize("block_type", ["conv_module", "basicblock"])
def test_forward_backward_shapes_and_gradients(block_type: str) -> None:
    torch.manual_seed(0)
    cfg = tiny_config(block_type)
    teacher = build_teacher(cfg, "cpu")
    out = teacher([random_points(3000, 0), random_points(2000, 1)])
    assert teacher.bev_grid.shape == (16, 16) and teacher.bev_grid == cfg.bev_grid
    assert out.bev.shape == (2, teacher.neck.out_channels, *teacher.bev_grid.shape) == (2, 32, 16, 16)
    assert torch.isfinite(out.bev).all()
    assert [p["heatmap"].shape[1] for p in out.preds] == [1, 2]
    assert {k: tuple(v.shape[1:]) for k, v in out.preds[0].items() if k != "heatmap"} == {
        "reg": (2, 16, 16), "height": (1, 16, 16), "dim": (3, 16, 16), "rot": (2, 16, 16), "vel": (2, 16, 16)}
    boxes, labels = scene_boxes()
    losses = teacher.loss(out, [boxes, boxes[:2]], [labels, labels[:2]])
    sum(losses.values()).backward()
    grads = {n: p.grad for n, p in teacher.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    for name in ("head.task_heads.1.heatmap.1.weight", "head.task_heads.0.dim.1.weight",
                 "middle_encoder.conv_input.0.weight", "backbone.blocks.0.0.weight"):
        assert grads[name].abs().sum() > 0, name


def test_build_targets_single_box_peak_and_code(model) -> None:
    car = torch.tensor([[1.3, -2.1, -0.9, 1.9, 4.5, 1.6, 0.7, 3.0, float("nan")]])
    off_grid = torch.tensor([[20.0, 0.0, -0.9, 1.9, 4.5, 1.6, 0.0, 0.0, 0.0]])
    truck = torch.tensor([[-3.0, 3.0, -0.5, 2.5, 7.0, 3.0, 0.0, 0.0, 0.0]])  # no task predicts trucks
    t = model.head.build_targets([torch.cat([car, off_grid, truck])], [torch.tensor([CAR, CAR, TRUCK])],
                                 model.bev_grid)
    # x: (1.3 + 6.4) / 0.8 = 9.625 → column 9, offset 0.625; y: (-2.1 + 6.4) / 0.8 = 5.375 → row 5.
    heat = t.heatmaps[0][0, 0]
    assert heat[5, 9] == 1.0 and (heat == 1.0).sum() == 1 and t.heatmaps[1].abs().sum() == 0
    assert t.masks[0].sum() == 1 and t.masks[1].sum() == 0 and t.num_objects == 1
    assert t.indices[0][0, 0] == 5 * 16 + 9
    expected = encode_boxes(car.numpy().astype(np.float64))[0]
    expected[:2] = [0.625, 0.375]
    np.testing.assert_allclose(t.codes[0][0, 0].numpy(), expected, atol=1e-5)  # NaN vy stays NaN
    assert torch.isnan(t.codes[0][0, 0, 9])
    assert 0 <= t.codes[0][0, 0, 0] < 1 and 0 <= t.codes[0][0, 0, 1] < 1
    # The radius of a 4.5 x 1.9 m car on 0.8 m cells is below min_radius 2: a 5 x 5 Gaussian, sigma 5 / 6.
    assert (heat > 0).sum() == 25
    assert heat[5, 10].item() == pytest.approx(math.exp(-1 / (2 * (5 / 6) ** 2)), rel=1e-6)


def test_build_targets_maps_classes_to_task_channels(model) -> None:
    boxes, labels = scene_boxes()
    t = model.head.build_targets([boxes], [labels], model.bev_grid)
    assert t.masks[0].sum() == 1 and t.masks[1].sum() == 3
    cone_cell = t.indices[1][0, 1]  # the first cone, second object of task 1
    assert t.heatmaps[1][0, 1].flatten()[cone_cell] == 1.0  # channel 1 of task 1 = traffic_cone
    assert t.heatmaps[1][0, 0].flatten()[cone_cell] < 1.0


def test_decode_perfect_predictions_gives_back_the_boxes(model) -> None:
    boxes, labels = scene_boxes()
    head = build_teacher(tiny_config(score_threshold=0.9), "cpu").head  # the threshold keeps the peaks only
    grid = model.bev_grid
    t = head.build_targets([boxes], [labels], grid)
    (dec,) = head.decode(perfect_preds(t, grid.shape), grid)
    assert len(dec.boxes) == len(boxes) and dec.probs.shape == (len(boxes), 10)
    order = [int(torch.cdist(b[None, :2], dec.boxes[:, :2]).argmin()) for b in boxes]
    got = dec.boxes[order]
    np.testing.assert_allclose(got[:, :3].numpy(), boxes[:, :3].numpy(), atol=1e-4)
    np.testing.assert_allclose(got[:, 3:6].numpy(), boxes[:, 3:6].numpy(), rtol=1e-5)
    yaw_error = torch.remainder(got[:, 6] - boxes[:, 6] + math.pi, 2 * math.pi) - math.pi
    assert yaw_error.abs().max() < 1e-5
    np.testing.assert_allclose(got[:, 7:].numpy(), boxes[:, 7:].numpy(), atol=1e-5)
    assert dec.labels[order].tolist() == labels.tolist() and dec.labels.dtype == torch.int64
    assert torch.allclose(dec.probs[torch.arange(len(dec.labels)), dec.labels], dec.scores)
    assert (dec.probs[:, [TRUCK]] == 0).all()  # no task predicts trucks
    assert (dec.scores[:-1] >= dec.scores[1:]).all()


def test_circle_nms_removes_a_near_duplicate_and_keeps_a_far_one(model) -> None:
    rows, cols = model.bev_grid.shape
    heat = torch.full((1, 1, rows, cols), -9.0)
    heat[0, 0, 8, 8], heat[0, 0, 8, 9], heat[0, 0, 8, 14] = 4.0, 3.0, 2.0  # 0.8 m and 4.8 m from the first
    zeros = {n: torch.zeros(1, c, rows, cols) for n, c in (("reg", 2), ("height", 1), ("dim", 3), ("rot", 2),
                                                            ("vel", 2))}
    other = {**zeros, "heatmap": torch.full((1, 2, rows, cols), -9.0)}
    (dec,) = model.head.decode([{**zeros, "heatmap": heat}, other], model.bev_grid)
    assert dec.labels.tolist() == [CAR, CAR]
    np.testing.assert_allclose(dec.boxes[:, 0].numpy(), [8 * 0.8 - 6.4, 14 * 0.8 - 6.4], atol=1e-5)
    assert dec.scores[0] == pytest.approx(torch.sigmoid(torch.tensor(4.0)).item())
    kept = circle_nms(torch.tensor([[0.0, 0.0], [0.3, 0.0], [5.0, 0.0]]), torch.tensor([0.7, 0.9, 0.8]), 1.0)
    assert kept.tolist() == [1, 2]
    rotated = torch.tensor([[0, 0, 0, 2, 4, 1.5, 0, 0, 0], [0.2, 0, 0, 2, 4, 1.5, 0.1, 0, 0],
                            [9, 0, 0, 2, 4, 1.5, 0, 0, 0]], dtype=torch.float32)
    assert rotated_nms(rotated, torch.tensor([0.5, 0.9, 0.4]), 0.2).tolist() == [1, 2]


def test_loss_zero_objects_and_perfect_below_random(model) -> None:
    grid = model.bev_grid
    head = model.head
    empty = head.build_targets([torch.zeros(0, 9)], [torch.zeros(0, dtype=torch.int64)], grid)
    torch.manual_seed(0)
    random = [{k: torch.randn_like(v, requires_grad=True) for k, v in p.items()}
              for p in perfect_preds(empty, grid.shape)]
    losses = head.loss(random, empty)
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_bbox"] == 0
    sum(losses.values()).backward()
    assert all(torch.isfinite(v.grad).all() for p in random for v in p.values())

    boxes, labels = scene_boxes()
    t = head.build_targets([boxes], [labels], grid)
    perfect = head.loss(perfect_preds(t, grid.shape), t)
    noisy = head.loss([{k: torch.randn_like(v) for k, v in p.items()} for p in perfect_preds(t, grid.shape)], t)
    assert perfect["loss_bbox"] < 1e-5 < noisy["loss_bbox"]
    assert perfect["loss_heatmap"] < 0.1 * noisy["loss_heatmap"]

    unknown_velocity = boxes.clone()
    unknown_velocity[0, 7:] = float("nan")
    t_nan = head.build_targets([unknown_velocity], [labels], grid)
    wrong_velocity = perfect_preds(t, grid.shape)
    wrong_velocity[0]["vel"] = wrong_velocity[0]["vel"] + 5.0  # only the car's task; its velocity is unknown
    assert torch.isfinite(head.loss(wrong_velocity, t_nan)["loss_bbox"])
    assert head.loss(wrong_velocity, t_nan)["loss_bbox"] < 1e-5 < head.loss(wrong_velocity, t)["loss_bbox"]


def synthetic_sample(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A ground plane plus random cars, pedestrians and cones filled with points."""
    rng = np.random.default_rng(seed)
    sizes = {CAR: (1.9, 4.4, 1.6), PED: (0.6, 0.7, 1.7), CONE: (0.4, 0.4, 0.7)}
    boxes, labels = [], []
    for label in (CAR, CAR, PED, PED, CONE, CONE):
        w, length, h = sizes[label]
        boxes.append([*rng.uniform(-5, 5, 2), -1.8 + h / 2, w, length, h, rng.uniform(-np.pi, np.pi),
                      *rng.uniform(-2, 2, 2)])
        labels.append(label)
    box_arr = np.array(boxes)
    ground = np.c_[rng.uniform(-6.3, 6.3, (3000, 2)), np.full(3000, -1.85)]
    cloud = rng.uniform(-1, 1, (20000, 3))
    parts = [ground]
    for b in box_arr:
        local = cloud * b[[4, 3, 5]] / 2  # along, across, up
        c, s = math.cos(b[6]), math.sin(b[6])
        parts.append(np.c_[b[0] + c * local[:, 0] - s * local[:, 1], b[1] + s * local[:, 0] + c * local[:, 1],
                           b[2] + local[:, 2]][:300])
    xyz = np.concatenate(parts)
    assert points_in_boxes(xyz, box_arr).sum(1).min() >= 300
    pts = np.c_[xyz, rng.uniform(0, 1, (len(xyz), 1)), np.zeros((len(xyz), 1))].astype(np.float32)
    return torch.from_numpy(pts), torch.from_numpy(box_arr).float(), torch.tensor(labels)


def test_tiny_teacher_overfits_one_sample() -> None:
    torch.manual_seed(0)
    teacher = build_teacher(tiny_config(), "cpu")
    pts, boxes, labels = synthetic_sample(3)
    opt = torch.optim.Adam(teacher.parameters(), lr=3e-3)
    history = []
    for _ in range(60):
        losses = teacher.loss(teacher([pts]), [boxes], [labels])
        total = losses["loss_heatmap"] + losses["loss_bbox"]
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(total.item())
    assert history[-1] < history[0] / 5, history[::10]


def test_config_files_build_with_expected_bev() -> None:
    nus = load_teacher_config(REPO / "configs" / "teacher" / "centerpoint_nus.yaml")
    assert nus.voxel.sparse_shape == (41, 1440, 1440) and nus.out_stride == 8
    teacher = build_teacher(nus, "cpu")
    assert teacher.bev_grid.shape == (180, 180) and teacher.bev_grid.cell_size == (0.6, 0.6)
    assert teacher.middle_encoder.out_channels == 256 and teacher.neck.out_channels == 512
    assert len(teacher.head.task_heads) == 6
    synth = load_teacher_config(REPO / "configs" / "teacher" / "centerpoint_synth.yaml")
    small = build_teacher(synth, "cpu")
    assert small.bev_grid.shape == (128, 128) and small.bev_grid.cell_size == (0.8, 0.8)
    assert small.neck.out_channels == 128


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="nms_radius"):
        replace(tiny_config(), decode=DecodeConfig(nms_radius=(1.0,)))
    with pytest.raises(ConfigError, match="upsample_strides"):
        replace(tiny_config(), neck=NeckConfig(upsample_strides=(1, 1), out_channels=(16, 16)))
    with pytest.raises(ConfigError, match="tasks"):
        HeadConfig(tasks=(("car",), ("car", "bus")))
    with pytest.raises(ConfigError, match="point_range"):
        VoxelConfig(point_range=(-6.5, -6.4, -2, 6.4, 6.4, 1.6), voxel_size=(0.4, 0.4, 0.45),
                    max_points_per_voxel=5, max_voxels=10)
    with pytest.raises(ConfigError, match="basic block"):
        EncoderConfig(block_type="basicblock", base_channels=8, encoder_channels=((16, 16),),
                      encoder_paddings=((0, 1),))
