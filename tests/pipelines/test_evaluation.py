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


def _noisy_predictions(index, seed: int = 0) -> dict[str, Detections]:
    """GT moved, resized, turned and given velocity errors, some dropped, some relabelled, plus false positives;
    every score distinct (no ties, so any two evaluations sort the same)."""
    rng = np.random.default_rng(seed)
    out = {}
    for sample in index:
        gt = sample.gt
        keep = (gt.num_lidar_pts > 0) & (rng.random(len(gt.labels)) < 0.85)
        boxes = gt.boxes[keep].copy()
        n = len(boxes)
        boxes[:, :2] += rng.normal(0.0, 0.8, (n, 2))
        boxes[:, 3:6] *= rng.uniform(0.8, 1.25, (n, 3))
        boxes[:, 6] += rng.normal(0.0, 0.4, n)
        boxes[:, 7:9] += rng.normal(0.0, 0.5, (n, 2))
        labels = gt.labels[keep].copy()
        flip = rng.random(n) < 0.1
        labels[flip] = rng.integers(0, len(DETECTION_CLASSES), int(flip.sum()))
        fp = np.concatenate([rng.uniform(-30, 30, (4, 2)), rng.uniform(-1, 0, (4, 1)), rng.uniform(0.5, 4, (4, 3)),
                             rng.uniform(-3, 3, (4, 1)), rng.normal(0, 1, (4, 2))], axis=1)
        out[sample.token] = Detections(boxes=np.concatenate([boxes, fp]), scores=rng.uniform(0.01, 1.0, n + 4),
                                       labels=np.concatenate([labels, rng.integers(0, len(DETECTION_CLASSES), 4)]))
    return out


def test_rescoring_the_stored_matches_reproduces_the_devkit(nusc, val_index, tmp_path: Path) -> None:
    """`matches.npz` re-scored with every frame once gives DetectionEval's NDS, mAP and TP errors."""
    from pipelines.matches import FrameMatches, FrameScorer

    metrics = evaluate(nusc, build_submission(val_index, _noisy_predictions(val_index)), "synth_val", tmp_path)
    assert 0.05 < metrics["mAP"] < 0.95 and 0.05 < metrics["NDS"] < 0.95   # neither trivial nor perfect
    scorer = FrameScorer(FrameMatches.load(tmp_path / "matches.npz"))
    assert sorted(scorer.tokens) == sorted(s.token for s in val_index)
    rescored = scorer.score()
    for key in ("NDS", "mAP", "mATE", "mASE", "mAOE", "mAVE", "mAAE"):
        assert abs(rescored[key] - metrics[key]) < 1e-6, key
    assert scorer.score(np.ones(len(scorer.tokens), int)) == rescored
    assert scorer.matches.tp.any() and not scorer.matches.tp.all()


def test_rescoring_a_resample_equals_the_devkit_on_duplicated_frames(nusc, val_index, tmp_path: Path) -> None:
    """Frame f counted c_f times scores as DetectionEval scores a split in which frame f is present c_f times."""
    from nuscenes.eval.common.config import config_factory
    from nuscenes.eval.common.data_classes import EvalBoxes
    from nuscenes.eval.detection.evaluate import DetectionEval

    from pipelines.evaluation import EVAL_CONFIG
    from pipelines.matches import FrameScorer, match_frames

    submission = build_submission(val_index, _noisy_predictions(val_index, seed=1))
    path = tmp_path / "submission.json"
    path.write_text(json.dumps(submission))
    evaluator = DetectionEval(nusc, config=config_factory(EVAL_CONFIG), result_path=str(path),
                              eval_set="synth_val", output_dir=str(tmp_path), verbose=False)
    scorer = FrameScorer(match_frames(evaluator.gt_boxes, evaluator.pred_boxes, evaluator.cfg))
    gt, pred = evaluator.gt_boxes, evaluator.pred_boxes
    for counts in ([2, 0, 1, 3], [0, 0, 4, 1], [1, 1, 1, 1]):
        counts = np.array(counts[:len(scorer.tokens)])
        dup_gt, dup_pred = EvalBoxes(), EvalBoxes()
        for token, count in zip(scorer.tokens, counts, strict=True):
            for copy in range(count):
                name = f"{token}#{copy}"
                dup_gt.add_boxes(name, [_renamed(b, name) for b in gt[str(token)]])
                dup_pred.add_boxes(name, [_renamed(b, name) for b in pred[str(token)]])
        evaluator.gt_boxes, evaluator.pred_boxes = dup_gt, dup_pred
        devkit, _ = evaluator.evaluate()
        rescored = scorer.score(counts)
        assert abs(rescored["NDS"] - devkit.nd_score) < 1e-9, counts
        assert abs(rescored["mAP"] - devkit.mean_ap) < 1e-9, counts
        assert abs(rescored["mATE"] - devkit.tp_errors["trans_err"]) < 1e-9, counts


def _renamed(box, token: str):
    import copy

    out = copy.copy(box)
    out.sample_token = token
    return out


def test_scores_record_the_source_commit(nusc, val_index, tmp_path: Path) -> None:
    import subprocess

    metrics = evaluate(nusc, build_submission(val_index, _gt_predictions(val_index)), "synth_val", tmp_path)
    repo = Path(__file__).resolve().parents[2]
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    expected = head.stdout.strip() if head.returncode == 0 else None
    assert metrics["source"]["commit"] == expected
    assert json.loads((tmp_path / "metrics.json").read_text())["source"] == metrics["source"]
    if expected is not None:
        assert len(expected) == 40 and isinstance(metrics["source"]["dirty"], bool)
