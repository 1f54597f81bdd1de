"""`stxd-train show`: what a student (or teacher) run predicts on one sample, drawn on its six cameras and in BEV."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipelines.config import read_yaml
from pipelines.errors import ConfigError

#: Panel positions of the cameras: the front three on top, the back three below, as the car sees them.
CAMERA_LAYOUT = ("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT")
PRED_COLOUR = "red"


def run_sample(run: Path, token: str, dataroot: str | None) -> tuple[dict[str, Any], Any, str, Any]:
    """(the run's config.yaml, the devkit, the run's split that holds `token`, that sample's `SampleInfo`)."""
    from pipelines.nuscenes import SampleIndex, load_nuscenes

    saved = read_yaml(run / "config.yaml")
    nusc = load_nuscenes(dataroot or saved["dataroot"], saved["version"])
    data = saved["data"]
    splits = list(dict.fromkeys([data["val_split"], *data.get("train_splits", [])]))
    for split in splits:
        index = SampleIndex.from_nuscenes(nusc, [split], k_prev=0, max_sweeps=0)
        if any(s.token == token for s in index):
            return saved, nusc, split, index.get(token)
    raise ConfigError(f"sample {token} is in none of the run's splits ({', '.join(splits)}) of {nusc.dataroot}; "
                      f"pass a sample token of one of them (e.g. {index[0].token})")


def show_run(run: str | Path, token: str, out: str | Path, *, dataroot: str | None = None, min_score: float = 0.3,
             device: str = "auto") -> dict[str, int]:
    """Write a PNG of the run's boxes scoring at least `min_score` (red) and the GT (white) on the six cameras and
    in a BEV panel; returns the counts drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipelines.cameras import load_image
    from pipelines.render import GT_COLOUR, bev_panel, camera_panel, ego_forward, save_figure

    run = Path(run)
    saved, nusc, split, sample = run_sample(run, token, dataroot)
    if saved.get("kind") == "teacher":
        from stxd_train.teacher import teacher_predictions as predictions
    else:
        from stxd_train.fit import student_predictions as predictions
    det = predictions(run, saved, nusc, split, device, only=[token])[1][token]
    keep = det.scores >= min_score
    pred, gt = det.boxes[keep], sample.gt.boxes
    fig = plt.figure(figsize=(22, 8.5))
    grid = fig.add_gridspec(2, 5, width_ratios=[1, 1, 1, 0.05, 1.6])
    cameras = {cam.channel: cam for cam in sample.cameras}
    in_cameras = 0
    for k, channel in enumerate(CAMERA_LAYOUT):
        if channel not in cameras:
            continue
        cam = cameras[channel]
        ax = fig.add_subplot(grid[k // 3, k % 3])
        in_cameras += camera_panel(ax, np.asarray(load_image(cam.path)), cam.lidar2img,
                                   [(gt, GT_COLOUR), (pred, PRED_COLOUR)], title=channel)
    ax = fig.add_subplot(grid[:, 4])
    kind = saved.get("kind", "run")
    note = "" if len(pred) else (f"no {kind} box scores >= {min_score:g}"
                                 + (f" (best {det.scores.max():.2f})" if len(det.scores) else ""))
    model = saved.get("model", {})
    if kind == "teacher":   # the teacher sees its point range
        lo_x, lo_y, _, hi_x, hi_y, _ = (float(v) for v in model["voxel"]["point_range"])
        extent = (lo_x, hi_x, lo_y, hi_y)
    else:                   # the student its BEV grid
        half = float(model["grid_half_extent"])
        extent = (-half, half, -half, half)
    bev_panel(ax, extent=extent, note=note, forward=ego_forward(sample.lidar2ego),
              boxes=[(gt, GT_COLOUR, f"GT: {len(gt)}"),
                     (pred, PRED_COLOUR, f"{kind} (score >= {min_score:g}): {len(pred)}")],
              title="BEV, LiDAR frame of the keyframe")
    fig.suptitle(f"{run.name} ({kind}): sample {token}, scene {sample.scene_name}, frame {sample.frame_index}",
                 fontsize=11)
    fig.subplots_adjust(left=0.02, right=0.98, top=0.92, bottom=0.06, wspace=0.04, hspace=0.08)
    save_figure(fig, out)
    return {"predicted": len(pred), "gt": len(gt), "boxes_in_cameras": in_cameras}
