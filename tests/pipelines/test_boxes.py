"""Box geometry against shapely and the real nuScenes devkit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nuscenes.utils.data_classes import Box
from nuscenes.utils.geometry_utils import points_in_box
from pyquaternion import Quaternion
from shapely.geometry import Polygon

from pipelines import geometry
from pipelines.boxes import (
    BOX_DIM,
    CODE_DIM,
    bev_iou,
    box_corners,
    box_corners_bev,
    boxes_from_global,
    boxes_to_global,
    decode_boxes,
    encode_boxes,
    points_in_boxes,
)

LIDAR2EGO = geometry.transform_matrix([0.94, 0.0, 1.84], geometry.quaternion_from_yaw(-np.pi / 2))
EGO2GLOBAL = geometry.transform_matrix([300.0, 200.0, 0.0], geometry.quaternion_from_yaw(0.7))


def random_boxes(rng: np.random.Generator, n: int, spread: float = 4.0) -> np.ndarray:
    boxes = np.zeros((n, BOX_DIM), dtype=np.float32)
    boxes[:, :2] = rng.uniform(-spread, spread, (n, 2))
    boxes[:, 2] = rng.uniform(-1, 1, n)
    boxes[:, 3:6] = rng.uniform(0.5, 5.0, (n, 3))
    boxes[:, 6] = rng.uniform(-np.pi, np.pi, n)
    boxes[:, 7:9] = rng.normal(0, 5, (n, 2))
    return boxes


def shapely_iou(a: np.ndarray, b: np.ndarray) -> float:
    pa, pb = Polygon(box_corners_bev(a[None])[0]), Polygon(box_corners_bev(b[None])[0])
    return pa.intersection(pb).area / pa.union(pb).area


def test_corners_bev_are_counter_clockwise_with_the_box_area():
    boxes = random_boxes(np.random.default_rng(0), 20)
    corners = box_corners_bev(boxes)
    x, y = corners[..., 0], corners[..., 1]
    signed = 0.5 * (x * np.roll(y, -1, axis=1) - np.roll(x, -1, axis=1) * y).sum(axis=1)
    np.testing.assert_allclose(signed, boxes[:, 3] * boxes[:, 4], rtol=1e-5)


def test_corners_match_the_devkit_order():
    boxes = random_boxes(np.random.default_rng(1), 5)
    ours = box_corners(boxes)
    for box, corners in zip(boxes, ours, strict=True):
        devkit = Box(box[:3].tolist(), box[3:6].tolist(), Quaternion(axis=[0, 0, 1], angle=float(box[6])))
        np.testing.assert_allclose(corners, devkit.corners().T, atol=1e-5)


def test_corners_put_the_length_along_yaw():
    box = np.array([[1.0, 2.0, 0.0, 2.0, 4.0, 1.0, np.pi / 2, 0.0, 0.0]])
    xy = box_corners_bev(box)[0]
    np.testing.assert_allclose(np.ptp(xy[:, 0]), 2.0, atol=1e-9)
    np.testing.assert_allclose(np.ptp(xy[:, 1]), 4.0, atol=1e-9)


def test_bev_iou_matches_shapely_on_random_pairs():
    rng = np.random.default_rng(2)
    a = random_boxes(rng, 200)
    b = random_boxes(rng, 200)
    b[:20] = a[:20]  # identical
    b[20:40, :2] = a[20:40, :2] + 50.0  # disjoint
    b[40:60] = a[40:60]  # nested: same centre and yaw, smaller
    b[40:60, 3:5] *= 0.5
    b[60:80] = a[60:80]  # parallel edges: shifted along the heading
    b[60:80, 0] += np.cos(a[60:80, 6]) * 0.3 * a[60:80, 4]
    b[60:80, 1] += np.sin(a[60:80, 6]) * 0.3 * a[60:80, 4]
    b[80:100] = a[80:100]  # rotated by 90° about the same centre
    b[80:100, 6] += np.pi / 2
    iou = bev_iou(a, b)
    assert iou.shape == (200, 200) and iou.dtype == np.float64
    expected = np.array([shapely_iou(a[i], b[i]) for i in range(200)])
    np.testing.assert_allclose(np.diag(iou), expected, atol=1e-6)
    np.testing.assert_allclose(np.diag(iou)[:20], 1.0, atol=1e-9)
    assert np.all(np.diag(iou)[20:40] == 0.0)
    np.testing.assert_allclose(np.diag(iou)[40:60], 0.25, atol=1e-6)
    assert (0.0 < np.diag(iou)[100:]).sum() > 20  # enough random pairs actually overlap
    # Off-diagonal pairs too, against shapely on a sample.
    for i, j in rng.integers(0, 200, (100, 2)):
        assert abs(iou[i, j] - shapely_iou(a[i], b[j])) < 1e-6


def test_bev_iou_is_symmetric_and_ignores_z_and_velocity():
    rng = np.random.default_rng(3)
    a, b = random_boxes(rng, 30), random_boxes(rng, 40)
    np.testing.assert_allclose(bev_iou(a, b), bev_iou(b, a).T, atol=1e-12)
    shifted = b.copy()
    shifted[:, 2] += 10.0
    shifted[:, 7:9] = 0.0
    np.testing.assert_allclose(bev_iou(a, b), bev_iou(a[:, :7], shifted[:, :7]), atol=1e-12)


def test_bev_iou_handles_empty_inputs_and_touching_boxes():
    boxes = random_boxes(np.random.default_rng(4), 3)
    assert bev_iou(boxes, np.zeros((0, 9))).shape == (3, 0)
    assert bev_iou(np.zeros((0, 7)), boxes).shape == (0, 3)
    left = np.array([[0.0, 0.0, 0.0, 2.0, 2.0, 1.0, 0.0]])
    right = np.array([[2.0, 0.0, 0.0, 2.0, 2.0, 1.0, 0.0]])  # shares an edge
    half = np.array([[1.0, 0.0, 0.0, 2.0, 2.0, 1.0, 0.0]])  # half overlap, collinear edges
    assert bev_iou(left, right)[0, 0] == pytest.approx(0.0, abs=1e-9)
    assert bev_iou(left, half)[0, 0] == pytest.approx(1.0 / 3.0, abs=1e-9)


def test_bev_iou_does_not_modify_its_arguments():
    a = random_boxes(np.random.default_rng(5), 4)
    before = a.copy()
    bev_iou(a, a)
    np.testing.assert_array_equal(a, before)


def test_encode_decode_round_trip_numpy():
    boxes = random_boxes(np.random.default_rng(6), 50)
    codes = encode_boxes(boxes)
    assert isinstance(codes, np.ndarray) and codes.shape == (50, CODE_DIM)
    np.testing.assert_allclose(codes[:, 3:6], np.log(boxes[:, 3:6]), rtol=1e-6)
    np.testing.assert_allclose(codes[:, 6] ** 2 + codes[:, 7] ** 2, 1.0, atol=1e-6)
    decoded = decode_boxes(codes)
    assert isinstance(decoded, np.ndarray) and decoded.shape == (50, BOX_DIM)
    np.testing.assert_allclose(decoded, boxes, atol=1e-5)


def test_encode_decode_round_trip_torch():
    boxes = torch.from_numpy(random_boxes(np.random.default_rng(7), 50))
    codes = encode_boxes(boxes)
    assert isinstance(codes, torch.Tensor) and codes.shape == (50, CODE_DIM) and codes.dtype == torch.float32
    np.testing.assert_allclose(codes.numpy(), encode_boxes(boxes.numpy()), atol=1e-6)
    decoded = decode_boxes(codes)
    assert isinstance(decoded, torch.Tensor) and decoded.dtype == torch.float32
    torch.testing.assert_close(decoded, boxes, atol=1e-5, rtol=1e-5)


def test_points_in_boxes_matches_the_devkit():
    rng = np.random.default_rng(8)
    boxes = random_boxes(rng, 10, spread=3.0)
    points = np.concatenate([rng.uniform(-6, 6, (2000, 3)), rng.normal(0, 1, (2000, 1))], axis=1)
    mask = points_in_boxes(points, boxes)
    assert mask.shape == (10, 2000) and mask.dtype == bool
    for box, row in zip(boxes, mask, strict=True):
        devkit = Box(box[:3].tolist(), box[3:6].tolist(), Quaternion(axis=[0, 0, 1], angle=float(box[6])))
        np.testing.assert_array_equal(row, points_in_box(devkit, points[:, :3].T))
    assert mask.sum() > 100


def test_points_in_boxes_boundaries_are_inclusive():
    box = np.array([[0.0, 0.0, 0.0, 2.0, 4.0, 2.0, 0.0]])
    points = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0], [2.0, 1.0, -1.0], [2.0001, 0.0, 0.0]])
    np.testing.assert_array_equal(points_in_boxes(points, box)[0], [True, True, True, False])


def test_boxes_global_round_trip():
    boxes = random_boxes(np.random.default_rng(9), 25)
    labels, scores = list(range(25)), np.linspace(0.1, 0.9, 25)
    names = [f"obj{i}" for i in range(25)]
    devkit = boxes_to_global(boxes, LIDAR2EGO, EGO2GLOBAL, labels=labels, scores=scores, names=names)
    assert len(devkit) == 25 and all(isinstance(b, Box) for b in devkit)
    assert devkit[3].label == 3 and devkit[3].score == pytest.approx(scores[3]) and devkit[3].name == "obj3"
    back = boxes_from_global(devkit, LIDAR2EGO, EGO2GLOBAL)
    assert back.shape == (25, BOX_DIM) and back.dtype == np.float32
    no_yaw = [0, 1, 2, 3, 4, 5, 7, 8]
    np.testing.assert_allclose(back[:, no_yaw], boxes[:, no_yaw], atol=1e-4)
    dyaw = np.angle(np.exp(1j * (back[:, 6] - boxes[:, 6])))
    np.testing.assert_allclose(dyaw, 0.0, atol=1e-5)


def test_boxes_to_global_transforms_centre_and_rotates_velocity():
    box = np.array([[10.0, -3.0, 0.5, 2.0, 4.5, 1.6, 0.3, 2.0, 1.0]], dtype=np.float32)
    (devkit,) = boxes_to_global(box, LIDAR2EGO, EGO2GLOBAL)
    centre = EGO2GLOBAL @ LIDAR2EGO @ np.array([10.0, -3.0, 0.5, 1.0])
    np.testing.assert_allclose(devkit.center, centre[:3], atol=1e-5)
    np.testing.assert_allclose(devkit.wlh, [2.0, 4.5, 1.6], atol=1e-6)
    # LiDAR yaw -90° then ego yaw 0.7: velocity turns by 0.7 - π/2 and is not translated.
    turn = 0.7 - np.pi / 2
    expected = [2.0 * np.cos(turn) - 1.0 * np.sin(turn), 2.0 * np.sin(turn) + 1.0 * np.cos(turn), 0.0]
    np.testing.assert_allclose(devkit.velocity, expected, atol=1e-6)
    assert devkit.orientation.yaw_pitch_roll[0] == pytest.approx(0.3 + turn, abs=1e-6)
    assert np.isnan(devkit.label) and np.isnan(devkit.score) and devkit.name is None


def test_boxes_from_global_keeps_nan_velocity_and_handles_empty():
    devkit = Box([300.0, 200.0, 1.0], [2.0, 4.0, 1.5], Quaternion(axis=[0, 0, 1], angle=0.2))
    back = boxes_from_global([devkit], LIDAR2EGO, EGO2GLOBAL)
    assert np.isnan(back[0, 7:9]).all() and np.isfinite(back[0, :7]).all()
    np.testing.assert_allclose(back[0, 6], 0.2 - (0.7 - np.pi / 2), atol=1e-6)
    empty = boxes_from_global([], LIDAR2EGO, EGO2GLOBAL)
    assert empty.shape == (0, BOX_DIM) and empty.dtype == np.float32
