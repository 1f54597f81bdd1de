"""`stxd-cache audit`: how good the cached teacher boxes are, judged against the ground truth of their samples.

Per class of the teacher box (and over all classes), for the boxes scoring at least `min_score`:

- class agreement: of the boxes that overlap some GT box (BEV IoU > 0, any class), the share whose best-overlap GT
  has the teacher's class (and, in the JSON, the classes those GT boxes have);
- heading error against the same-class GT matched by centre distance (< `radius`, greedily by descending score,
  each GT matched once, as the devkit's matching does): median, 90th percentile, and the share flipped by more
  than 90°;
- velocity error: median L2 of (vx, vy) against the matched GT, where the devkit could estimate its velocity;
- score calibration: per score bin, the share of boxes matched (the precision of the bin), and the expected
  calibration error `ECE = Σ_b (n_b / N) |precision_b − mean score_b|`.

Headings are compared modulo 2π for every class. The nuScenes devkit scores orientation differently: barrier
modulo π (a barrier turned by 180° counts as right) and traffic_cone not at all. The numbers here are the raw ones,
so a flipped barrier counts as flipped and cones have a heading error too.

Teacher boxes and GT boxes are both in the keyframe LiDAR frame; the GT velocity (`GroundTruth.boxes[:, 7:9]`) is
the devkit's velocity over ground, rotated into the LiDAR axes, the same quantity the teacher was trained to
predict. Every GT box of the detection classes counts (no range or LiDAR-point filter, unlike the devkit's AP).

The per-box work (`audit_boxes`, `concatenate`) and the summary (`summarise`, `calibration`, `heading_error`)
are pure functions of numpy arrays; `audit_cache` walks a cache and its dataset.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.boxes import bev_iou
from pipelines.errors import ConfigError

#: Greatest BEV centre distance (m) of a teacher box and the same-class GT box it is matched with.
MATCH_RADIUS = 2.0
#: Heading errors above this (radians) count as flipped.
FLIP_THRESHOLD = math.pi / 2
HEADING_NOTE = ("headings compared modulo 2π for every class; the nuScenes devkit compares barrier modulo π and "
                "ignores traffic_cone orientation")


@dataclass(frozen=True, kw_only=True)
class BoxAudit:
    """What the ground truth says about N teacher boxes, and the labels of the G GT boxes they were compared with."""

    scores: np.ndarray
    """(N,) float64 teacher scores."""
    labels: np.ndarray
    """(N,) int64 teacher classes."""
    overlap_labels: np.ndarray
    """(N,) int64 class of the GT box of greatest BEV IoU with the teacher box (any class); -1 where none overlaps."""
    matched: np.ndarray
    """(N,) bool: a same-class GT centre lies closer than the match radius (one-to-one, by descending score)."""
    heading_error: np.ndarray
    """(N,) float64 |yaw − GT yaw| modulo 2π, in [0, π] radians; NaN where not matched."""
    velocity_error: np.ndarray
    """(N,) float64 ‖(vx, vy) − GT (vx, vy)‖ in m/s; NaN where not matched or the GT velocity is unknown."""
    gt_labels: np.ndarray
    """(G,) int64 classes of the GT boxes."""

    def __post_init__(self) -> None:
        n = len(self.scores)
        for name in ("labels", "overlap_labels", "matched", "heading_error", "velocity_error"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"BoxAudit.{name} has {len(getattr(self, name))} rows; expected {n} (one per box)")


def heading_error(yaw: np.ndarray, gt_yaw: np.ndarray) -> np.ndarray:
    """|yaw − gt_yaw| wrapped to [0, π] radians (headings modulo 2π), elementwise; float64."""
    diff = np.asarray(yaw, dtype=np.float64) - np.asarray(gt_yaw, dtype=np.float64)
    return np.abs(np.mod(diff + np.pi, 2 * np.pi) - np.pi)


def match_by_centre(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, gt_boxes: np.ndarray,
                    gt_labels: np.ndarray, *, radius: float = MATCH_RADIUS) -> np.ndarray:
    """(N,) int64: for each teacher box, the index of its matched GT box, or -1.

    boxes: (N, >=2) and gt_boxes: (G, >=2) [x, y, ...] in one frame; scores, labels: (N,); gt_labels: (G,).
    Boxes are taken by descending score; each takes the nearest free GT box of its class whose BEV centre is
    closer than `radius` (the devkit's greedy center-distance matching).
    """
    match = np.full(len(boxes), -1, dtype=np.int64)
    if len(boxes) == 0 or len(gt_boxes) == 0:
        return match
    dist = np.linalg.norm(np.asarray(boxes, np.float64)[:, None, :2] - np.asarray(gt_boxes, np.float64)[None, :, :2],
                          axis=-1)
    dist[np.asarray(labels)[:, None] != np.asarray(gt_labels)[None, :]] = np.inf
    free = np.ones(len(gt_boxes), dtype=bool)
    for i in np.argsort(-np.asarray(scores), kind="stable"):
        candidates = np.where(free, dist[i], np.inf)
        j = int(np.argmin(candidates))
        if candidates[j] < radius:
            match[i], free[j] = j, False
    return match


def audit_boxes(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, gt_boxes: np.ndarray,
                gt_labels: np.ndarray, gt_velocity_valid: np.ndarray | None = None, *,
                radius: float = MATCH_RADIUS) -> BoxAudit:
    """The audit of one sample's teacher boxes against its GT boxes.

    boxes: (N, 9) and gt_boxes: (G, 9) [x, y, z, w, l, h, yaw, vx, vy] in the keyframe LiDAR frame;
    scores, labels: (N,); gt_labels: (G,); gt_velocity_valid: (G,) bool, False where the GT velocity is unknown
    (None: all known). The caller picks which boxes to audit (e.g. those above a score).
    """
    boxes, gt_boxes = np.asarray(boxes, np.float64).reshape(-1, 9), np.asarray(gt_boxes, np.float64).reshape(-1, 9)
    labels, gt_labels = np.asarray(labels, np.int64), np.asarray(gt_labels, np.int64)
    valid = np.ones(len(gt_boxes), bool) if gt_velocity_valid is None else np.asarray(gt_velocity_valid, bool)
    overlap = np.full(len(boxes), -1, dtype=np.int64)
    if len(boxes) and len(gt_boxes):
        iou = bev_iou(boxes, gt_boxes)
        best = iou.argmax(axis=1)
        overlap = np.where(iou[np.arange(len(boxes)), best] > 0, gt_labels[best], -1)
    match = match_by_centre(boxes, scores, labels, gt_boxes, gt_labels, radius=radius)
    matched = match >= 0
    heading = np.full(len(boxes), np.nan)
    velocity = np.full(len(boxes), np.nan)
    j = match[matched]
    heading[matched] = heading_error(boxes[matched, 6], gt_boxes[j, 6])
    speed_error = np.linalg.norm(boxes[matched, 7:9] - gt_boxes[j, 7:9], axis=1)
    velocity[matched] = np.where(valid[j], speed_error, np.nan)
    return BoxAudit(scores=np.asarray(scores, np.float64), labels=labels, overlap_labels=overlap.astype(np.int64),
                    matched=matched, heading_error=heading, velocity_error=velocity, gt_labels=gt_labels)


def concatenate(audits: Sequence[BoxAudit]) -> BoxAudit:
    """The audits of several samples as one."""
    def cat(name: str, dtype: type) -> np.ndarray:
        return np.concatenate([np.asarray(getattr(a, name), dtype) for a in audits] or [np.zeros(0, dtype)])

    return BoxAudit(scores=cat("scores", np.float64), labels=cat("labels", np.int64),
                    overlap_labels=cat("overlap_labels", np.int64), matched=cat("matched", bool),
                    heading_error=cat("heading_error", np.float64),
                    velocity_error=cat("velocity_error", np.float64), gt_labels=cat("gt_labels", np.int64))


def _bins(bin_width: float) -> int:
    count = round(1.0 / bin_width) if bin_width > 0 else 0
    if count < 1 or abs(count * bin_width - 1.0) > 1e-9:
        raise ConfigError(f"score bin width {bin_width} does not divide [0, 1] into whole bins; choose e.g. 0.1, "
                          "0.05 or 0.2")
    return count


def calibration(scores: np.ndarray, correct: np.ndarray, *, bin_width: float = 0.1) -> dict[str, Any]:
    """Reliability of scores as match probabilities: precision per score bin and the expected calibration error.

    scores: (N,) in [0, 1]; correct: (N,) bool (here: matched to a same-class GT). Bins are [k·w, (k+1)·w), the
    last one closed. Returns `{"bins": [{"lo", "hi", "boxes", "mean_score", "precision"}, ...], "ece"}`, with
    None for the mean score and precision of an empty bin and for the ECE of no boxes.
    """
    count = _bins(bin_width)
    scores, correct = np.asarray(scores, np.float64), np.asarray(correct, bool)
    # Rounding first keeps a score such as 0.3 (0.3 / 0.1 = 2.9999999999999996) in the bin it names.
    index = np.clip(np.floor(np.round(scores / bin_width, 9)), 0, count - 1).astype(np.int64)
    bins, ece = [], 0.0
    for k in range(count):
        inside = index == k
        n = int(inside.sum())
        mean = precision = None
        if n:
            mean, precision = float(scores[inside].mean()), float(correct[inside].mean())
            ece += n / len(scores) * abs(precision - mean)
        bins.append({"lo": round(k * bin_width, 9), "hi": round((k + 1) * bin_width, 9), "boxes": n,
                     "mean_score": mean, "precision": precision})
    return {"bins": bins, "ece": ece if len(scores) else None}


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _group(audit: BoxAudit, keep: np.ndarray, gt_count: int, *, bin_width: float) -> dict[str, Any]:
    """Summary of the boxes `keep` (a (N,) mask) of `audit`, against `gt_count` GT boxes."""
    overlapping = keep & (audit.overlap_labels >= 0)
    same = overlapping & (audit.overlap_labels == audit.labels)
    matched = keep & audit.matched
    heading = audit.heading_error[matched]
    speed = audit.velocity_error[matched]
    speed = speed[np.isfinite(speed)]
    boxes = int(keep.sum())
    return {
        "boxes": boxes,
        "gt_boxes": gt_count,
        "overlapping": int(overlapping.sum()),
        "same_class_share": _share(int(same.sum()), int(overlapping.sum())),
        "matched": int(matched.sum()),
        "precision": _share(int(matched.sum()), boxes),
        "recall": _share(int(matched.sum()), gt_count),
        "heading": {
            "count": len(heading),
            "median": float(np.median(heading)) if len(heading) else None,
            "p90": float(np.percentile(heading, 90)) if len(heading) else None,
            "flipped_share": float(np.mean(heading > FLIP_THRESHOLD)) if len(heading) else None,
        },
        "velocity": {"count": len(speed), "median": float(np.median(speed)) if len(speed) else None},
        "calibration": calibration(audit.scores[keep], audit.matched[keep], bin_width=bin_width),
    }


def summarise(audit: BoxAudit, classes: Sequence[str], *, bin_width: float = 0.1) -> dict[str, Any]:
    """Per class (of the teacher box; GT counts per GT class) and overall: `{"classes": {name: ...}, "overall"}`.

    Each entry holds `boxes`, `gt_boxes`, `overlapping` (boxes overlapping a GT), `same_class_share`, `matched`,
    `precision` and `recall` at the match radius, `heading` (`count`, `median`, `p90` in radians,
    `flipped_share`), `velocity` (`count`, `median` in m/s) and `calibration` (see `calibration`); a class entry
    also has `confusion`: the classes of the best-overlap GT boxes of its overlapping boxes, with their counts.
    Shares and statistics of nothing are None.
    """
    _bins(bin_width)
    per_class = {}
    for k, name in enumerate(classes):
        keep = audit.labels == k
        entry = _group(audit, keep, int((audit.gt_labels == k).sum()), bin_width=bin_width)
        found = audit.overlap_labels[keep & (audit.overlap_labels >= 0)]
        entry["confusion"] = {classes[j]: int((found == j).sum()) for j in np.unique(found)}
        per_class[name] = entry
    overall = _group(audit, np.ones(len(audit.scores), bool), len(audit.gt_labels), bin_width=bin_width)
    return {"classes": per_class, "overall": overall}


def audit_cache(cache_path: str | Path, *, dataroot: str | Path, version: str | None = None,
                splits: Sequence[str] | None = None, min_score: float = 0.3, radius: float = MATCH_RADIUS,
                bin_width: float = 0.1, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """The teacher audit of a cache's samples of `splits` (default: all the cache's splits) against the GT of the
    dataset at `dataroot` (`version` defaults to the cache's). Boxes scoring at least `min_score` count.

    Returns the `summarise` dict plus what was audited: `cache`, `version`, `splits`, `samples`, `min_score`,
    `match_radius`, `bin_width` and `note` (how headings are compared). `progress(done, total)` is called per
    sample.
    """
    from pipelines.nuscenes import SampleIndex
    from stxd_cache.store import open_cache

    if not 0.0 <= min_score <= 1.0:
        raise ConfigError(f"min score {min_score} is not a score; expected a value in [0, 1], e.g. 0.3")
    _bins(bin_width)
    reader = open_cache(str(cache_path))
    reader.require_complete()
    version = version or reader.meta.dataset.version
    splits = tuple(splits or reader.meta.dataset.splits)
    index = SampleIndex.load(dataroot, version, splits, k_prev=0, max_sweeps=0)
    audits = []
    for done, sample in enumerate(index, start=1):
        record = reader.read(reader.index_of(sample.token))
        keep = np.flatnonzero(record.scores[:record.count] >= min_score)
        audits.append(audit_boxes(record.boxes[keep], record.scores[keep], record.labels[keep], sample.gt.boxes,
                                  sample.gt.labels, sample.gt.velocity_valid, radius=radius))
        if progress is not None:
            progress(done, len(index))
    summary = summarise(concatenate(audits), reader.meta.classes, bin_width=bin_width)
    return {"cache": str(cache_path), "version": version, "splits": list(splits), "samples": len(index),
            "min_score": min_score, "match_radius": radius, "bin_width": bin_width, "note": HEADING_NOTE, **summary}


def _cell(value: float | None, fmt: str, scale: float = 1.0) -> str:
    return "–" if value is None else format(value * scale, fmt)


def audit_markdown(report: dict[str, Any]) -> str:
    """The audit as markdown: one row per class and an overall row, then the overall score calibration."""
    degrees = 180.0 / math.pi
    lines = [f"Teacher audit of {report['cache']} ({', '.join(report['splits'])}, {report['samples']} samples, "
             f"score >= {report['min_score']}, match: same class, centre < {report['match_radius']} m; "
             f"{report['note']})", "",
             "| class | boxes | GT | same class | precision | recall | heading median (°) | heading p90 (°) "
             "| flipped > 90° | velocity median (m/s) | ECE |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rows = [*report["classes"].items(), ("all", report["overall"])]
    for name, e in rows:
        h = e["heading"]
        lines.append(f"| {name} | {e['boxes']} | {e['gt_boxes']} | {_cell(e['same_class_share'], '.3f')} | "
                     f"{_cell(e['precision'], '.3f')} | {_cell(e['recall'], '.3f')} | "
                     f"{_cell(h['median'], '.1f', degrees)} | {_cell(h['p90'], '.1f', degrees)} | "
                     f"{_cell(h['flipped_share'], '.3f')} | {_cell(e['velocity']['median'], '.2f')} | "
                     f"{_cell(e['calibration']['ece'], '.3f')} |")
    lines += ["", "| score bin | boxes | mean score | precision |", "|---|---:|---:|---:|"]
    for b in report["overall"]["calibration"]["bins"]:
        if b["boxes"]:
            lines.append(f"| [{b['lo']:.2f}, {b['hi']:.2f}) | {b['boxes']} | {b['mean_score']:.3f} | "
                         f"{b['precision']:.3f} |")
    return "\n".join(lines) + "\n"
