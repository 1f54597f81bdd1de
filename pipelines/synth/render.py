"""Camera rendering by ray casting: a textured ground with lane marks, a sky, and the boxes as shaded,
class-coloured solids with simple detail (windows, wheels, legs, heads with hair, riders, cone stripes), all
z-ordered per pixel. Also reports how many pixels of each box are visible, for `visibility`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.boxes import box_corners
from pipelines.synth import ground as ground_mod
from pipelines.synth.raycast import Solid, ray_ground, ray_solid, world_normals
from pipelines.synth.rig import Camera

_SKY_HORIZON = np.array([196.0, 206.0, 216.0])
_SKY_ZENITH = np.array([96.0, 138.0, 204.0])
_FOG = np.array([185.0, 192.0, 200.0])
_VEHICLE_LABELS = (0, 1, 2, 3, 4)
_PEDESTRIAN, _CONE, _BARRIER = 8, 9, 5
_CYCLE_LABELS = (6, 7)


@dataclass(frozen=True)
class RenderedBoxes:
    """Per box: pixels where it is the nearest surface, and pixels it would cover with no occluder."""

    visible: np.ndarray   # (N,) int64
    full: np.ndarray      # (N,) int64


def render(camera: Camera, position: np.ndarray, world_from_camera: np.ndarray, boxes: np.ndarray,
           solids: list[Solid], labels: np.ndarray, colors: np.ndarray, ground: ground_mod.Ground,
           sun: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, RenderedBoxes]:
    """Render one camera image.

    Args:
        camera: intrinsics and image size.
        position: (3,) camera centre, global frame; world_from_camera: (3, 3) rotation.
        boxes: (N, 9) global annotation boxes; solids: the N objects' shapes (global);
        labels: (N,) class labels; colors: (N, 3) base RGB 0..255.
        ground: the scene's ground raster. sun: (3,) unit vector towards the sun.

    Returns:
        image (H, W, 3) uint8, and the per-box pixel counts.
    """
    width, height = camera.size
    u, v = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    pix = np.stack([u.ravel(), v.ravel(), np.ones(u.size)], axis=1)
    dirs = pix @ np.linalg.inv(camera.intrinsic).T @ world_from_camera.T
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)

    depth = ray_ground(float(position[2]), dirs, 600.0)
    owner = np.full(len(dirs), -1, dtype=np.int64)
    face = np.zeros(len(dirs), dtype=np.int8)
    local = np.zeros((len(dirs), 3))
    part_centre = np.ones(len(dirs))   # height of the hit part's centre above the object's bottom
    cabin = np.zeros(len(dirs), dtype=bool)
    full = np.zeros(len(boxes), dtype=np.int64)
    for i, box in enumerate(boxes):
        idx = _candidate_pixels(camera, position, world_from_camera, box)
        if idx is None:
            continue
        t_in, _, f, loc, part = ray_solid(position, dirs[idx], solids[i])
        hit = np.isfinite(t_in)
        full[i] = int(hit.sum())
        closer = hit & (t_in < depth[idx])
        sel = idx[closer]
        depth[sel], owner[sel], face[sel], local[sel] = t_in[closer], i, f[closer], loc[closer]
        part_centre[sel] = solids[i].parts[part[closer], 2] - (box[2] - box[5] / 2)
        cabin[sel] = solids[i].cabin[part[closer]]

    color = np.empty((len(dirs), 3))
    sky = ~np.isfinite(depth)
    elevation = np.clip(dirs[sky, 2] * 3.0, 0.0, 1.0)[:, None]
    color[sky] = _SKY_HORIZON * (1 - elevation) + _SKY_ZENITH * elevation
    on_ground = np.isfinite(depth) & (owner < 0)
    hit_xy = position[:2] + dirs[on_ground, :2] * depth[on_ground, None]
    _, albedo = ground.lookup(hit_xy)
    color[on_ground] = albedo * (0.55 + 0.45 * max(sun[2], 0.0))
    on_box = owner >= 0
    if np.any(on_box):
        color[on_box] = _shade_boxes(boxes, labels, colors, owner[on_box], face[on_box], local[on_box],
                                     part_centre[on_box], cabin[on_box], sun)
    fog = 1.0 - np.exp(-np.where(np.isfinite(depth), depth, 0.0) / 350.0)
    color = color * (1 - fog[:, None]) + _FOG * fog[:, None]
    color += rng.normal(0.0, 2.0, size=color.shape)
    image = np.clip(color, 0, 255).astype(np.uint8).reshape(height, width, 3)
    visible = np.bincount(owner[on_box], minlength=len(boxes)).astype(np.int64)
    return image, RenderedBoxes(visible=visible, full=full)


def _candidate_pixels(camera: Camera, position: np.ndarray, world_from_camera: np.ndarray,
                      box: np.ndarray) -> np.ndarray | None:
    """Flat pixel indices inside the projected bounding rectangle of `box`; None if it is behind."""
    width, height = camera.size
    cam = (box_corners(box[None])[0] - position) @ world_from_camera
    front = cam[:, 2] > 0.05
    if not front.any() or np.linalg.norm(box[:2] - position[:2]) > 250.0:
        return None
    if front.all():
        uvw = cam @ camera.intrinsic.T
        uv = uvw[:, :2] / uvw[:, 2:3]
        u0, v0 = np.floor(uv.min(axis=0)).astype(int)
        u1, v1 = np.ceil(uv.max(axis=0)).astype(int)
        u0, u1 = max(u0, 0), min(u1, width - 1)
        v0, v1 = max(v0, 0), min(v1, height - 1)
        if u0 > u1 or v0 > v1:
            return None
    else:   # straddles the image plane: test every pixel
        u0, v0, u1, v1 = 0, 0, width - 1, height - 1
    uu, vv = np.meshgrid(np.arange(u0, u1 + 1), np.arange(v0, v1 + 1))
    return (vv * width + uu).ravel()


def _shade_boxes(boxes: np.ndarray, labels: np.ndarray, colors: np.ndarray, owner: np.ndarray,
                 face: np.ndarray, local: np.ndarray, part_centre: np.ndarray, cabin: np.ndarray,
                 sun: np.ndarray) -> np.ndarray:
    """(P, 3) shaded colour of object pixels from the owner's base colour, the face and the hit height;
    `local` is relative to the hit part, whose centre is `part_centre` above the object's bottom (parts
    need not stand on the ground); `cabin` marks window-bearing parts."""
    yaw = boxes[owner, 6]
    normals = world_normals(face, yaw)
    light = 0.5 + 0.5 * np.clip(normals @ sun, 0.0, 1.0)
    base = colors[owner].copy()
    label = labels[owner]
    height = boxes[owner, 5]
    zf = (local[:, 2] + part_centre) / height            # height above ground over the object's height
    yf = local[:, 1] / boxes[owner, 3] + 0.5             # 0 on the right side, 1 on the left
    side = face < 4
    vehicle = np.isin(label, _VEHICLE_LABELS)
    base = np.where((vehicle & side & cabin & (zf > 0.68))[:, None], 0.3 * base + np.array([38.0, 44.0, 56.0]),
                    base)
    base = np.where((vehicle & side & (zf < 0.14))[:, None], 0.3 * base, base)
    ped = label == _PEDESTRIAN
    base = np.where((ped & (zf < 0.42))[:, None], 0.45 * base + 18.0, base)
    head = ped & (zf > 0.86)
    base = np.where(head[:, None], np.array([205.0, 164.0, 132.0]), base)
    # hair on the back (face 0) and top (face 5) of the head, the face in front: a heading cue in the image
    base = np.where((head & ((face == 0) | (face == 5)))[:, None], np.array([58.0, 42.0, 34.0]), base)
    # a ridden cycle is at least 1.66 m tall, a riderless one at most 1.62 m (`world.RIDER_HEIGHT`)
    rider = np.isin(label, _CYCLE_LABELS) & (height > 1.64) & (zf > 0.62)
    base = np.where(rider[:, None], np.array([64.0, 62.0, 70.0]), base)
    base = np.where(((label == _CONE) & (zf > 0.62) & (zf < 0.74))[:, None], 235.0, base)
    # along a barrier's long side; clipped so that both end faces (yf = 0 and 1) match, as a barrier has no front
    stripes = (label == _BARRIER) & (np.mod(np.clip(np.floor(yf * 5), 0, 4), 2) == 1)
    base = np.where(stripes[:, None], 0.6 * base, base)
    return base * light[:, None]

