"""`stxd-train diagnose`: the effective dimension (d_eff) of teacher and student BEV features on a split, and the
per-class orientation errors of evaluated runs.

d_eff is the participation ratio `(Σ λ)² / Σ λ²` of a spectrum. Two spectra are measured per feature set:

- `d_eff (cov)`: the eigenvalues of the feature covariance over BEV cells (`stxd_train.distill.effective_dimension`);
- `d_eff (corr)`: the eigenvalues of the correlation matrix, i.e. the covariance of the channels standardised to
  unit variance (`correlation_dimension`).

Feature sets: the teacher's BEV read from the cache; each run's raw student BEV (`out.bev`, before any adapter);
and, for a run distilled through an adapter, its adapted BEV (`adapter(out.bev)`, in the teacher's channels).

Why the adapted features need the correlation spectrum: CD standardises every channel of the adapted features
before it compares them with the teacher's (`stxd_train.distill.correlation_loss`), so it is invariant to a
per-channel affine map `g_i → a_i g_i + b_i` (a_i > 0) of the adapter output. The adapter's last layer is a 1×1
conv with a bias, so the training signal of CD leaves each output channel's scale and offset free: they are
whatever the initialisation and the optimiser's drift made them. The covariance spectrum of the adapted features
depends on those arbitrary scales (one channel ten times larger dominates it), so their covariance d_eff is not a
property of what CD learned; the correlation spectrum divides the scales out. TD (L2-normalised tokens) and MSE
do constrain the relative scales, so for runs that also train those terms the covariance d_eff means more; the
correlation d_eff is comparable across every run and with the teacher. The raw student BEV has no such freedom
(the adapter and the detection head read it), and both numbers are meaningful there. It is also the one space
that plain and distilled students of a config share, so students are compared on it.

Rows are BEV cells of every sample of the split. At most `max_rows` are kept per feature set: each sample
contributes the same number of randomly chosen cells (all of them when the split has at most `max_rows` cells),
so memory stays bounded on large splits; the raw and adapted BEV of a run use the same cells.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.errors import ConfigError
from stxd_train.distill import effective_dimension

# A channel whose variance is below this fraction of the largest channel variance counts as constant (a dead
# channel): it has no correlation with anything and is left out of the correlation spectrum.
_CONSTANT_RATIO = 1e-12


def correlation_dimension(x: torch.Tensor) -> tuple[float, int]:
    """Participation ratio of the correlation spectrum of features x, and the number of constant columns.

    x: (N, D), rows as samples (BEV cells), columns as channels. Columns whose variance is 0 (below 1e-12 of the
    largest) are dropped; the others are standardised to mean 0 and unit (unbiased) variance, and the result is
    `effective_dimension` of them: `D'² / ‖R‖_F²` for the D' × D' correlation matrix R. It is invariant to any
    per-column affine map with non-zero scale, ranges from 1 to D', and is 0.0 when every column is constant.
    Raises ValueError for a non-2-D x or N < 2.
    """
    if x.dim() != 2:
        raise ValueError(f"correlation_dimension expects features of shape (N, D); got {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"correlation_dimension needs at least 2 rows to estimate a correlation; got N={x.shape[0]}")
    x64 = x.detach().to(torch.float64)
    centred = x64 - x64.mean(dim=0, keepdim=True)
    var = centred.pow(2).sum(dim=0) / (x.shape[0] - 1)
    varying = var > _CONSTANT_RATIO * var.max() if float(var.max()) > 0 else torch.zeros_like(var, dtype=torch.bool)
    constant = int((~varying).sum())
    if not bool(varying.any()):
        return 0.0, constant
    return effective_dimension(centred[:, varying] / var[varying].sqrt()), constant


class _CellSampler:
    """Which BEV cells of each sample are kept so that a feature set has at most `max_rows` rows."""

    def __init__(self, *, samples: int, max_rows: int, seed: int) -> None:
        self.samples = samples
        self.max_rows = max_rows
        self.rng = np.random.default_rng(seed)

    def cells(self, count: int) -> np.ndarray:
        """Sorted indices of the cells kept out of one sample's `count`."""
        if self.samples * count <= self.max_rows:
            return np.arange(count)
        keep = min(count, math.ceil(self.max_rows / self.samples))
        return np.sort(self.rng.choice(count, keep, replace=False))

    def finish(self, *row_lists: list[np.ndarray]) -> tuple[torch.Tensor, ...]:
        """The kept rows of every sample as one (N, C) float32 tensor per feature set, N <= max_rows; feature sets
        of the same cells (the raw and adapted BEV of a run) keep the same rows."""
        stacked = [np.concatenate(rows) for rows in row_lists]
        n = len(stacked[0])
        if n > self.max_rows:
            keep = np.sort(self.rng.choice(n, self.max_rows, replace=False))
            stacked = [x[keep] for x in stacked]
        return tuple(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)) for x in stacked)


