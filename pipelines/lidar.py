"""LiDAR points: `.pcd.bin` reading and multi-sweep aggregation into the keyframe LiDAR frame."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipelines.errors import SensorFileError
from pipelines.nuscenes import SampleInfo

POINT_DIM = 5   # nuScenes .pcd.bin: x, y, z, intensity, ring (float32)


def load_points(path: str | Path) -> np.ndarray:
    """(N, 5) float32 [x, y, z, intensity, ring] in the sensor frame.

    Raises SensorFileError naming the file if it is missing or empty, if its size is not a whole number of
    points, or if any value is NaN or infinite: a nuScenes sweep holds only finite returns, so such a file is
    corrupt, and dropping its points quietly would train and cache on a damaged scan.
    """
    path = Path(path)
    if not path.is_file():
        raise SensorFileError(f"LiDAR file {path} is missing; the dataset root is incomplete (check it with "
                              "`stxd-data check`) or --dataroot points to the wrong folder")
    size = path.stat().st_size
    if size == 0 or size % (4 * POINT_DIM):
        found = "is empty (0 bytes)" if size == 0 else f"has {size} bytes, not a multiple of {4 * POINT_DIM}"
        raise SensorFileError(f"LiDAR file {path} {found}; expected a non-zero multiple of {4 * POINT_DIM} bytes "
                              f"({POINT_DIM} float32 per point): the file is truncated or not nuScenes .pcd.bin; "
                              "re-download or re-generate it")
    points = np.fromfile(path, dtype=np.float32).reshape(-1, POINT_DIM)
    finite = np.isfinite(points)
    if not finite.all():
        bad_rows = np.flatnonzero(~finite.all(axis=1))
        raise SensorFileError(
            f"LiDAR file {path} holds {int((~finite).sum())} non-finite values (NaN or ±inf) in {len(bad_rows)} of "
            f"its {len(points)} points (first at point {int(bad_rows[0])}); expected finite x, y, z, intensity and "
            "ring values: the file is corrupt; re-download or re-generate it")
    return points


def load_sweeps(sample: SampleInfo, *, num_sweeps: int = 10,
                point_range: Sequence[float] | None = None, min_distance: float = 1.0) -> np.ndarray:
    """The keyframe plus up to `num_sweeps - 1` previous sweeps, in the keyframe LiDAR frame.

    Args:
        sample: the indexed sample.
        num_sweeps: frames in total, the keyframe included (CenterPoint on nuScenes uses 10).
        point_range: optional `[x_min, y_min, z_min, x_max, y_max, z_max]` filter, keyframe frame.
        min_distance: sweep points nearer than this to their own sensor (the ego roof) are dropped.

    Returns:
        (N, 5) float32 [x, y, z, intensity, time_lag] with time_lag in seconds (0 for the keyframe).
    """
    parts = []
    for sweep in (sample.lidar, *sample.sweeps[: max(0, num_sweeps - 1)]):
        pts = load_points(sweep.path)
        if sweep.time_lag > 0:
            pts = pts[np.hypot(pts[:, 0], pts[:, 1]) >= min_distance]
        xyz = pts[:, :3].astype(np.float64) @ sweep.to_keyframe_lidar[:3, :3].T + sweep.to_keyframe_lidar[:3, 3]
        lag = np.full((len(pts), 1), sweep.time_lag)
        parts.append(np.concatenate([xyz, pts[:, 3:4], lag], axis=1).astype(np.float32))
    points = np.concatenate(parts) if parts else np.zeros((0, POINT_DIM), dtype=np.float32)
    if point_range is not None:
        lo, hi = np.asarray(point_range[:3]), np.asarray(point_range[3:])
        points = points[np.all((points[:, :3] >= lo) & (points[:, :3] <= hi), axis=1)]
    return points
