"""The BEV grid: a metric range cut into cells, shared by the teacher cache, the students and the losses.

Row 0 is `y_min` and column 0 is `x_min`; a feature map on a grid is `(..., C, H, W)` with H rows along y
and W columns along x. Derived values (`shape`, `cell_centers`) are properties, never config fields.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from pipelines.errors import ConfigError

# Relative tolerance for "the range is a whole number of cells".
_CELL_COUNT_RTOL = 1e-6


def _pair(name: str, value: Any) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"grid field `{name}` is {value!r}; expected two numbers, e.g. [-51.2, 51.2]"
        ) from None
    if not (math.isfinite(a) and math.isfinite(b)):
        raise ConfigError(f"grid field `{name}` is {value!r}; expected two finite numbers")
    return a, b


@dataclass(frozen=True)
class BEVGrid:
    """A bird's-eye-view grid in the LiDAR frame of the keyframe."""

    x_range: tuple[float, float]
    """(x_min, x_max) in metres; columns run along x."""
    y_range: tuple[float, float]
    """(y_min, y_max) in metres; rows run along y."""
    cell_size: tuple[float, float]
    """(x, y) size of one cell in metres; each range must be a whole number of cells."""

    def __post_init__(self) -> None:
        for name in ("x_range", "y_range", "cell_size"):
            # Normalise lists from YAML / JSON to float tuples so that equality and hashing work.
            object.__setattr__(self, name, _pair(name, getattr(self, name)))
        for axis, (lo, hi) in zip("xy", (self.x_range, self.y_range), strict=True):
            if not lo < hi:
                raise ConfigError(
                    f"grid field `{axis}_range` is [{lo:g}, {hi:g}]; expected min < max, e.g. [-51.2, 51.2]"
                )
        for axis, cell in zip("xy", self.cell_size, strict=True):
            if not cell > 0:
                raise ConfigError(f"grid field `cell_size` has {axis} = {cell:g}; expected a size > 0 metres")
        for i, (axis, (lo, hi)) in enumerate(zip("xy", (self.x_range, self.y_range), strict=True)):
            count = (hi - lo) / self.cell_size[i]
            if abs(count - round(count)) > _CELL_COUNT_RTOL * max(count, 1.0) or round(count) < 1:
                raise ConfigError(
                    f"grid field `{axis}_range` spans {hi - lo:g} m, which is {count:.6g} cells of "
                    f"{self.cell_size[i]:g} m; expected a whole number of cells: change `{axis}_range` or "
                    "`cell_size`"
                )

    @classmethod
    def square(cls, half_extent: float, size: int) -> BEVGrid:
        """A grid of ±`half_extent` metres in x and y with `size`×`size` cells."""
        if size < 1:
            raise ConfigError(f"grid size is {size}; expected at least 1 cell")
        cell = 2.0 * half_extent / size
        extent = (-half_extent, half_extent)
        return cls(x_range=extent, y_range=extent, cell_size=(cell, cell))

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W): number of cells along y (rows) and along x (columns)."""
        rows = round((self.y_range[1] - self.y_range[0]) / self.cell_size[1])
        cols = round((self.x_range[1] - self.x_range[0]) / self.cell_size[0])
        return rows, cols

    @property
    def cell_centers(self) -> np.ndarray:
        """(H, W, 2) float32 (x, y) metric centres of the cells."""
        rows, cols = self.shape
        xs = self.x_range[0] + (np.arange(cols) + 0.5) * self.cell_size[0]
        ys = self.y_range[0] + (np.arange(rows) + 0.5) * self.cell_size[1]
        grid_x, grid_y = np.meshgrid(xs, ys, indexing="xy")
        return np.stack([grid_x, grid_y], axis=-1).astype(np.float32)

    def describe(self) -> str:
        """One line for messages, e.g. `x -51.2..51.2 m, y -51.2..51.2 m at 128x128 (0.8 m cells)`."""
        rows, cols = self.shape
        cx, cy = self.cell_size
        cells = f"{cx:g} m" if math.isclose(cx, cy) else f"{cx:g}x{cy:g} m"
        return (
            f"x {self.x_range[0]:g}..{self.x_range[1]:g} m, y {self.y_range[0]:g}..{self.y_range[1]:g} m "
            f"at {rows}x{cols} ({cells} cells)"
        )

    def same_range(self, other: BEVGrid, tol: float = 1e-6) -> bool:
        """Whether both grids cover the same metric area (their resolutions may differ)."""
        mine = (*self.x_range, *self.y_range)
        theirs = (*other.x_range, *other.y_range)
        return all(math.isclose(a, b, rel_tol=tol, abs_tol=tol) for a, b in zip(mine, theirs, strict=True))

    def to_dict(self) -> dict[str, list[float]]:
        """JSON- and YAML-friendly form; `from_dict` reads it back."""
        return {f.name: list(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BEVGrid:
        """The grid described by `d` (as written by `to_dict`); unknown or missing keys are errors."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"grid is {d!r}; expected a mapping with keys x_range, y_range, cell_size")
        expected = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(expected))
        missing = [k for k in expected if k not in d]
        if unknown or missing:
            raise ConfigError(
                f"grid has unknown keys {unknown} and missing keys {missing}; expected exactly {expected}"
            )
        return cls(**{k: d[k] for k in expected})

    def contains(self, xy: np.ndarray) -> np.ndarray:
        """(...,) bool: whether metric points (..., 2) lie inside the grid's area (lower edges included)."""
        xy = np.asarray(xy, dtype=np.float64)
        return ((xy[..., 0] >= self.x_range[0]) & (xy[..., 0] < self.x_range[1])
                & (xy[..., 1] >= self.y_range[0]) & (xy[..., 1] < self.y_range[1]))

    def world_to_cell(self, xy: Any) -> Any:
        """Continuous (col, row) indices of metric points; cell centres are at integer values.

        xy: (..., 2) (x, y) in metres, numpy or torch. Returns (..., 2) of the same kind (numpy: float64).
        """
        origin = (self.x_range[0] + 0.5 * self.cell_size[0], self.y_range[0] + 0.5 * self.cell_size[1])
        if type(xy).__module__.startswith("torch"):
            return (xy - xy.new_tensor(origin)) / xy.new_tensor(self.cell_size)
        return (np.asarray(xy, dtype=np.float64) - np.array(origin)) / np.array(self.cell_size)


