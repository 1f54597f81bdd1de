"""Shapes of the synthetic objects: each class as a union of upright boxes ("parts") inside its annotation
box, shared by the LiDAR and the cameras.

A plain box looks the same after a half turn, so neither sensor could tell its front from its back. Every
class that has a front in nuScenes therefore gets a shape cue of a few decimetres or more: big enough to
catch at least one of the 32 beams at 10..30 m and several pixels of a 400×224 image. Barriers and traffic
cones stay plain boxes, as the devkit scores their heading: barrier yaw only modulo 180° (`yaw_diff(...,
period=np.pi)`), traffic-cone yaw not at all.

The parts stay inside the annotation box and reach its every face (the pedestrian's front excepted), so
the annotation box remains the object's bounding box.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_WHOLE, _FULL = (-0.5, 0.5), (0.0, 1.0)


@dataclass(frozen=True)
class Part:
    """One upright box of a shape, as fractions of the annotation box, in the box frame."""

    x: tuple[float, float]   # along the length: -0.5 = back, +0.5 = front (the heading)
    y: tuple[float, float]   # across: -0.5 = right, +0.5 = left
    z: tuple[float, float]   # up: 0 = bottom (the ground), 1 = top
    cabin: bool = False      # carries windows (vehicles)


def _cycle_with_rider(frame_top: float, bar: tuple[float, float], bar_top: float) -> tuple[Part, ...]:
    """A ridden cycle: a low frame, a handlebar at the front and a rider leaning over it."""
    return (
        Part(_WHOLE, (-0.2, 0.2), (0.0, frame_top)),                  # wheels and frame
        Part(bar, (-0.2, 0.2), (frame_top, bar_top)),                 # fork and stem
        Part(bar, _WHOLE, (bar_top - 0.08, bar_top)),                 # handlebar
        Part((-0.2, 0.04), (-0.32, 0.32), (frame_top, 0.72)),         # rider's legs and hips, on the saddle
        Part((-0.12, 0.18), (-0.32, 0.32), (0.72, 1.0)),              # rider's torso and head
        Part((0.16, bar[0] + 0.08), (-0.32, 0.32), (0.64, 0.8)),      # rider's arms, reaching forward
    )


#: Shape of each class; classes not listed (barrier, traffic_cone) are their whole box.
SHAPES: dict[str, tuple[Part, ...]] = {
    # a lower hood in front of the cabin: 28% of the length, 55% of the height
    **{name: (Part((-0.5, 0.22), _WHOLE, _FULL, cabin=True), Part((0.22, 0.5), _WHOLE, (0.0, 0.55)))
       for name in ("car", "truck", "construction_vehicle")},
    # a lower front with the windscreen: 1.6 m at 78% of the height (a 0.75 m step in the roof line)
    "bus": (Part((-0.5, 0.36), _WHOLE, _FULL), Part((0.36, 0.5), _WHOLE, (0.0, 0.78))),
    # a semi-trailer: the body rides 1.1 m up on the rear axles and, at the front, on thin landing legs
    "trailer": (
        Part(_WHOLE, _WHOLE, (0.28, 1.0)),
        Part((-0.5, -0.22), (-0.45, 0.45), (0.0, 0.28)),   # rear axles: 3.4 m
        Part((0.18, 0.22), (-0.4, 0.4), (0.0, 0.28)),      # landing legs: 0.5 m
    ),
    # a narrow low frame (wheels, engine, seat) with a fork, windscreen and handlebar up at the front
    "motorcycle": (
        Part(_WHOLE, (-0.25, 0.25), (0.0, 0.58)),
        Part((0.2, 0.4), (-0.25, 0.25), (0.58, 1.0)),
        Part((0.2, 0.4), _WHOLE, (0.7, 0.8)),
    ),
    "bicycle": (
        Part(_WHOLE, (-0.2, 0.2), (0.0, 0.55)),
        Part((0.22, 0.4), (-0.2, 0.2), (0.55, 1.0)),
        Part((0.22, 0.4), _WHOLE, (0.86, 1.0)),
    ),
    # a walking posture: legs back, torso ahead of them, head ahead of the torso
    "pedestrian": (
        Part((-0.5, 0.0), (-0.32, 0.32), (0.0, 0.5)),
        Part((-0.2, 0.4), _WHOLE, (0.5, 0.86)),
        Part((0.05, 0.45), (-0.2, 0.2), (0.86, 1.0)),
    ),
}

#: Shapes of cycles ridden by a person: nuScenes boxes include the rider.
RIDDEN_SHAPES: dict[str, tuple[Part, ...]] = {
    "motorcycle": _cycle_with_rider(0.5, (0.2, 0.42), 0.68),
    "bicycle": _cycle_with_rider(0.4, (0.22, 0.4), 0.62),
}


def shape(class_name: str, *, ridden: bool = False) -> tuple[Part, ...]:
    """The parts of `class_name`'s shape (of a cycle with its rider if `ridden`)."""
    if ridden and class_name in RIDDEN_SHAPES:
        return RIDDEN_SHAPES[class_name]
    return SHAPES.get(class_name, (Part(_WHOLE, _WHOLE, _FULL),))


def solid_parts(box: np.ndarray, class_name: str, *, ridden: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Parts (K, 9) of the solid inside annotation box `box: (9,)` [x, y, z, w, l, h, yaw, vx, vy], in the
    frame of `box`, and which parts carry windows (K,)."""
    parts = shape(class_name, ridden=ridden)
    frac = np.array([[*p.x, *p.y, *p.z] for p in parts])           # (K, 6)
    width, length, height = box[3], box[4], box[5]
    centre_x = 0.5 * (frac[:, 0] + frac[:, 1]) * length
    centre_y = 0.5 * (frac[:, 2] + frac[:, 3]) * width
    c, s = np.cos(box[6]), np.sin(box[6])
    out = np.repeat(box[None, :], len(parts), axis=0)
    out[:, 0] = box[0] + c * centre_x - s * centre_y
    out[:, 1] = box[1] + s * centre_x + c * centre_y
    out[:, 2] = box[2] + (0.5 * (frac[:, 4] + frac[:, 5]) - 0.5) * height
    out[:, 3] = (frac[:, 3] - frac[:, 2]) * width
    out[:, 4] = (frac[:, 1] - frac[:, 0]) * length
    out[:, 5] = (frac[:, 5] - frac[:, 4]) * height
    return out, np.array([p.cabin for p in parts])
