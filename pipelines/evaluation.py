"""nuScenes detection submissions from LiDAR-frame predictions, scored by the devkit's `DetectionEval`."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.boxes import boxes_to_global
from pipelines.classes import DETECTION_CLASSES, default_attribute
from pipelines.errors import DatasetError
from pipelines.matches import UNDEFINED_TP
from pipelines.nuscenes import SampleIndex, split_scene_names

if TYPE_CHECKING:
    from nuscenes.eval.detection.data_classes import DetectionMetricDataList, DetectionMetrics
    from nuscenes.nuscenes import NuScenes

MAX_BOXES_PER_SAMPLE = 500   # the devkit's limit
EVAL_CONFIG = "detection_cvpr_2019"
TP_ERRORS: tuple[str, ...] = ("trans_err", "scale_err", "orient_err", "vel_err", "attr_err")


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


def require_annotations(nusc: NuScenes, split: str, *, advice: str = "") -> None:
    """Refuse to score `split` when none of its samples has an annotation (nuScenes' test split): the devkit would
    score an empty ground truth."""
    scenes = set(split_scene_names(nusc, split))
    samples = [s for s in nusc.sample if nusc.get("scene", s["scene_token"])["name"] in scenes]
    if samples and not any(s["anns"] for s in samples):
        raise DatasetError(f"split {split} of {nusc.dataroot} ({nusc.version}) has no annotations ({len(samples)} "
                           f"samples, 0 annotations), so it cannot be scored"
                           + (f"; {advice}" if advice else "; score a split with annotations"))


def evaluate(nusc: NuScenes, submission: Mapping[str, Any] | str | Path, split: str, out_dir: str | Path,
             *, report: bool = False) -> dict[str, Any]:
    """Score a submission on `split` with the devkit's `DetectionEval` (nuScenes CVPR 2019 config).

    Writes `out_dir/submission.json` (when given a dict), the devkit's `metrics_summary.json` and
    `metrics_details.json`, and `out_dir/metrics.json`, and returns the metrics: NDS, mAP, per-class AP, the TP
    errors mATE, mASE, mAOE, mAVE, mAAE, and `per_class` (AP, AP per distance threshold and TP errors; None where
    the devkit leaves a TP error undefined). With `report`, also writes `out_dir/summary.md` and PR curves as PNGs
    under `out_dir/plots/`, and returns the summary's path under "report".
    """
    from nuscenes.eval.common.config import config_factory
    from nuscenes.eval.detection.evaluate import DetectionEval

    from pipelines.matches import MATCHES_FILE, empty_matches, match_frames

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    require_annotations(nusc, split)   # also a clear error for an unknown split, before the devkit asserts
    if isinstance(submission, Mapping):
        result_path = out / "submission.json"
        result_path.write_text(json.dumps(submission))
        results = submission["results"]
    else:
        result_path = Path(submission)
        results = json.loads(result_path.read_text())["results"]
    cfg = config_factory(EVAL_CONFIG)
    if not any(results.values()):
        # The devkit cannot score a submission without a single box; its result would be this one.
        metrics = _empty_metrics(split, len(results), cfg.dist_ths)
        metrics["source"] = source_revision()
        empty_matches(list(results), cfg).save(out / MATCHES_FILE)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        if report:
            metrics["report"] = str(_write_summary(out, metrics, plots=None))
        return metrics
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = DetectionEval(nusc, config=cfg, result_path=str(result_path), eval_set=split,
                                  output_dir=str(out), verbose=False)
        scored, curves = evaluator.evaluate()
    # What `DetectionEval.main` writes, without its rendering and printing.
    summary = scored.serialize()
    summary["meta"] = evaluator.meta.copy()
    (out / "metrics_summary.json").write_text(json.dumps(summary, indent=2))
    (out / "metrics_details.json").write_text(json.dumps(curves.serialize(), indent=2))
    tp = summary["tp_errors"]
    metrics = {
        "split": split,
        "NDS": float(summary["nd_score"]),
        "mAP": float(summary["mean_ap"]),
        "mATE": float(tp["trans_err"]), "mASE": float(tp["scale_err"]), "mAOE": float(tp["orient_err"]),
        "mAVE": float(tp["vel_err"]), "mAAE": float(tp["attr_err"]),
        "per_class_AP": {k: float(v) for k, v in summary["mean_dist_aps"].items()},
        "samples": len(evaluator.sample_tokens),
        "per_class": _per_class(summary),
        "source": source_revision(),
    }
    match_frames(evaluator.gt_boxes, evaluator.pred_boxes, cfg).save(out / MATCHES_FILE)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if report:
        plots = _write_plots(out / "plots", scored, curves)
        metrics["report"] = str(_write_summary(out, metrics, plots=plots))
    return metrics


def source_revision() -> dict[str, str | bool | None]:
    """The commit of the stxd source tree that is running: {"commit": `git rev-parse HEAD`, "dirty": whether
    tracked files differ from it}; both None when the code does not run from a git checkout of stxd (an installed
    copy, or no git). Untracked files do not count: a run's own outputs (a results file written into the
    checkout) would otherwise mark it dirty."""
    tree = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    head = git("rev-parse", "--show-toplevel", "HEAD")
    lines = head.splitlines() if head else []
    # A copy installed under a checkout (e.g. a virtual environment inside it) is not that checkout's code.
    if len(lines) != 2 or Path(lines[0]).resolve() != tree:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": lines[1], "dirty": None if status is None else bool(status.strip())}


def _finite(value: float) -> float | None:
    value = float(value)
    return None if np.isnan(value) else value


def _per_class(summary: Mapping[str, Any]) -> dict[str, dict[str, float | None]]:
    """Per class from a serialized `DetectionMetrics`: mean AP, AP at each distance threshold, TP errors."""
    rows: dict[str, dict[str, float | None]] = {}
    for name, ap in summary["mean_dist_aps"].items():
        row: dict[str, float | None] = {"AP": float(ap)}
        row.update({f"AP@{float(th)}": float(v) for th, v in summary["label_aps"][name].items()})
        row.update({err: _finite(summary["label_tp_errors"][name][err]) for err in TP_ERRORS})
        rows[name] = row
    return rows


def _empty_metrics(split: str, samples: int, dist_ths: Sequence[float]) -> dict[str, Any]:
    """What DetectionEval gives a split without predictions: AP 0, every TP error at its cap of 1, NDS 0."""
    errors = {"mATE": 1.0, "mASE": 1.0, "mAOE": 1.0, "mAVE": 1.0, "mAAE": 1.0}
    per_class = {name: {"AP": 0.0, **{f"AP@{float(th)}": 0.0 for th in dist_ths},
                        **{err: None if err in UNDEFINED_TP.get(name, ()) else 1.0 for err in TP_ERRORS}}
                 for name in DETECTION_CLASSES}
    return {"split": split, "NDS": 0.0, "mAP": 0.0, **errors,
            "per_class_AP": {name: 0.0 for name in DETECTION_CLASSES}, "samples": samples,
            "note": "no predicted boxes", "per_class": per_class}


def _write_plots(plot_dir: Path, scored: DetectionMetrics, curves: DetectionMetricDataList) -> dict[str, Path]:
    """The devkit's summary, per-class and per-threshold PR plots as PNGs; keys name the plot."""
    import matplotlib

    matplotlib.use("Agg")   # reports are written by headless runs; a no-op when Agg is already in use
    import matplotlib.pyplot as plt
    from nuscenes.eval.detection.render import class_pr_curve, dist_pr_curve, summary_plot

    cfg = scored.cfg
    plot_dir.mkdir(parents=True, exist_ok=True)
    plots = {"summary": plot_dir / "summary.png"}
    plots.update({name: plot_dir / f"{name}_pr.png" for name in cfg.class_names})
    plots.update({f"{float(th)} m": plot_dir / f"dist_{float(th)}_pr.png" for th in cfg.dist_ths})
    before = set(plt.get_fignums())
    try:
        summary_plot(curves, scored, min_precision=cfg.min_precision, min_recall=cfg.min_recall,
                     dist_th_tp=cfg.dist_th_tp, savepath=str(plots["summary"]))
        for name in cfg.class_names:
            plt.figure()   # class_pr_curve draws on the current figure; never on a caller's
            class_pr_curve(curves, scored, name, cfg.min_precision, cfg.min_recall, savepath=str(plots[name]))
        for th in cfg.dist_ths:
            dist_pr_curve(curves, scored, th, cfg.min_precision, cfg.min_recall,
                          savepath=str(plots[f"{float(th)} m"]))
    finally:
        for num in set(plt.get_fignums()) - before:
            plt.close(num)
    return plots


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _write_summary(out: Path, metrics: Mapping[str, Any], *, plots: Mapping[str, Path] | None) -> Path:
    """`out/summary.md`: headline metrics, the per-class table and links to the plots."""
    headline = ("NDS", "mAP", "mATE", "mASE", "mAOE", "mAVE", "mAAE")
    lines = [f"# Detection results: split {metrics['split']}, {metrics['samples']} samples", ""]
    if "note" in metrics:
        lines += ["No boxes were predicted, so every AP and the NDS are 0 and no plots were drawn.", ""]
    lines += ["| " + " | ".join(headline) + " |", "|" + "---:|" * len(headline),
              "| " + " | ".join(_fmt(metrics[k]) for k in headline) + " |", ""]
    per_class: Mapping[str, Mapping[str, float | None]] = metrics["per_class"]
    columns = list(next(iter(per_class.values())))
    lines += ["## Per class", "", "| class | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    lines += [f"| {name} | " + " | ".join(_fmt(row[c]) for c in columns) + " |" for name, row in per_class.items()]
    if plots:
        def link(key: str) -> str:
            return f"[{key}]({plots[key].relative_to(out).as_posix()})"

        classes = [k for k in per_class if k in plots]
        thresholds = [k for k in plots if k != "summary" and k not in per_class]
        lines += ["", "## Plots", "", f"![summary]({plots['summary'].relative_to(out).as_posix()})", "",
                  "- PR per class: " + ", ".join(link(k) for k in classes),
                  "- PR per distance threshold: " + ", ".join(link(k) for k in thresholds)]
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path