def _row(features: str, x: torch.Tensor) -> dict[str, Any]:
    """One row of the d_eff table for the features `x: (N, C)`."""
    corr, constant = correlation_dimension(x)
    return {"features": features, "channels": x.shape[1], "rows": x.shape[0], "d_eff": effective_dimension(x),
            "d_eff_corr": corr, "constant_channels": constant}


def diagnose(cache: str | Path, *, runs: Sequence[str | Path] = (), split: str, dataroot: str | None = None,
             version: str | None = None, device: str = "auto", max_rows: int = 100_000,
             seed: int = 0) -> list[dict[str, Any]]:
    """Rows of the d_eff table: the teacher first, then the feature sets of each run.

    Each row has `features` (a label), `channels`, `rows` (BEV cells measured), `d_eff` (covariance spectrum),
    `d_eff_corr` (correlation spectrum) and `constant_channels` (left out of the correlation spectrum). A run
    gives a row for its raw BEV and, when it was distilled through an adapter, one for its adapted BEV.
    The split's samples come from `dataroot`/`version`, or from the first run's config when they are None.
    """
    from pipelines.config import read_yaml
    from pipelines.device import resolve_device
    from pipelines.nuscenes import SampleIndex
    from stxd_cache.store import open_cache
    from stxd_train.fit import load_student, run_config, student_outputs

    if max_rows < 2:
        raise ConfigError(f"--max-rows is {max_rows}; d_eff needs at least 2 BEV cells per feature set, e.g. 100000")
    reader = open_cache(cache)
    reader.require_complete()
    reader.require_consistent()
    saved = [read_yaml(Path(r) / "config.yaml") for r in runs]
    if dataroot is None or version is None:
        if not saved:
            raise ConfigError("diagnose needs --dataroot and --version to find the split's samples when no --run is "
                              "given")
        dataroot, version = dataroot or saved[0]["dataroot"], version or saved[0]["version"]
    cfgs = [run_config(c, where=str(Path(r) / "config.yaml")) for r, c in zip(runs, saved, strict=True)]
    index = SampleIndex.load(dataroot, version, [split], k_prev=max((c.model.queue for c in cfgs), default=0),
                             max_sweeps=0)
    if not len(index):
        raise ConfigError(f"split {split} of {dataroot} ({version}) has no samples; choose a split with samples")
    sampler = _CellSampler(samples=len(index), max_rows=max_rows, seed=seed)
    teacher_rows = []
    for sample in index:
        bev = reader.read(reader.index_of(sample.token), k=0).bev          # (C, H, W) on the cache grid
        cells = bev.reshape(bev.shape[0], -1).T                            # (H·W, C)
        teacher_rows.append(cells[sampler.cells(len(cells))])
    table = [_row(f"teacher ({reader.meta.teacher.name}, cache)", *sampler.finish(teacher_rows))]
    dev = resolve_device(device)
    for run, cfg in zip(runs, cfgs, strict=True):
        student = load_student(Path(run) / "student.pt", dev)
        sampler = _CellSampler(samples=len(index), max_rows=max_rows, seed=seed)
        raw_rows, adapted_rows = [], []
        for _, out in student_outputs(student, cfg, index, dev):
            with torch.inference_mode():
                adapted = None if student.adapter is None else student.adapter(out.bev)
            for b in range(out.bev.shape[0]):
                raw = out.bev[b].flatten(1).T                              # (H·W, C_s) on the student grid
                picked = torch.from_numpy(sampler.cells(raw.shape[0])).to(raw.device)
                raw_rows.append(raw[picked].float().cpu().numpy())
                if adapted is not None:
                    adapted_rows.append(adapted[b].flatten(1).T[picked].float().cpu().numpy())
        label = f"{run} ({cfg.model.name}, distill: {','.join(cfg.distill.terms) or 'none'}"
        if adapted_rows:
            raw_x, adapted_x = sampler.finish(raw_rows, adapted_rows)
            table.append(_row(f"{label}, BEV)", raw_x))
            table.append(_row(f"{label}, adapted BEV)", adapted_x))
        else:
            table.append(_row(f"{label}, BEV)", *sampler.finish(raw_rows)))
    return table


