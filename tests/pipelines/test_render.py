"""Box pictures: projection of 3D boxes into a camera, and the notes of an empty cache row."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np

from pipelines.grid import BEVGrid
from pipelines.render import ego_forward, project_edges
from stxd_cache.render import render_record

# A pinhole camera at the LiDAR origin looking along +x (camera z), image x along -y and image y along -z.
K = np.array([[200.0, 0.0, 320.0], [0.0, 200.0, 240.0], [0.0, 0.0, 1.0]])
LIDAR2CAM = np.array([[0.0, -1.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
LIDAR2IMG = np.eye(4)
LIDAR2IMG[:3, :3] = K
LIDAR2IMG = LIDAR2IMG @ LIDAR2CAM


def test_a_box_ahead_projects_around_its_centre_and_one_behind_not_at_all() -> None:
    ahead = np.array([[10.0, 0.0, 0.0, 2.0, 4.0, 2.0, 0.0]])
    segments = project_edges(ahead, LIDAR2IMG, (640, 480))
    assert len(segments) == 12
    points = np.concatenate(segments)
    # Its centre at 10 m ahead projects to the principal point; its near face (8 m, ±1 m) spans 200 * 1 / 8 px.
    assert np.allclose(points.mean(axis=0), [320.0, 240.0], atol=1e-6)
    assert np.isclose(points[:, 0].max(), 320 + 200 * 1.0 / 8.0)
    assert project_edges(np.array([[-10.0, 0.0, 0.0, 2.0, 4.0, 2.0, 0.0]]), LIDAR2IMG, (640, 480)) == []
    assert project_edges(np.array([[10.0, 80.0, 0.0, 2.0, 4.0, 2.0, 0.0]]), LIDAR2IMG, (640, 480)) == []


def test_ego_forward_of_a_lidar_turned_on_the_car() -> None:
    assert np.isclose(ego_forward(np.eye(4)), 0.0)
    turned = np.eye(4)   # nuScenes-like: the LiDAR's +y is the car's +x
    turned[:2, :2] = [[0.0, 1.0], [-1.0, 0.0]]
    assert np.isclose(ego_forward(turned), np.pi / 2)


def test_an_empty_row_says_so(tmp_path: Path) -> None:
    grid = BEVGrid.square(8.0, 8)
    rng = np.random.default_rng(0)
    box = np.array([[1.0, 2.0, 0.0, 1.0, 2.0, 1.0, 0.3, 0.0, 0.0]], np.float32)
    row = {"bev": rng.normal(size=(4, 8, 8)).astype(np.float32), "boxes": np.zeros((3, 9), np.float32),
           "scores": np.zeros(3, np.float32)}
    empty = SimpleNamespace(**row, count=0)
    assert render_record(empty, grid, tmp_path / "a.png", gt_boxes=box) == "no teacher box in this row"
    low = SimpleNamespace(**{**row, "boxes": np.repeat(box, 3, 0), "scores": np.array([0.2, 0.1, 0.0])}, count=2)
    assert render_record(low, grid, tmp_path / "b.png") == "no teacher box scores >= 0.3 (best 0.20)"
    assert render_record(low, grid, tmp_path / "c.png", min_score=0.15) == ""
    assert all((tmp_path / f).read_bytes()[:4] == b"\x89PNG" for f in ("a.png", "b.png", "c.png"))
