"""The nuScenes sensor rig: LIDAR_TOP and six cameras, with approximate mounting positions, yaws and
the 1600×900 intrinsics of the real vehicle, scaled to the rendered image size."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.geometry import quaternion_from_yaw

CAMERAS: tuple[str, ...] = ("CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT",
                            "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT")

# (translation in the ego frame [m], yaw [deg], focal length at 1600×900 [px])
_CAMERA_MOUNTS: dict[str, tuple[tuple[float, float, float], float, float]] = {
    "CAM_FRONT": ((1.70, 0.02, 1.51), 0.0, 1266.0),
    "CAM_FRONT_RIGHT": ((1.55, -0.49, 1.50), -55.0, 1260.0),
    "CAM_FRONT_LEFT": ((1.52, 0.49, 1.51), 55.0, 1272.0),
    "CAM_BACK": ((0.03, 0.01, 1.57), 180.0, 809.0),
    "CAM_BACK_LEFT": ((1.04, 0.48, 1.56), 110.0, 1256.0),
    "CAM_BACK_RIGHT": ((1.04, -0.48, 1.56), -110.0, 1259.0),
}

LIDAR_TRANSLATION = (0.94, 0.0, 1.84)
#: nuScenes' LIDAR_TOP is turned by -90° about z: its x axis points right, its y axis forward.
LIDAR_YAW = -np.pi / 2


@dataclass(frozen=True)
class Camera:
    """One camera: pose in the ego frame and pinhole intrinsics at the output image size."""

    channel: str
    translation: tuple[float, float, float]
    yaw: float                      # rad, the optical axis' heading in the ego frame
    intrinsic: np.ndarray           # (3, 3)
    size: tuple[int, int]           # width, height

    @property
    def rotation(self) -> list[float]:
        """nuScenes quaternion of the camera frame (x right, y down, z forward) in the ego frame."""
        return _rotation_quaternion(self.ego_from_camera_rotation)

    @property
    def ego_from_camera_rotation(self) -> np.ndarray:
        c, s = np.cos(self.yaw), np.sin(self.yaw)
        # columns: the camera's x (right), y (down), z (forward) axes in the ego frame
        return np.array([[s, 0.0, c], [-c, 0.0, s], [0.0, -1.0, 0.0]])


def _rotation_quaternion(rot: np.ndarray) -> list[float]:
    from pyquaternion import Quaternion

    q = Quaternion(matrix=rot, atol=1e-9)
    return [float(q.w), float(q.x), float(q.y), float(q.z)]


def cameras(image_size: tuple[int, int]) -> list[Camera]:
    """The six cameras with intrinsics scaled from 1600×900 to `image_size` (width, height)."""
    width, height = image_size
    sx, sy = width / 1600.0, height / 900.0
    out = []
    for channel in CAMERAS:
        translation, yaw_deg, focal = _CAMERA_MOUNTS[channel]
        intrinsic = np.array([[focal * sx, 0.0, 800.0 * sx],
                              [0.0, focal * sy, 450.0 * sy],
                              [0.0, 0.0, 1.0]])
        out.append(Camera(channel=channel, translation=translation, yaw=float(np.deg2rad(yaw_deg)),
                          intrinsic=intrinsic, size=(width, height)))
    return out


def lidar_rotation() -> list[float]:
    """nuScenes quaternion of LIDAR_TOP in the ego frame."""
    return quaternion_from_yaw(LIDAR_YAW)
