"""The nuScenes detection classes, categories, attributes and visibility levels, in devkit order."""

from __future__ import annotations

#: The 10 nuScenes detection classes, in devkit order; labels are indices into this tuple.
DETECTION_CLASSES: tuple[str, ...] = (
    "car", "truck", "construction_vehicle", "bus", "trailer",
    "barrier", "motorcycle", "bicycle", "pedestrian", "traffic_cone",
)

#: All 23 nuScenes object categories (the `category` table), with the detection class each maps to.
CATEGORY_TO_CLASS: dict[str, str | None] = {
    "animal": None,
    "human.pedestrian.adult": "pedestrian",
    "human.pedestrian.child": "pedestrian",
    "human.pedestrian.construction_worker": "pedestrian",
    "human.pedestrian.personal_mobility": None,
    "human.pedestrian.police_officer": "pedestrian",
    "human.pedestrian.stroller": None,
    "human.pedestrian.wheelchair": None,
    "movable_object.barrier": "barrier",
    "movable_object.debris": None,
    "movable_object.pushable_pullable": None,
    "movable_object.trafficcone": "traffic_cone",
    "static_object.bicycle_rack": None,
    "vehicle.bicycle": "bicycle",
    "vehicle.bus.bendy": "bus",
    "vehicle.bus.rigid": "bus",
    "vehicle.car": "car",
    "vehicle.construction": "construction_vehicle",
    "vehicle.emergency.ambulance": None,
    "vehicle.emergency.police": None,
    "vehicle.motorcycle": "motorcycle",
    "vehicle.trailer": "trailer",
    "vehicle.truck": "truck",
}

#: The 8 nuScenes attributes.
ATTRIBUTES: tuple[str, ...] = (
    "vehicle.moving", "vehicle.stopped", "vehicle.parked",
    "cycle.with_rider", "cycle.without_rider",
    "pedestrian.sitting_lying_down", "pedestrian.standing", "pedestrian.moving",
)

#: nuScenes visibility tokens and levels (fraction of the object visible).
VISIBILITY_LEVELS: dict[str, str] = {"1": "v0-40", "2": "v40-60", "3": "v60-80", "4": "v80-100"}

_VEHICLES = {"car", "truck", "construction_vehicle", "bus", "trailer"}
_CYCLES = {"motorcycle", "bicycle"}


def class_index(name: str) -> int:
    """The label of a detection class name."""
    return DETECTION_CLASSES.index(name)


def default_attribute(class_name: str, speed: float) -> str:
    """The attribute that nuScenes submissions conventionally give a class moving at `speed` m/s.

    Barriers and cones have no attribute (empty string), as in the devkit.
    """
    if class_name in _VEHICLES:
        return "vehicle.moving" if speed > 0.2 else "vehicle.parked"
    if class_name in _CYCLES:
        return "cycle.with_rider" if speed > 0.2 else "cycle.without_rider"
    if class_name == "pedestrian":
        return "pedestrian.moving" if speed > 0.2 else "pedestrian.standing"
    return ""
