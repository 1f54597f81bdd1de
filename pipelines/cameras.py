"""Camera images: loading, resizing and normalisation, with intrinsics and `lidar2img` kept consistent."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipelines.errors import SensorFileError
from pipelines.nuscenes import SampleInfo

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class CameraBatch:
    """The six cameras of one sample, ready for a network."""

    images: np.ndarray      # (6, 3, H, W) float32, normalised
    intrinsics: np.ndarray  # (6, 3, 3) for the resized images
    lidar2img: np.ndarray   # (6, 4, 4) keyframe LiDAR frame → resized-image pixels
    channels: tuple[str, ...]


def load_image(path: str | Path) -> Image.Image:
    """An RGB image; a SensorFileError names the file if it is missing or not an image."""
    path = Path(path)
    if not path.is_file():
        raise SensorFileError(f"camera image {path} is missing; the dataset root is incomplete (check it with "
                              "`stxd-data check`) or --dataroot points to the wrong folder")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise SensorFileError(f"camera image {path} cannot be decoded ({exc}); re-download or re-generate it") \
            from None


def scale_intrinsic(intrinsic: np.ndarray, src_size: tuple[int, int], dst_size: tuple[int, int]) -> np.ndarray:
    """(3, 3) intrinsics of an image resized from `src_size` to `dst_size` (width, height)."""
    sx, sy = dst_size[0] / src_size[0], dst_size[1] / src_size[1]
    return np.diag([sx, sy, 1.0]) @ intrinsic


def load_cameras(sample: SampleInfo, size: tuple[int, int] | None = None,
                 mean: tuple[float, float, float] = IMAGENET_MEAN,
                 std: tuple[float, float, float] = IMAGENET_STD, *, scale: float = 1.0,
                 offset: tuple[float, float] = (0.0, 0.0),
                 adjust: Callable[[Image.Image], Image.Image] | None = None) -> CameraBatch:
    """Load, resize (bilinear) and normalise the six images of `sample`, with matching intrinsics.

    Args:
        sample: the indexed sample.
        size: output (width, height); None keeps each stored size (they must agree).
        mean, std: per-channel RGB normalisation in 0..255 units.
        scale: resize to `scale` × `size` first, then cut a `size` window (augmentation; 1 for none).
        offset: where the window sits, as fractions (x, y) of the margin between the scaled image and the
            window; where the scaled image is smaller, the rest of the window is 0 (the mean colour).
        adjust: a photometric change applied to each resized PIL image (e.g. brightness), or None.
    """
    images, intrinsics, lidar2img = [], [], []
    mean_arr, std_arr = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    for cam in sample.cameras:
        img = load_image(cam.path)
        if img.size != cam.size:
            raise SensorFileError(f"camera image {cam.path} is {img.size[0]}x{img.size[1]} but sample_data "
                                  f"says {cam.size[0]}x{cam.size[1]}; the file and the tables disagree")
        w, h = size or cam.size
        sw, sh = round(w * scale), round(h * scale)
        if (sw, sh) != img.size:
            img = img.resize((sw, sh), Image.Resampling.BILINEAR)
        if adjust is not None:
            img = adjust(img)
        arr = (np.asarray(img, dtype=np.float32) - mean_arr) / std_arr
        # The window's top-left corner in the scaled image (negative: the scaled image is smaller).
        x0, y0 = round((sw - w) * offset[0]), round((sh - h) * offset[1])
        if (x0, y0, sw, sh) != (0, 0, w, h):
            canvas = np.zeros((h, w, 3), np.float32)
            sx, sy, dx, dy = max(x0, 0), max(y0, 0), max(-x0, 0), max(-y0, 0)
            cw, ch = min(w - dx, sw - sx), min(h - dy, sh - sy)
            canvas[dy:dy + ch, dx:dx + cw] = arr[sy:sy + ch, sx:sx + cw]
            arr = canvas
        k = np.diag([1.0, 1.0, 1.0])
        k[:2, 2] = (-x0, -y0)
        k = k @ scale_intrinsic(cam.intrinsic, cam.size, (sw, sh))
        k4 = np.eye(4)
        k4[:3, :3] = k
        images.append(arr.transpose(2, 0, 1))
        intrinsics.append(k)
        lidar2img.append(k4 @ cam.lidar2cam)
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise SensorFileError(f"sample {sample.token}: camera images have different sizes {sorted(shapes)}; "
                              "pass an explicit size to resize them to one")
    return CameraBatch(images=np.stack(images), intrinsics=np.stack(intrinsics).astype(np.float32),
                       lidar2img=np.stack(lidar2img).astype(np.float32),
                       channels=tuple(c.channel for c in sample.cameras))
