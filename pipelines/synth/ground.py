"""The ground of one scene as a raster at the devkit's native map resolution (0.1 m, origin at global
(0, 0)): surface kinds for LiDAR intensity and the map mask, and a textured albedo for the cameras."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.synth import world

RESOLUTION = 0.1  # m per cell: the devkit's native map resolution

GRASS, ASPHALT, PAINT_WHITE, PAINT_YELLOW, PARKING, SIDEWALK, CURB = range(7)

#: RGB albedo per surface kind (muted, so that the saturated object colours stand out).
_ALBEDO = np.array([
    [88, 104, 70],    # grass
    [74, 74, 78],     # asphalt
    [225, 225, 220],  # white paint
    [214, 178, 60],   # yellow paint
    [92, 90, 92],     # parking asphalt
    [158, 152, 146],  # sidewalk
    [190, 186, 180],  # curb
], dtype=np.float32)

#: LiDAR intensity (0..255) per surface kind: paint is retro-reflective.
INTENSITY = np.array([4.0, 9.0, 70.0, 60.0, 11.0, 22.0, 30.0], dtype=np.float32)


@dataclass(frozen=True)
class Ground:
    """Surface kind and albedo per 0.1 m cell; row 0 is y = 0 (flip rows for the map PNG)."""

    kind: np.ndarray     # (H, W) uint8
    albedo: np.ndarray   # (H, W, 3) uint8

    def lookup(self, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Kind (N,) and albedo (N, 3) at global points `xy: (N, 2)`; grass outside the raster."""
        col = np.floor(xy[:, 0] / RESOLUTION).astype(np.int64)
        row = np.floor(xy[:, 1] / RESOLUTION).astype(np.int64)
        h, w = self.kind.shape
        inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
        col, row = np.where(inside, col, 0), np.where(inside, row, 0)
        kind = np.where(inside, self.kind[row, col], GRASS)
        albedo = np.where(inside[:, None], self.albedo[row, col], _ALBEDO[GRASS].astype(np.uint8))
        return kind, albedo

    def drivable_mask_png_rows(self) -> np.ndarray:
        """(H, W) uint8 map mask (255 = drivable) with row 0 at the top (largest y), as the devkit reads it."""
        drivable = np.isin(self.kind, (ASPHALT, PAINT_WHITE, PAINT_YELLOW, PARKING))
        return (drivable[::-1] * 255).astype(np.uint8)


def _surface(s: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Surface kind at arc length `s` and lateral offset `d`."""
    a = np.abs(d)
    kind = np.full(s.shape, GRASS, dtype=np.uint8)
    kind[a < world.SIDEWALK[1]] = SIDEWALK
    kind[(a >= world.SIDEWALK[0]) & (a < world.SIDEWALK[0] + 0.25)] = CURB
    kind[a < world.PARKING[1]] = PARKING
    kind[a < world.PARKING[0]] = ASPHALT
    dash = (np.mod(s, 9.0) < 3.0)
    kind[(np.abs(a - world.LANE_WIDTH) < 0.08) & dash] = PAINT_WHITE            # lane dividers
    kind[np.abs(a - world.ROAD_EDGE) < 0.1] = PAINT_WHITE                        # road edge
    kind[(np.abs(a - world.PARKING[0]) < 0.06) & (np.mod(s, 6.0) < 4.0)] = PAINT_WHITE  # bike lane
    kind[np.abs(a - 0.18) < 0.07] = PAINT_YELLOW                                 # double centre line
    return kind


def build(road: world.Road, extent: tuple[int, int], rng: np.random.Generator) -> Ground:
    """Rasterise `road` over a `extent = (W, H)`-cell raster whose cell (0, 0) starts at global (0, 0)."""
    width, height = extent
    kind = np.full((height, width), GRASS, dtype=np.uint8)
    ds = dd = 0.05
    d = np.arange(-world.SIDEWALK[1] - 1.0, world.SIDEWALK[1] + 1.0, dd)
    for start in range(0, len(road.s) - 1, 400):   # in slabs, to bound memory
        stop = min(start + 400, len(road.s) - 1)
        centre = road.xy[start:stop + 1] / RESOLUTION
        if (centre[:, 0].max() < -300 or centre[:, 1].max() < -300 or centre[:, 0].min() > width + 300
                or centre[:, 1].min() > height + 300):
            continue   # this stretch of road lies outside the raster
        s = np.arange(road.s[start], road.s[stop], ds)
        ss, dd_grid = np.meshgrid(s, d, indexing="ij")
        xy, _ = road.pose(ss.ravel(), dd_grid.ravel())
        col = np.floor(xy[:, 0] / RESOLUTION).astype(np.int64)
        row = np.floor(xy[:, 1] / RESOLUTION).astype(np.int64)
        ok = (col >= 0) & (col < width) & (row >= 0) & (row < height)
        surf = _surface(ss.ravel(), dd_grid.ravel())
        # paint and kerb must win over the surface around them where samples share a cell
        order = np.argsort(np.isin(surf, (PAINT_WHITE, PAINT_YELLOW, CURB)), kind="stable")
        kind[row[order][ok[order]], col[order][ok[order]]] = surf[order][ok[order]]
    noise = rng.normal(1.0, 0.07, size=(height, width)).astype(np.float32)
    coarse = rng.normal(1.0, 0.05, size=(height // 20 + 1, width // 20 + 1)).astype(np.float32)
    noise *= np.kron(coarse, np.ones((20, 20), dtype=np.float32))[:height, :width]
    albedo = np.clip(_ALBEDO[kind] * noise[..., None], 0, 255).astype(np.uint8)
    return Ground(kind=kind, albedo=albedo)
