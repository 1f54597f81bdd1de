"""Camera loading: resizing keeps intrinsics and lidar2img consistent; missing files are named."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pipelines.cameras import load_cameras
from pipelines.errors import SensorFileError


def test_resize_scales_projection(val_index) -> None:
    sample = val_index[0]
    native = load_cameras(sample)
    w, h = sample.cameras[0].size
    half = load_cameras(sample, size=(w // 2, h // 2))
    assert native.images.shape == (6, 3, h, w)
    assert half.images.shape == (6, 3, h // 2, w // 2)
    assert abs(float(native.images.mean())) < 2.0   # normalised
    point = np.array([10.0, 5.0, -1.0, 1.0])
    for a, b in zip(native.lidar2img, half.lidar2img, strict=True):
        pa, pb = a @ point, b @ point
        assert pb[2] == pytest.approx(pa[2], rel=1e-5)
        assert pb[0] / pb[2] == pytest.approx(pa[0] / pa[2] * (w // 2) / w, rel=1e-4)
        assert pb[1] / pb[2] == pytest.approx(pa[1] / pa[2] * (h // 2) / h, rel=1e-4)
    assert half.channels[0] == "CAM_FRONT"


def test_missing_image_is_named(val_index, tmp_path: Path) -> None:
    sample = val_index[0]
    cams = list(sample.cameras)
    copy = tmp_path / "front.jpg"
    shutil.copy(cams[0].path, copy)
    cams[0] = replace(cams[0], path=str(tmp_path / "absent.jpg"))
    with pytest.raises(SensorFileError, match=r"absent\.jpg is missing"):
        load_cameras(replace(sample, cameras=tuple(cams)))
    copy.write_bytes(b"not a jpeg")
    cams[0] = replace(cams[0], path=str(copy))
    with pytest.raises(SensorFileError, match="cannot be decoded"):
        load_cameras(replace(sample, cameras=tuple(cams)))
