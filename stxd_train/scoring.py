"""Predicting with and scoring a teacher or student run folder (`stxd-train eval`, `stxd-train predict`).

Scores are kept per split: `RUN/eval/<split>/` holds the split's submission, `metrics.json`, `summary.md` and PR
curves, and `RUN/metrics.json` is the run's headline, rewritten only by scoring its val split (the one `compare` and
`sweep` read). A split without annotations (nuScenes' test split) cannot be scored; `predict` writes its submission.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.config import read_yaml
from pipelines.errors import ConfigError

KINDS = ("teacher", "student")


@dataclass(frozen=True)
class RunPredictions:
    """A run's decoded boxes on every sample of one split."""

    run: Path
    kind: str                     # "teacher" (LiDAR) or "student" (cameras)
    split: str
    val_split: str                # the run's own val split, whose scores are `RUN/metrics.json`
    nusc: Any                     # the devkit's NuScenes
    index: Any                    # pipelines.nuscenes.SampleIndex of `split`
    detections: dict[str, Any]    # sample token -> pipelines.evaluation.Detections

    def submission(self) -> dict[str, Any]:
        """The nuScenes detection submission of these boxes (every sample of the split, empty lists included)."""
        from pipelines.evaluation import build_submission

        modality = {"use_lidar": True} if self.kind == "teacher" else {"use_camera": True}
        return build_submission(self.index, self.detections, **modality)


def run_kind(run: str | Path) -> str:
    """'teacher' or 'student', from `RUN/config.yaml`."""
    kind = read_yaml(Path(run) / "config.yaml").get("kind")
    if kind not in KINDS:
        raise ConfigError(f"{Path(run) / 'config.yaml'}: found kind {kind!r}, expected 'teacher' or 'student'; is "
                          f"{run} a folder written by `stxd-train teacher` or `stxd-train fit`?")
    return kind


def predict(run: str | Path, *, split: str | None = None, device: str = "auto", dataroot: str | None = None,
            scoring: bool = False) -> RunPredictions:
    """Decode the run's teacher or student on every sample of `split` (default: the run's val split). With
    `scoring`, a split without annotations is refused before the model is loaded."""
    from pipelines.evaluation import require_annotations
    from pipelines.nuscenes import load_nuscenes

    run = Path(run)
    kind = run_kind(run)
    saved = read_yaml(run / "config.yaml")
    val_split = saved["data"]["val_split"]
    split = split or val_split
    nusc = load_nuscenes(dataroot or saved["dataroot"], saved["version"])
    if scoring:
        require_annotations(nusc, split, advice=f"`stxd-train predict --run {run} --split {split} --out "
                                                f"results.json` writes its submission")
    if kind == "teacher":
        from stxd_train.teacher import teacher_predictions as predictions
    else:
        from stxd_train.fit import student_predictions as predictions
    index, detections = predictions(run, saved, nusc, split, device)
    return RunPredictions(run=run, kind=kind, split=split, val_split=val_split, nusc=nusc, index=index,
                          detections=detections)


def evaluate_run(run: str | Path, *, split: str | None = None, device: str = "auto",
                 dataroot: str | None = None) -> dict[str, Any]:
    """Score a teacher or student run on `split` with the real DetectionEval. Writes `RUN/eval/<split>/` (the
    submission, `metrics.json`, `summary.md`, PR curves), `RUN/training_curves.png`, and, for the run's val split
    only, `RUN/metrics.json`; returns the metrics."""
    from pipelines.evaluation import evaluate
    from stxd_train.curves import plot_training_curves
    from stxd_train.engine import TRAIN_SECONDS_FILE, atomic_write_text
    from stxd_train.engine.hooks import read_sources

    found = predict(run, split=split, device=device, dataroot=dataroot, scoring=True)
    run, split = found.run, found.split
    metrics = evaluate(found.nusc, found.submission(), split, run / "eval" / split, report=True)
    metrics["boxes_per_sample"] = float(np.mean([len(d.scores) for d in found.detections.values()]))
    curves = plot_training_curves(run)
    if curves is not None:
        metrics["training_curves"] = str(curves)
    seconds = run / TRAIN_SECONDS_FILE
    if seconds.is_file():
        metrics["train_seconds"] = float(seconds.read_text())
    metrics["trained_by"] = read_sources(run)
    log_scores(run, split, metrics)
    again = f"then score the run again with `stxd-train eval --run {run} --split {split}`"
    text = json.dumps(metrics, indent=2)
    atomic_write_text(run / "eval" / split / "metrics.json", text, then=again)
    if split == found.val_split:
        atomic_write_text(run / "metrics.json", text, then=again)
    return metrics


def log_scores(run: Path, split: str, metrics: dict[str, Any]) -> None:
    """NDS, mAP and the TP errors into the run's TensorBoard log (`RUN/tb/`) as `eval/<split>/<metric>`, at the
    run's last training step, beside its loss curves."""
    from torch.utils.tensorboard import SummaryWriter

    step = 0
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").is_file() else []
    if lines:
        step = int(json.loads(lines[-1])["step"])
    writer = SummaryWriter(str(run / "tb"))
    try:
        for key in ("NDS", "mAP", "mATE", "mASE", "mAOE", "mAVE", "mAAE"):
            writer.add_scalar(f"eval/{split}/{key}", metrics[key], global_step=step)
    finally:
        writer.close()


def write_submission(found: RunPredictions, out: str | Path) -> dict[str, Any]:
    """Write the nuScenes submission of `found` to `out` atomically; returns it."""
    from stxd_train.engine import atomic_write_text

    submission = found.submission()
    atomic_write_text(out, json.dumps(submission),
                      then=f"then run `stxd-train predict --run {found.run} --split {found.split}` again")
    return submission
