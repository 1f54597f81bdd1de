"""GT boxes through the LiDAR frame and back score perfectly with the real DetectionEval; shifted ones do not."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipelines.classes import DETECTION_CLASSES
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


def test_report_tables_and_plots(nusc, val_index, tmp_path: Path) -> None:
    preds = _gt_predictions(val_index)
    for det in preds.values():   # every other box 0.7 m off: a miss at 0.5 m, a match from 1 m on
        det.boxes[::2, 0] += 0.7
    metrics = evaluate(nusc, build_submission(val_index, preds), "synth_val", tmp_path, report=True)

    per_class = metrics["per_class"]
    assert {name: row["AP"] for name, row in per_class.items()} == metrics["per_class_AP"]
    for row in per_class.values():
        assert row["AP@4.0"] >= row["AP@0.5"]
    assert per_class["traffic_cone"]["orient_err"] is None and per_class["car"]["trans_err"] is not None
    scored = [row for row in per_class.values() if row["AP"] > 0]
    assert scored and any(row["AP@0.5"] < row["AP@1.0"] for row in scored)
    assert 0.0 < metrics["NDS"] < 1.0
    assert json.loads((tmp_path / "metrics.json").read_text())["per_class"] == per_class
    assert (tmp_path / "metrics_summary.json").is_file() and (tmp_path / "metrics_details.json").is_file()

    summary = Path(metrics["report"])
    assert summary == tmp_path / "summary.md"
    text = summary.read_text()
    assert f"| {metrics['NDS']:.4f} |" in text and "n/a" in text
    assert all(name in text for name in DETECTION_CLASSES)
    pngs = ["summary.png", *(f"{name}_pr.png" for name in DETECTION_CLASSES),
            *(f"dist_{th}_pr.png" for th in (0.5, 1.0, 2.0, 4.0))]
    for name in pngs:
        png = tmp_path / "plots" / name
        assert f"(plots/{name})" in text
        assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5_000, name
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(pngs)


def test_report_without_boxes(nusc, val_index, tmp_path: Path) -> None:
    empty = {s.token: Detections(boxes=np.zeros((0, 9)), scores=np.zeros(0), labels=np.zeros(0, int))
             for s in val_index}
    metrics = evaluate(nusc, build_submission(val_index, empty), "synth_val", tmp_path, report=True)
    text = Path(metrics["report"]).read_text()
    assert "No boxes were predicted" in text and f"{len(val_index)} samples" in text
    assert "| 0.0000 |" in text and ".png" not in text and not (tmp_path / "plots").exists()
    assert metrics["per_class"]["car"] == {"AP": 0.0, "AP@0.5": 0.0, "AP@1.0": 0.0, "AP@2.0": 0.0, "AP@4.0": 0.0,
                                           "trans_err": 1.0, "scale_err": 1.0, "orient_err": 1.0, "vel_err": 1.0,
                                           "attr_err": 1.0}
    assert metrics["per_class"]["barrier"]["vel_err"] is None