def _sampling_grid(src: BEVGrid, dst: BEVGrid) -> tuple[np.ndarray, np.ndarray]:
    """`grid_sample` coordinates of dst cell centres in src, (H_dst, W_dst, 2), and whether each centre
    lies within the src range, (H_dst, W_dst)."""
    # Recompute in float64: `cell_centers` is float32 for storage, too coarse for exact sampling.
    rows, cols = dst.shape
    xs = dst.x_range[0] + (np.arange(cols) + 0.5) * dst.cell_size[0]
    ys = dst.y_range[0] + (np.arange(rows) + 0.5) * dst.cell_size[1]
    centers = np.stack(np.meshgrid(xs, ys, indexing="xy"), axis=-1)
    lo = np.array([src.x_range[0], src.y_range[0]])
    hi = np.array([src.x_range[1], src.y_range[1]])
    # With align_corners=False, -1 and +1 are the outer edges of the src map, i.e. its metric range.
    normalised = 2.0 * (centers - lo) / (hi - lo) - 1.0
    slack = 1e-9 * (hi - lo)
    inside = ((centers >= lo - slack) & (centers <= hi + slack)).all(axis=-1)
    return normalised, inside


def _pooling_factors(src: BEVGrid, dst: BEVGrid) -> tuple[int, int] | None:
    """(rows, cols) of src cells per dst cell when `dst` covers the range of `src` with cells made of a whole
    number of src cells along each axis (at least one of them more than 1); None otherwise."""
    if not src.same_range(dst):
        return None
    (src_rows, src_cols), (dst_rows, dst_cols) = src.shape, dst.shape
    if src_rows % dst_rows or src_cols % dst_cols or (src_rows, src_cols) == (dst_rows, dst_cols):
        return None
    return src_rows // dst_rows, src_cols // dst_cols


def resample(features: Any, src: BEVGrid, dst: BEVGrid) -> Any:
    """Features on grid `src` brought to the cells of grid `dst`, e.g. a teacher BEV map onto the distillation
    grid, or a cached map onto the student's grid.

    features: (..., C, H_src, W_src) on `src`, numpy or torch. Returns (..., C, H_dst, W_dst) on `dst`, of
    the same kind, dtype and device.

    - Same grid: a copy.
    - Same range, each dst cell a whole block of ry × rx src cells (e.g. 128 → 32: 4 × 4): the mean of the block
      (`avg_pool2d`). Point sampling there would alias: at 128 → 32 each dst cell would read only the middle
      2 × 2 of its 4 × 4 block, and features finer than the dst cells (small objects) would be missed or not
      depending on where they fall in the block. At a ratio of 2 both give the block mean.
    - Any other pair (upsampling, a non-integer ratio such as 180 → 128, another range): bilinear point sampling
      at the dst cell centres (`grid_sample`). Between the outermost src cell centres and the src edge the
      border value is used; dst centres outside the src range get exactly zero.

    The teacher cache, the online teacher and the distiller all call this one function, so that cached and online
    records stay the same.
    """
    import torch
    import torch.nn.functional as F

    is_numpy = not isinstance(features, torch.Tensor)
    if is_numpy:
        array = np.ascontiguousarray(features)
        # torch.from_numpy warns on read-only buffers (e.g. memory-mapped caches); copy those.
        tensor = torch.from_numpy(array if array.flags.writeable else array.copy())
    else:
        tensor = features
    if tensor.ndim < 2 or tuple(tensor.shape[-2:]) != src.shape:
        raise ValueError(
            f"features of shape {tuple(tensor.shape)} do not match src grid {src.describe()}; "
            f"expected (..., {src.shape[0]}, {src.shape[1]})"
        )
    if not tensor.is_floating_point():
        raise TypeError(f"resample needs floating-point features, got {tensor.dtype}")
    if src.shape == dst.shape and src.same_range(dst):
        return tensor.clone().numpy() if is_numpy else tensor.clone()
    work_dtype = tensor.dtype if tensor.dtype in (torch.float32, torch.float64) else torch.float32
    lead = tensor.shape[:-2]
    flat = tensor.reshape(1, math.prod(lead), *src.shape).to(work_dtype)
    factors = _pooling_factors(src, dst)
    if factors is not None:
        sampled = F.avg_pool2d(flat, kernel_size=factors, stride=factors)
    else:
        normalised, inside = _sampling_grid(src, dst)
        grid = torch.as_tensor(normalised, dtype=work_dtype, device=tensor.device)[None]
        sampled = F.grid_sample(flat, grid, mode="bilinear", padding_mode="border", align_corners=False)
        mask = torch.as_tensor(inside, device=tensor.device)
        sampled = torch.where(mask, sampled, torch.zeros((), dtype=work_dtype, device=tensor.device))
    out = sampled.reshape(*lead, *dst.shape).to(tensor.dtype)
    return out.numpy() if is_numpy else out
