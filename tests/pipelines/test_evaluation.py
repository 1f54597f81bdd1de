"""GT boxes through the LiDAR frame and back score perfectly with the real DetectionEval; shifted ones do not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipelines.evaluation import Detections, build_submission, evaluate


def _gt_predictions(index, shift: float = 0.0) -> dict[str, Detections]:
    out = {}
    for sample in index:
        gt = sample.gt
        keep = gt.num_lidar_pts > 0   # the devkit drops GT without points; a prediction there is a FP
        boxes = gt.boxes[keep].copy()
        boxes[:, 0] += shift
        out[sample.token] = Detections(boxes=boxes, scores=np.ones(int(keep.sum())), labels=gt.labels[keep],
                                       attributes=[a for a, k in zip(gt.attributes, keep, strict=True) if k])
    return out


def test_gt_as_prediction_scores_perfectly(nusc, val_index, tmp_path: Path) -> None:
    submission = build_submission(val_index, _gt_predictions(val_index), use_lidar=True)
    metrics = evaluate(nusc, submission, "synth_val", tmp_path)
    assert metrics["mAP"] >= 0.99
    assert metrics["NDS"] >= 0.95
    assert metrics["mATE"] < 0.01 and metrics["mAOE"] < 0.01 and metrics["mAAE"] < 0.01
    assert metrics["samples"] == len(val_index)
    assert (tmp_path / "metrics.json").is_file()


def test_shifted_boxes_score_badly(nusc, val_index, tmp_path: Path) -> None:
    metrics = evaluate(nusc, build_submission(val_index, _gt_predictions(val_index, shift=3.0)), "synth_val",
                       tmp_path)
    assert metrics["mAP"] < 0.3


def test_missing_sample_is_named(val_index) -> None:
    from pipelines.errors import DatasetError

    preds = _gt_predictions(val_index)
    dropped = val_index[0].token
    del preds[dropped]
    with pytest.raises(DatasetError, match=dropped):
        build_submission(val_index, preds)


def test_a_submission_without_boxes_scores_zero(nusc, val_index, tmp_path: Path) -> None:
    empty = {s.token: Detections(boxes=np.zeros((0, 9)), scores=np.zeros(0), labels=np.zeros(0, int))
             for s in val_index}
    metrics = evaluate(nusc, build_submission(val_index, empty), "synth_val", tmp_path)
    assert metrics["mAP"] == 0.0 and metrics["NDS"] == 0.0 and metrics["note"] == "no predicted boxes"
