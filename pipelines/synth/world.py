"""The synthetic world of one scene: a road with turns, an ego driving it with speed changes, and
actors that drive lanes, park beside the road or walk its sidewalks.

Cross-section of the road (lateral offset `d`, metres, positive to the left of the direction of
increasing arc length `s`; traffic keeps right, so the ego's lanes have d < 0):

    |d| < 7.0     four 3.5 m lanes: d = -5.25 (ego lane), -1.75 (passing), +1.75, +5.25 (oncoming)
    7.0..8.5      bike lane, centre ±7.75
    8.5..11.5     parking strip, centre ±10.0: parked vehicles, barrier rows and cone groups
    11.5..15.0    sidewalk: standing pedestrians and parked cycles at ±12.3, walkers at ±13.3, ±14.3
    beyond 15.0   grass

Every actor moves along a *track* (a lateral offset, a direction and a speed shared by all actors on
it), so actors on one track keep their spacing and never intersect. Positions, headings and
velocities are therefore exact functions of time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.classes import DETECTION_CLASSES

LANE_WIDTH = 3.5
ROAD_EDGE = 7.0
PARKING = (8.5, 11.5)
SIDEWALK = (11.5, 15.0)
DRIVABLE_HALF_WIDTH = PARKING[1]
EGO_LANE = -5.25
EGO_SPEED = (2.0, 11.0)

#: Mean (w, l, h) in metres per class, close to the nuScenes annotation means.
CLASS_SIZES: dict[str, tuple[float, float, float]] = {
    "car": (1.95, 4.62, 1.73),
    "truck": (2.51, 6.93, 2.84),
    "construction_vehicle": (2.85, 6.37, 3.19),
    "bus": (2.94, 11.19, 3.47),
    "trailer": (2.90, 12.29, 3.87),
    "barrier": (2.53, 0.50, 0.98),
    "motorcycle": (0.77, 2.11, 1.47),
    "bicycle": (0.61, 1.70, 1.29),
    "pedestrian": (0.67, 0.73, 1.77),
    "traffic_cone": (0.41, 0.41, 1.07),
}

#: Height of a cycle with its rider (nuScenes boxes include the rider).
RIDER_HEIGHT = 1.75


@dataclass(frozen=True)
class Road:
    """A road centreline sampled every `ds` metres of arc length."""

    s: np.ndarray          # (K,) arc length
    xy: np.ndarray         # (K, 2) global position
    heading: np.ndarray    # (K,) unwrapped heading, rad

    @staticmethod
    def random(rng: np.random.Generator, length: float, ds: float = 0.25) -> Road:
        """Straights and arcs of random radius and angle, starting at the origin along +x."""
        curvature: list[np.ndarray] = []
        total = 0.0
        straight = True
        while total < length:
            if straight:
                seg = rng.uniform(40.0, 110.0)
                kappa = 0.0
            else:
                radius = rng.uniform(45.0, 140.0)
                seg = radius * np.deg2rad(rng.uniform(20.0, 75.0))
                kappa = rng.choice([-1.0, 1.0]) / radius
            n = max(1, round(seg / ds))
            curvature.append(np.full(n, kappa))
            total += n * ds
            straight = not straight if rng.random() < 0.8 else straight
        kappa_all = np.concatenate(curvature)
        heading = np.concatenate([[0.0], np.cumsum(kappa_all * ds)])
        mid = 0.5 * (heading[1:] + heading[:-1])
        steps = np.stack([np.cos(mid), np.sin(mid)], axis=1) * ds
        xy = np.concatenate([np.zeros((1, 2)), np.cumsum(steps, axis=0)])
        s = np.arange(len(heading)) * ds
        return Road(s=s, xy=xy, heading=heading)

    def shifted(self, offset: np.ndarray) -> Road:
        """The same road translated by `offset: (2,)`."""
        return Road(s=self.s, xy=self.xy + offset, heading=self.heading)

    def pose(self, s: np.ndarray, d: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """Global xy `(..., 2)` and heading `(...)` of the point at arc length `s`, lateral offset `d`.

        Beyond the sampled ends the road continues straight.
        """
        s = np.asarray(s, dtype=np.float64)
        heading = np.interp(s, self.s, self.heading)
        x = np.interp(s, self.s, self.xy[:, 0])
        y = np.interp(s, self.s, self.xy[:, 1])
        for end, idx in ((self.s[0], 0), (self.s[-1], -1)):
            beyond = (s < end) if idx == 0 else (s > end)
            if np.any(beyond):
                extra = np.where(beyond, s - end, 0.0)
                h = self.heading[idx]
                x = np.where(beyond, self.xy[idx, 0] + extra * np.cos(h), x)
                y = np.where(beyond, self.xy[idx, 1] + extra * np.sin(h), y)
        normal = np.stack([-np.sin(heading), np.cos(heading)], axis=-1)
        xy = np.stack([x, y], axis=-1) + np.asarray(d)[..., None] * normal
        return xy, heading


@dataclass(frozen=True)
class Track:
    """A lateral offset along the road on which every actor moves with the same signed speed."""

    d: float
    direction: int      # +1 along increasing s, -1 against it
    speed: float        # m/s along the centreline parameter, >= 0


@dataclass(frozen=True)
class Actor:
    """One annotated object: its class, category, size and place on a track."""

    ident: int
    class_name: str
    category: str
    size: tuple[float, float, float]   # w, l, h
    track: Track
    s0: float                          # arc length at t = 0
    yaw_offset: float                  # heading relative to the track direction
    attribute: str                     # nuScenes attribute name, '' for barriers and cones
    color_jitter: tuple[float, float, float]  # hue (deg), saturation and value multipliers

    @property
    def label(self) -> int:
        return DETECTION_CLASSES.index(self.class_name)


def actor_states(road: Road, actors: list[Actor], t: float) -> np.ndarray:
    """Boxes of `actors` at time `t` (s) in the global frame: (N, 9) [x, y, z, w, l, h, yaw, vx, vy]."""
    out = np.zeros((len(actors), 9))
    if not actors:
        return out
    d = np.array([a.track.d for a in actors])
    rate = np.array([a.track.direction * a.track.speed for a in actors])
    s0 = np.array([a.s0 for a in actors])
    eps = 1e-3
    xy, heading = road.pose(s0 + rate * t, d)
    xy_next, _ = road.pose(s0 + rate * (t + eps), d)
    xy_prev, _ = road.pose(s0 + rate * (t - eps), d)
    backwards = np.array([a.track.direction < 0 for a in actors])
    yaw = heading + np.where(backwards, np.pi, 0.0) + np.array([a.yaw_offset for a in actors])
    out[:, 0:2] = xy
    out[:, 3:6] = np.array([a.size for a in actors])
    out[:, 2] = out[:, 5] / 2.0
    out[:, 6] = np.arctan2(np.sin(yaw), np.cos(yaw))
    out[:, 7:9] = (xy_next - xy_prev) / (2 * eps)
    return out


@dataclass(frozen=True)
class EgoMotion:
    """The ego's arc length on its lane as a function of time, with smooth speed changes."""

    t: np.ndarray   # (T,) s
    s: np.ndarray   # (T,) arc length

    @staticmethod
    def random(rng: np.random.Generator, duration: float, s_start: float) -> EgoMotion:
        knots_t = np.arange(-2.0, duration + 4.0, 2.0)
        knots_v = rng.uniform(*EGO_SPEED, size=len(knots_t))
        if rng.random() < 0.2:  # sometimes a stop, as at a junction
            knots_v[rng.integers(1, len(knots_v) - 1)] = 0.0
        t = np.arange(-2.0, duration + 2.0, 0.01)
        v = np.interp(t, knots_t, knots_v)
        s = s_start + np.concatenate([[0.0], np.cumsum(0.5 * (v[1:] + v[:-1]) * 0.01)])
        s -= np.interp(0.0, t, s) - s_start
        return EgoMotion(t=t, s=s)

    def pose(self, road: Road, t: float) -> tuple[np.ndarray, float]:
        """Global xy (2,) and heading of the ego at time `t`."""
        s = float(np.interp(t, self.t, self.s))
        xy, heading = road.pose(np.array(s), EGO_LANE)
        return xy, float(heading)

    @property
    def max_speed(self) -> float:
        return float(np.max(np.diff(self.s) / np.diff(self.t)))


