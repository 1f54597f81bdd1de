"""nuScenes detection submissions from LiDAR-frame predictions, scored by the devkit's `DetectionEval`."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.boxes import boxes_to_global
from pipelines.classes import DETECTION_CLASSES, default_attribute
from pipelines.errors import DatasetError
from pipelines.nuscenes import SampleIndex, split_scene_names

if TYPE_CHECKING:
    from nuscenes.nuscenes import NuScenes

MAX_BOXES_PER_SAMPLE = 500   # the devkit's limit


@dataclass(frozen=True)
class Detections:
    """Predictions for one sample in its keyframe LiDAR frame."""

    boxes: np.ndarray                          # (N, 9) [x, y, z, w, l, h, yaw, vx, vy]
    scores: np.ndarray                         # (N,)
    labels: np.ndarray                         # (N,) indices into DETECTION_CLASSES
    attributes: Sequence[str] | None = None    # None: the class's default for the box's speed


def build_submission(index: SampleIndex, predictions: Mapping[str, Detections], *, use_camera: bool = False,
                     use_lidar: bool = False) -> dict[str, Any]:
    """The nuScenes result JSON (as a dict) for every sample of `index`.

    Every indexed sample needs an entry in `predictions` (possibly with no boxes): the devkit scores a
    split only when each of its samples has one. At most 500 boxes per sample are kept, by score.
    """
    missing = [s.token for s in index if s.token not in predictions]
    if missing:
        raise DatasetError(f"predictions lack {len(missing)} of the {len(index)} samples of "
                           f"{', '.join(index.splits)}, e.g. {missing[0]}; predict every sample of the split")
    results: dict[str, list[dict[str, Any]]] = {}
    for sample in index:
        det = predictions[sample.token]
        order = np.argsort(-np.asarray(det.scores), kind="stable")[:MAX_BOXES_PER_SAMPLE]
        boxes = np.asarray(det.boxes, dtype=np.float64)[order].reshape(-1, 9).copy()
        boxes[:, 7:9] = np.nan_to_num(boxes[:, 7:9])
        labels = np.asarray(det.labels)[order]
        scores = np.asarray(det.scores, dtype=np.float64)[order]
        global_boxes = boxes_to_global(boxes, sample.lidar2ego, sample.ego2global)
        entries = []
        for j, box in enumerate(global_boxes):
            name = DETECTION_CLASSES[int(labels[j])]
            if det.attributes is not None:
                attribute = det.attributes[int(order[j])]
            else:
                attribute = default_attribute(name, float(np.hypot(boxes[j, 7], boxes[j, 8])))
            entries.append({
                "sample_token": sample.token,
                "translation": [float(v) for v in box.center],
                "size": [float(v) for v in box.wlh],
                "rotation": [float(v) for v in box.orientation.elements],
                "velocity": [float(box.velocity[0]), float(box.velocity[1])],
                "detection_name": name,
                "detection_score": float(scores[j]),
                "attribute_name": attribute,
            })
        results[sample.token] = entries
    meta = {"use_camera": use_camera, "use_lidar": use_lidar, "use_radar": False, "use_map": False,
            "use_external": False}
    return {"meta": meta, "results": results}


def evaluate(nusc: NuScenes, submission: Mapping[str, Any] | str | Path, split: str, out_dir: str | Path,
             *, render_curves: bool = False) -> dict[str, Any]:
    """Score a submission on `split` with the devkit's `DetectionEval` (nuScenes CVPR 2019 config).

    Writes `out_dir/submission.json` (when given a dict), the devkit's own summaries and
    `out_dir/metrics.json`, and returns the metrics: NDS, mAP, per-class AP, and the TP errors
    mATE, mASE, mAOE, mAVE, mAAE.
    """
    from nuscenes.eval.common.config import config_factory
    from nuscenes.eval.detection.evaluate import DetectionEval

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    split_scene_names(nusc, split)   # a clear error for an unknown split, before the devkit asserts
    if isinstance(submission, Mapping):
        result_path = out / "submission.json"
        result_path.write_text(json.dumps(submission))
    else:
        result_path = Path(submission)
        submission = json.loads(result_path.read_text())
    if not any(submission["results"].values()):
        # The devkit cannot score a submission without a single box; its result would be this one.
        metrics = _empty_metrics(split, len(submission["results"]))
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        return metrics
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = DetectionEval(nusc, config=config_factory("detection_cvpr_2019"), result_path=str(result_path),
                                  eval_set=split, output_dir=str(out), verbose=False)
        summary = evaluator.main(plot_examples=0, render_curves=render_curves)
    tp = summary["tp_errors"]
    metrics = {
        "split": split,
        "NDS": float(summary["nd_score"]),
        "mAP": float(summary["mean_ap"]),
        "mATE": float(tp["trans_err"]), "mASE": float(tp["scale_err"]), "mAOE": float(tp["orient_err"]),
        "mAVE": float(tp["vel_err"]), "mAAE": float(tp["attr_err"]),
        "per_class_AP": {k: float(v) for k, v in summary["mean_dist_aps"].items()},
        "samples": len(evaluator.sample_tokens),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _empty_metrics(split: str, samples: int) -> dict[str, Any]:
    """What DetectionEval gives a split without predictions: AP 0, every TP error at its cap of 1, NDS 0."""
    errors = {"mATE": 1.0, "mASE": 1.0, "mAOE": 1.0, "mAVE": 1.0, "mAAE": 1.0}
    return {"split": split, "NDS": 0.0, "mAP": 0.0, **errors,
            "per_class_AP": {name: 0.0 for name in DETECTION_CLASSES}, "samples": samples,
            "note": "no predicted boxes"}

