"""Per-frame match data of one scored submission, and NDS/mAP re-scored from it for any multiset of frames.

`DetectionEval` matches predictions to GT greedily in score order, but only within a frame, so whether a
prediction is a true positive, and its TP errors, depend on its own frame alone. `match_frames` records that
once per class and distance threshold; `FrameScorer.score(counts)` then recomputes the devkit's AP, TP errors, NDS
and mAP as if frame f had been evaluated `counts[f]` times (a bootstrap resample), in milliseconds instead of a
full `DetectionEval`. With every count 1 the result is the devkit's own, to floating-point equality.

`matches.npz` (written next to `metrics.json` by `pipelines.evaluation.evaluate`):

- `tokens` (F,) str: the sample tokens, in the devkit's order; `classes` (C,) str; `dist_ths` (T,) float64;
  `tp_metrics` (5,) str: the TP error names; `config`: the devkit's `DetectionConfig` as JSON.
- `gt_counts` (F, C) int64: GT boxes per frame and class after the devkit's range and point filters.
- `frame` (P,) int64, `label` (P,) int64, `score` (P,) float64: every kept prediction, in the devkit's order.
- `tp` (P, T) bool: matched at each distance threshold.
- `tp_errors` (P, 5) float64: the TP errors at `dist_th_tp` (NaN where unmatched, or where the devkit gives NaN).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.errors import StxdError

if TYPE_CHECKING:
    from nuscenes.eval.common.data_classes import EvalBoxes
    from nuscenes.eval.detection.data_classes import DetectionConfig

MATCHES_FILE = "matches.npz"
TP_METRICS: tuple[str, ...] = ("trans_err", "vel_err", "scale_err", "orient_err", "attr_err")   # the devkit's order
HEADLINE: dict[str, str] = {"trans_err": "mATE", "scale_err": "mASE", "orient_err": "mAOE", "vel_err": "mAVE",
                            "attr_err": "mAAE"}

#: TP errors DetectionEval leaves NaN: these classes have no meaningful orientation, velocity or attribute.
UNDEFINED_TP: dict[str, frozenset[str]] = {
    "traffic_cone": frozenset({"orient_err", "vel_err", "attr_err"}),
    "barrier": frozenset({"vel_err", "attr_err"}),
}


class MatchesError(StxdError):
    """A `matches.npz` that is missing, unreadable or belongs to other frames."""


@dataclass(frozen=True, eq=False)
class FrameMatches:
    """The contents of `matches.npz` (see the module docstring for each array's shape)."""

    tokens: np.ndarray
    classes: tuple[str, ...]
    dist_ths: np.ndarray
    config: dict[str, Any]
    gt_counts: np.ndarray
    frame: np.ndarray
    label: np.ndarray
    score: np.ndarray
    tp: np.ndarray
    tp_errors: np.ndarray

    def save(self, path: str | Path) -> Path:
        """Write `path` (replacing it whole: a reader never sees half a file)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            np.savez_compressed(f, tokens=self.tokens.astype(str), classes=np.array(self.classes, dtype=str),
                                dist_ths=self.dist_ths, tp_metrics=np.array(TP_METRICS, dtype=str),
                                config=np.array(json.dumps(self.config)), gt_counts=self.gt_counts,
                                frame=self.frame, label=self.label, score=self.score, tp=self.tp,
                                tp_errors=self.tp_errors)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> FrameMatches:
        path = Path(path)
        if not path.is_file():
            raise MatchesError(f"{path} is missing: it is written when a run is scored; score the run again "
                               "(`stxd-train eval --run RUN`) to write it")
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
            if tuple(str(n) for n in data["tp_metrics"]) != TP_METRICS:
                raise ValueError(f"TP metrics {list(data['tp_metrics'])}, expected {list(TP_METRICS)}")
            return cls(tokens=data["tokens"], classes=tuple(str(c) for c in data["classes"]),
                       dist_ths=data["dist_ths"], config=json.loads(str(data["config"])),
                       gt_counts=data["gt_counts"], frame=data["frame"], label=data["label"], score=data["score"],
                       tp=data["tp"], tp_errors=data["tp_errors"])
        except (OSError, KeyError, ValueError) as exc:
            raise MatchesError(f"{path} cannot be read as match data ({exc}); score the run again "
                               "(`stxd-train eval --run RUN`) to rewrite it") from None


def match_frames(gt_boxes: EvalBoxes, pred_boxes: EvalBoxes, cfg: DetectionConfig) -> FrameMatches:
    """The match data of `DetectionEval.accumulate` for every class and distance threshold.

    `gt_boxes`, `pred_boxes`: the evaluator's boxes after its filters (`DetectionEval.gt_boxes`, `.pred_boxes`).
    Uses the devkit's own distance and error functions, frame by frame, in the devkit's order.
    """
    from nuscenes.eval.common.utils import attr_acc, center_distance, scale_iou, velocity_l2, yaw_diff

    tokens = list(gt_boxes.sample_tokens)
    frame_of = {t: i for i, t in enumerate(tokens)}
    classes = tuple(cfg.class_names)
    class_of = {c: i for i, c in enumerate(classes)}
    dist_ths = np.asarray(cfg.dist_ths, dtype=np.float64)
    tp_column = list(cfg.dist_ths).index(cfg.dist_th_tp)
    preds = pred_boxes.all
    frame = np.array([frame_of[b.sample_token] for b in preds], dtype=np.int64)
    label = np.array([class_of[b.detection_name] for b in preds], dtype=np.int64)
    score = np.array([b.detection_score for b in preds], dtype=np.float64)
    gt_counts = np.zeros((len(tokens), len(classes)), dtype=np.int64)
    for f, token in enumerate(tokens):
        for box in gt_boxes[token]:
            gt_counts[f, class_of[box.detection_name]] += 1
    tp = np.zeros((len(preds), len(dist_ths)), dtype=bool)
    tp_errors = np.full((len(preds), len(TP_METRICS)), np.nan)
    groups: dict[tuple[int, int], list[int]] = {}
    for p in range(len(preds)):
        groups.setdefault((int(frame[p]), int(label[p])), []).append(p)
    for (f, c), members in groups.items():
        gts = [box for box in gt_boxes[tokens[f]] if box.detection_name == classes[c]]
        if not gts:
            continue
        idx = np.asarray(members)
        order = idx[np.lexsort((idx, score[idx]))[::-1]]   # the devkit's: score, then list position, descending
        dist = np.array([[cfg.dist_fcn_callable(gt, preds[p]) for gt in gts] for p in order], dtype=np.float64)
        period = np.pi if classes[c] == "barrier" else 2 * np.pi
        for t, th in enumerate(dist_ths):
            taken = np.zeros(len(gts), dtype=bool)
            for row, p in enumerate(order):
                free = np.where(taken, np.inf, dist[row])
                j = int(np.argmin(free))   # the first closest, as the devkit's strict `<` keeps it
                if not free[j] < th:
                    continue
                taken[j] = True
                tp[p, t] = True
                if t == tp_column:
                    gt, pred = gts[j], preds[p]
                    tp_errors[p] = (center_distance(gt, pred), velocity_l2(gt, pred), 1 - scale_iou(gt, pred),
                                    yaw_diff(gt, pred, period=period), 1 - attr_acc(gt, pred))
    return FrameMatches(tokens=np.array(tokens, dtype=str), classes=classes, dist_ths=dist_ths,
                        config=cfg.serialize(), gt_counts=gt_counts, frame=frame, label=label, score=score, tp=tp,
                        tp_errors=tp_errors)


def empty_matches(tokens: list[str], cfg: DetectionConfig) -> FrameMatches:
    """The match data of a submission without a single box (every AP 0, every TP error 1, whatever the GT)."""
    classes = tuple(cfg.class_names)
    dist_ths = np.asarray(cfg.dist_ths, dtype=np.float64)
    return FrameMatches(tokens=np.array(tokens, dtype=str), classes=classes, dist_ths=dist_ths,
                        config=cfg.serialize(), gt_counts=np.zeros((len(tokens), len(classes)), dtype=np.int64),
                        frame=np.zeros(0, np.int64), label=np.zeros(0, np.int64), score=np.zeros(0),
                        tp=np.zeros((0, len(dist_ths)), bool), tp_errors=np.zeros((0, len(TP_METRICS))))


@dataclass(frozen=True)
class _ClassRows:
    """One class's predictions sorted as `accumulate` sorts them."""

    frame: np.ndarray       # (n,)
    score: np.ndarray       # (n,)
    tp: np.ndarray          # (n, T) bool
    tp_errors: np.ndarray   # (n, 5)


class FrameScorer:
    """NDS, mAP and the TP errors of one run's predictions, re-scored for a multiset of its frames."""

    def __init__(self, matches: FrameMatches) -> None:
        from nuscenes.eval.detection.data_classes import DetectionConfig

        self.matches = matches
        self.cfg = DetectionConfig.deserialize(matches.config)
        self.tp_column = list(self.cfg.dist_ths).index(self.cfg.dist_th_tp)
        self.rows: list[_ClassRows] = []
        position = np.arange(len(matches.score))
        for c in range(len(matches.classes)):
            sel = position[matches.label == c]
            order = sel[np.lexsort((sel, matches.score[sel]))[::-1]]
            self.rows.append(_ClassRows(frame=matches.frame[order], score=matches.score[order],
                                        tp=matches.tp[order], tp_errors=matches.tp_errors[order]))

    @property
    def tokens(self) -> np.ndarray:
        """(F,) the frames' sample tokens: `score`'s `counts` are in this order."""
        return self.matches.tokens

    def score(self, counts: np.ndarray | None = None) -> dict[str, float]:
        """{"NDS", "mAP", "mATE", ..., "mAAE"} with frame f taken `counts[f]` times ((F,) ints; None: each once).

        The devkit's `accumulate`, `calc_ap`, `calc_tp` and `DetectionMetrics` arithmetic, step for step on the same
        arrays (so that every count 1 gives its numbers exactly), without its per-call objects.
        """
        cfg = self.cfg
        if counts is not None:
            counts = np.asarray(counts, dtype=np.int64)
            if counts.shape != (len(self.tokens),):
                raise ValueError(f"counts has shape {counts.shape}; expected ({len(self.tokens)},), one per frame")
        first = round(100 * cfg.min_recall) + 1   # calc_ap and calc_tp exclude the min-recall bin
        mean_dist_aps: list[float] = []
        class_errors: dict[str, list[float]] = {k: [] for k in TP_METRICS}
        for c, name in enumerate(self.matches.classes):
            rows = self.rows[c]
            if counts is None:
                npos = int(self.matches.gt_counts[:, c].sum())
                score, tp_flags, tp_errors = rows.score, rows.tp, rows.tp_errors
            else:
                npos = int(counts @ self.matches.gt_counts[:, c])
                take = np.repeat(np.arange(len(rows.frame)), counts[rows.frame])
                score, tp_flags, tp_errors = rows.score[take], rows.tp[take], rows.tp_errors[take]
            errors = dict.fromkeys(TP_METRICS, 1.0)   # no match: AP 0, every TP error 1
            matched = tp_flags.any(axis=0) if npos > 0 else np.zeros(len(cfg.dist_ths), bool)
            aps = np.zeros(len(cfg.dist_ths))
            if matched.any():
                tp = np.cumsum(tp_flags.astype(np.int64), axis=0).astype(float)
                fp = np.cumsum((~tp_flags).astype(np.int64), axis=0).astype(float)
                rec, prec = (tp / float(npos)).T, (tp / (fp + tp)).T
                curves = np.stack([np.interp(_RECALL, rec[t], prec[t], right=0) for t in np.flatnonzero(matched)])
                curves = curves[:, first:] - cfg.min_precision
                curves[curves < 0] = 0
                aps[matched] = np.mean(curves, axis=1) / (1.0 - cfg.min_precision)
                if matched[self.tp_column]:
                    errors = _tp_errors(tp_flags[:, self.tp_column], score, rec[self.tp_column], tp_errors, first)
            mean_dist_aps.append(float(np.mean(aps.tolist())))
            for metric in TP_METRICS:
                class_errors[metric].append(np.nan if metric in UNDEFINED_TP.get(name, ()) else errors[metric])
        mean_ap = float(np.mean(mean_dist_aps))
        tp_mean = {metric: float(np.nanmean(class_errors[metric])) for metric in _DEVKIT_TP_ORDER}
        scores = [max(0.0, 1.0 - tp_mean[metric]) for metric in _DEVKIT_TP_ORDER]
        nds = float(cfg.mean_ap_weight * mean_ap + np.sum(scores)) / float(cfg.mean_ap_weight + len(scores))
        return {"NDS": nds, "mAP": mean_ap, **{HEADLINE[k]: tp_mean[k] for k in TP_METRICS}}


_RECALL = np.linspace(0, 1, 101)   # DetectionMetricData's 101 recall points
_DEVKIT_TP_ORDER = ("trans_err", "scale_err", "orient_err", "vel_err", "attr_err")   # its NDS sum's order


def _tp_errors(tp_flags: np.ndarray, scores: np.ndarray, rec: np.ndarray, tp_errors: np.ndarray,
               first: int) -> dict[str, float]:
    """`calc_tp` of each TP metric for one class at `dist_th_tp`, from `accumulate`'s sorted rows: `tp_flags` (n,),
    `scores` (n,), cumulative recall `rec` (n,), `tp_errors` (n, 5) (read where matched)."""
    conf = np.interp(_RECALL, rec, scores, right=0)
    nonzero = np.nonzero(conf)[0]
    last = nonzero[-1] if len(nonzero) else 0   # DetectionMetricData.max_recall_ind
    if last < first:
        return dict.fromkeys(TP_METRICS, 1.0)
    matched_conf = scores[tp_flags][::-1]
    values = tp_errors[tp_flags].astype(float)   # (m, 5)
    nan = np.isnan(values)
    sums, seen = np.nancumsum(values, axis=0), np.cumsum(~nan, axis=0)
    means = np.divide(sums, seen, out=np.zeros_like(sums), where=seen != 0)   # the devkit's cummean, per column
    means[:, nan.all(axis=0)] = 1.0   # an error NaN at every match is 1 everywhere
    curves = np.stack([np.interp(conf[::-1], matched_conf, means[::-1, k])[::-1] for k in range(len(TP_METRICS))])
    return dict(zip(TP_METRICS, np.mean(curves[:, first:last + 1], axis=1).tolist(), strict=True))


def frame_positions(reference: np.ndarray, tokens: np.ndarray, *, where: str) -> np.ndarray:
    """(F,) for each of `tokens`, its position in `reference`: counts drawn over `reference`'s frames, indexed
    with this, are the same resample over `tokens`' frames. Raises `MatchesError` unless both hold the same frames.
    """
    at: Mapping[str, int] = {str(t): i for i, t in enumerate(reference)}
    missing = [str(t) for t in tokens if str(t) not in at]
    if missing or len(tokens) != len(at):
        raise MatchesError(f"{where}: the runs were scored on different frames ({len(reference)} and {len(tokens)} "
                           f"frames{', e.g. ' + missing[0] + ' only in one' if missing else ''}); score every run "
                           "of a comparison on the same split")
    return np.array([at[str(t)] for t in tokens], dtype=np.int64)