def _jitter(rng: np.random.Generator) -> tuple[float, float, float]:
    return (float(rng.uniform(-6, 6)), float(rng.uniform(0.85, 1.1)), float(rng.uniform(0.8, 1.1)))


def _size(rng: np.random.Generator, class_name: str) -> tuple[float, float, float]:
    scale = rng.uniform(0.9, 1.1, size=3)
    return tuple(float(v) for v in np.array(CLASS_SIZES[class_name]) * scale)  # type: ignore[return-value]


_CATEGORY = {
    "car": "vehicle.car", "truck": "vehicle.truck", "construction_vehicle": "vehicle.construction",
    "bus": "vehicle.bus.rigid", "trailer": "vehicle.trailer", "barrier": "movable_object.barrier",
    "motorcycle": "vehicle.motorcycle", "bicycle": "vehicle.bicycle",
    "pedestrian": "human.pedestrian.adult", "traffic_cone": "movable_object.trafficcone",
}

# Class mixes per kind of track; the densities below give roughly nuScenes' class frequencies.
_LANE_MIX = {"car": 0.72, "truck": 0.16, "bus": 0.04, "trailer": 0.03, "construction_vehicle": 0.03,
             "motorcycle": 0.02}
_PARKING_MIX = {"car": 0.64, "truck": 0.12, "trailer": 0.04, "construction_vehicle": 0.04, "bus": 0.02,
                "barrier": 0.09, "traffic_cone": 0.05}
