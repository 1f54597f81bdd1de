"""`stxd-train diagnose`: the effective dimension (d_eff) of teacher and student BEV features on a split.

d_eff is the participation ratio of the eigenvalues of the feature covariance over BEV positions
(`stxd_train.distill.effective_dimension`). The teacher's features are read from the cache; a student's are
its adapted BEV (`adapter(out.bev)`, in the teacher's channels) when the run was distilled through an adapter,
else its raw BEV. Rows are BEV cells of every sample of the split, randomly subsampled to `max_rows`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.errors import ConfigError


def _subsample(rows: list[np.ndarray], max_rows: int, seed: int) -> torch.Tensor:
    x = np.concatenate(rows)
    if len(x) > max_rows:
        x = x[np.random.default_rng(seed).choice(len(x), max_rows, replace=False)]
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def diagnose(cache: str | Path, *, runs: Sequence[str | Path] = (), split: str, dataroot: str | None = None,
             version: str | None = None, device: str = "auto", max_rows: int = 100_000,
             seed: int = 0) -> list[dict[str, Any]]:
    """Rows of the d_eff table: the teacher first, then one per run.

    The split's samples come from `dataroot`/`version`, or from the first run's config when they are None.
    """
    from pipelines.config import read_yaml
    from pipelines.nuscenes import SampleIndex
    from stxd_cache.store import open_cache
    from stxd_cache.teacher.model import resolve_device
    from stxd_train.distill import effective_dimension
    from stxd_train.fit import load_student, run_config, student_outputs

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
    teacher_rows = []
    for sample in index:
        bev = reader.read(reader.index_of(sample.token)).bev
        teacher_rows.append(bev.reshape(bev.shape[0], -1).T)
    x = _subsample(teacher_rows, max_rows, seed)
    table = [{"features": f"teacher ({reader.meta.teacher.name}, cache)", "channels": x.shape[1],
              "rows": x.shape[0], "d_eff": effective_dimension(x)}]
    dev = resolve_device(device)
    for run, cfg in zip(runs, cfgs, strict=True):
        student = load_student(Path(run) / "student.pt", dev)
        rows = []
        for _, out in student_outputs(student, cfg, index, dev):
            with torch.inference_mode():
                bev = out.bev if student.adapter is None else student.adapter(out.bev)
            rows.append(bev.permute(0, 2, 3, 1).flatten(0, 2).cpu().numpy())
        x = _subsample(rows, max_rows, seed)
        terms = ",".join(cfg.distill.terms) or "none"
        kind = "adapted BEV" if student.adapter is not None else "BEV"
        table.append({"features": f"{run} ({cfg.model.name}, distill: {terms}, {kind})",
                      "channels": x.shape[1], "rows": x.shape[0], "d_eff": effective_dimension(x)})
    return table