#: The TP error of the devkit that `orientation_markdown` reads, per class, from `RUN/metrics.json`.
ORIENTATION_ERROR = "orient_err"


def orientation_errors(run: str | Path) -> tuple[str, float, dict[str, float | None]]:
    """(split, mAOE, per-class AOE in radians) of an evaluated run, read from `RUN/metrics.json` (written by
    `stxd-train eval`); None where the devkit leaves the AOE undefined (traffic_cone)."""
    path = Path(run) / "metrics.json"
    if not path.is_file():
        raise ConfigError(f"{path} is missing: score the run first (stxd-train eval --run {run})")
    metrics = json.loads(path.read_text())
    per_class = metrics.get("per_class")
    if not isinstance(per_class, dict) or not all(isinstance(v, dict) and ORIENTATION_ERROR in v
                                                  for v in per_class.values()):
        raise ConfigError(f"{path} has no per-class TP errors (`per_class.<class>.{ORIENTATION_ERROR}`); it was "
                          f"written by an older stxd: score the run again with `stxd-train eval --run {run}`")
    errors = {name: None if row[ORIENTATION_ERROR] is None else float(row[ORIENTATION_ERROR])
              for name, row in per_class.items()}
    return str(metrics.get("split", "?")), float(metrics["mAOE"]), errors


def orientation_markdown(runs: Sequence[str | Path]) -> str:
    """Per-class average orientation error (AOE, radians) of evaluated runs, one column per run, then mAOE.

    The numbers are the devkit's (`DetectionEval` TP errors at 2 m, over the true positives of each class):
    barrier's heading is compared modulo π and traffic_cone's is not scored (–).
    """
    columns = [(Path(run), *orientation_errors(run)) for run in runs]
    classes = list(dict.fromkeys(name for *_, errors in columns for name in errors))
    lines = ["AOE per class (radians; nuScenes DetectionEval: barrier modulo π, traffic_cone not scored)", "",
             "| class | " + " | ".join(f"{run} ({split})" for run, split, _, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for name in classes:
        cells = [errors.get(name) for *_, errors in columns]
        lines.append(f"| {name} | " + " | ".join("–" if v is None else f"{v:.3f}" for v in cells) + " |")
    lines.append("| mAOE | " + " | ".join(f"{maoe:.3f}" for _, _, maoe, _ in columns) + " |")
    return "\n".join(lines) + "\n"


def deff_markdown(table: Sequence[dict[str, Any]]) -> str:
    """The d_eff table of `diagnose`: one row per feature set."""
    lines = ["| features | d_eff (cov) | d_eff (corr) | channels | cells |", "|---|---:|---:|---:|---:|"]
    for row in table:
        channels = str(row["channels"]) + (f" ({row['constant_channels']} constant)" if row["constant_channels"]
                                           else "")
        lines.append(f"| {row['features']} | {row['d_eff']:.2f} | {row['d_eff_corr']:.2f} | {channels} | "
                     f"{row['rows']} |")
    return "\n".join(lines) + "\n"