_CURB_MIX = {"pedestrian": 0.6, "bicycle": 0.12, "motorcycle": 0.08, "traffic_cone": 0.2}
_BIKE_MIX = {"bicycle": 0.55, "motorcycle": 0.45}


def _pick(rng: np.random.Generator, mix: dict[str, float]) -> str:
    names = list(mix)
    p = np.array([mix[n] for n in names])
    return names[int(rng.choice(len(names), p=p / p.sum()))]


class _Placer:
    """Allocates non-overlapping intervals of arc length on one track (in the track's own frame)."""

    def __init__(self) -> None:
        self.used: list[tuple[float, float]] = []

    def try_place(self, s: float, half_extent: float, gap: float) -> bool:
        lo, hi = s - half_extent - gap, s + half_extent + gap
        if any(lo < b and a < hi for a, b in self.used):
            return False
        self.used.append((lo, hi))
        return True


def populate(rng: np.random.Generator, s_range: tuple[float, float], ego_max_speed: float,
             ego_path: tuple[float, float]) -> list[Actor]:
    """Random actors on the road tracks over `s_range` (arc length at t = 0).

    One static actor of every detection class is placed first beside the ego's path
    (`ego_path` = its first and last arc length, ±25 m), so that every scene shows all 10 classes.
    """
    actors: list[Actor] = []
    lo, hi = s_range

    def add(class_name: str, track: Track, s: float, placer: _Placer, yaw_offset: float = 0.0,
            attribute: str = "", gap: float = 1.0, size: tuple[float, float, float] | None = None) -> bool:
        size = size or _size(rng, class_name)
        across = abs(np.sin(yaw_offset)) > 0.7   # rotated by ~90°: the width lies along the track
        half = 0.5 * (size[0] if across else size[1])
        if not placer.try_place(s, half, gap):
            return False
        actors.append(Actor(ident=len(actors), class_name=class_name, category=_CATEGORY[class_name],
                            size=size, track=track, s0=s, yaw_offset=yaw_offset, attribute=attribute,
                            color_jitter=_jitter(rng)))
        return True

    def spots(density_per_100m: float) -> np.ndarray:
        n = rng.poisson(density_per_100m * (hi - lo) / 100.0)
        return np.sort(rng.uniform(lo, hi, size=n))

    parking = {side: (Track(d=side * 10.0, direction=1, speed=0.0), _Placer()) for side in (-1, 1)}
    curb = {side: (Track(d=side * 12.3, direction=1, speed=0.0), _Placer()) for side in (-1, 1)}

    def add_parked(name: str, side: int, s: float, on_curb: bool = True) -> bool:
        """A static actor: vehicles and barriers in the parking strip, the rest at the curb (or in the
        strip too, with `on_curb=False`)."""
        if name in ("traffic_cone", "pedestrian", "bicycle", "motorcycle"):
            track, placer = curb[side] if on_curb else parking[side]
            if name == "pedestrian":
                return add(name, track, s, placer, yaw_offset=float(rng.uniform(-np.pi, np.pi)),
                           attribute="pedestrian.standing", gap=0.4)
            if name == "traffic_cone":
                return add(name, track, s, placer, yaw_offset=float(rng.uniform(-3, 3)), gap=0.4)
            if on_curb:   # along it: across, a cycle would reach into the walkers' track and the parked cars
                yaw = float(rng.normal(0.0, 0.05)) + (np.pi if rng.random() < 0.5 else 0.0)
            else:
                yaw = float(rng.normal(np.pi / 2, 0.1))
            return add(name, track, s, placer, yaw_offset=yaw, attribute="cycle.without_rider", gap=0.3)
        track, placer = parking[side]
        if name == "barrier":
            return add(name, track, s, placer, yaw_offset=np.pi / 2, gap=0.3)
        flip = np.pi if rng.random() < 0.15 else 0.0
        return add(name, track, s, placer, yaw_offset=flip + float(rng.normal(0.0, 0.03)),
                   attribute="vehicle.parked", gap=0.8)

    for name in DETECTION_CLASSES:
        for _ in range(60):
            # in the parking strip, where parked cars cannot hide it from the ego's sensors
            if add_parked(name, int(rng.choice([-1, 1])), float(rng.uniform(ego_path[0] - 25, ego_path[1] + 25)),
                          on_curb=False):
                break

    # Driving lanes: the passing lane and the two oncoming lanes; the ego lane only ahead of the ego,
    # faster than the ego ever drives, so nothing ever runs into it.
    lanes = [
        Track(d=-1.75, direction=1, speed=float(rng.uniform(6.0, 13.0))),
        Track(d=1.75, direction=-1, speed=float(rng.uniform(5.0, 13.0))),
        Track(d=5.25, direction=-1, speed=0.0 if rng.random() < 0.25 else float(rng.uniform(4.0, 11.0))),
        Track(d=EGO_LANE, direction=1, speed=ego_max_speed + 1.5),
    ]
    for track in lanes:
        placer = _Placer()
        for s in spots(5.5):
            if track.d == EGO_LANE and s < ego_path[0] + 18.0:
                continue
            name = _pick(rng, _LANE_MIX)
            moving = track.speed > 0
            added = add(name, track, s, placer, attribute="vehicle.moving" if moving else "vehicle.stopped",
                        gap=4.0 if moving else 1.5)
            if added and name == "motorcycle":
                actors[-1] = _with_rider(actors[-1])
    # Bike lanes: cyclists riding with the traffic on their side.
    for side in (-1, 1):
        track = Track(d=side * 7.75, direction=-side, speed=float(rng.uniform(3.0, 7.0)))
        placer = _Placer()
        for s in spots(0.5):
            if add(_pick(rng, _BIKE_MIX), track, s, placer, gap=2.0):
                actors[-1] = _with_rider(actors[-1])
    # Parking strips: parked vehicles, rows of barriers, groups of cones.
    for side in (-1, 1):
        track, placer = parking[side]
        for s in spots(13.0):
            name = _pick(rng, _PARKING_MIX)
            if name == "barrier":
                size = _size(rng, "barrier")
                for k in range(int(rng.integers(3, 6))):
                    add("barrier", track, s + k * (size[0] + 0.15), placer, yaw_offset=np.pi / 2,
                        gap=0.05, size=size)
            elif name == "traffic_cone":
                for k in range(int(rng.integers(2, 5))):
                    add("traffic_cone", track, s + k * 2.0, placer, yaw_offset=float(rng.uniform(-3, 3)),
                        gap=0.3)
            else:
                add_parked(name, side, s)
    # Sidewalks: standing people, cones and parked cycles at the curb, walkers on two tracks each side.
    for side in (-1, 1):
        for s in spots(3.0):
            add_parked(_pick(rng, _CURB_MIX), side, s)
        for d, direction in ((13.3, 1), (14.3, -1)):
            walk = Track(d=side * d, direction=direction, speed=float(rng.uniform(0.9, 1.7)))
            placer = _Placer()
            for s in spots(1.6):
                add("pedestrian", walk, s, placer, attribute="pedestrian.moving", gap=0.6)
    return actors


def _with_rider(actor: Actor) -> Actor:
    """A cycle ridden by a person: the box includes the rider, as nuScenes annotates it."""
    width, length, _ = actor.size
    return Actor(ident=actor.ident, class_name=actor.class_name, category=actor.category,
                 size=(width, length, RIDER_HEIGHT * float(np.clip(actor.size[2] / 1.4, 0.95, 1.05))),
                 track=actor.track, s0=actor.s0, yaw_offset=actor.yaw_offset,
                 attribute="cycle.with_rider", color_jitter=actor.color_jitter)

