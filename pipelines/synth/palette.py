"""Class colours of the synthetic renderer: one saturated hue per detection class, 36° apart, so that
a camera network can tell classes apart by colour as well as by shape."""

from __future__ import annotations

import colorsys

import numpy as np

from pipelines.classes import DETECTION_CLASSES

#: Hue in degrees per detection class.
CLASS_HUES: dict[str, float] = {
    "pedestrian": 0.0, "truck": 36.0, "bus": 72.0, "construction_vehicle": 108.0, "traffic_cone": 144.0,
    "bicycle": 180.0, "car": 216.0, "barrier": 252.0, "trailer": 288.0, "motorcycle": 324.0,
}
SATURATION = 0.78
VALUE = 0.86


def base_color(class_name: str, jitter: tuple[float, float, float] = (0.0, 1.0, 1.0)) -> np.ndarray:
    """(3,) float RGB in 0..255 for a class, with per-instance hue, saturation and value jitter."""
    hue = ((CLASS_HUES[class_name] + jitter[0]) % 360.0) / 360.0
    rgb = colorsys.hsv_to_rgb(hue, min(1.0, SATURATION * jitter[1]), min(1.0, VALUE * jitter[2]))
    return np.array(rgb) * 255.0


def class_of_hue(hue_deg: float) -> str:
    """The detection class whose hue is nearest to `hue_deg`."""
    dist = [abs((hue_deg - CLASS_HUES[c] + 180.0) % 360.0 - 180.0) for c in DETECTION_CLASSES]
    return DETECTION_CLASSES[int(np.argmin(dist))]
