"""`stxd-train sweep`: many student fits against one read-only cache, each evaluated, and one results table.

A grid file (configs/sweeps/*.yaml) names a base student config, the seeds, overrides shared by every run, and
the variants, each a list of `--set` overrides (and optionally its own config and seeds). Every (variant, seed)
is one `stxd-train fit` process writing `OUT/<variant>/seed<S>/`, followed by `stxd-train eval`; `--parallel N`
runs N at once, all reading the same cache, each with `cores / N` torch threads. A run that already has its
`metrics.json` is not trained again, so an interrupted sweep is continued by running it again.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.config import require
from pipelines.errors import ConfigError, StxdError


@dataclass(frozen=True, kw_only=True)
class Variant:
    """One row group of the table: a config plus overrides, trained once per seed."""

    name: str = field(metadata={"help": "row label, also the run folder name"})
    set: tuple[str, ...] = field(default=(), metadata={"help": "overrides (key=value) on top of the grid's"})
    config: str | None = field(default=None, metadata={"help": "student config; default: the grid's"})
    seeds: tuple[int, ...] | None = field(default=None, metadata={"help": "seeds; default: the grid's"})

    def __post_init__(self) -> None:
        require("sweep variant", [(bool(self.name) and "/" not in self.name, "name", self.name,
                                   "a non-empty folder name")])


@dataclass(frozen=True, kw_only=True)
class SweepConfig:
    """configs/sweeps/*.yaml."""

    config: str = field(metadata={"help": "base student config of every variant"})
    seeds: tuple[int, ...] = field(default=(0,), metadata={"help": "seeds of every variant (train.seed)"})
    set: tuple[str, ...] = field(default=(), metadata={"help": "overrides shared by every run"})
    variants: tuple[Variant, ...] = field(metadata={"help": "the rows of the table"})
    dataroot: str | None = field(default=None, metadata={"help": "dataset root (--dataroot overrides it)"})
    version: str | None = field(default=None, metadata={"help": "table folder (--version overrides it)"})

    def __post_init__(self) -> None:
        names = [v.name for v in self.variants]
        require("sweep", [
            (len(self.variants) >= 1, "variants", names, "at least one variant"),
            (len(set(names)) == len(names), "variants", names, "distinct names"),
            (len(self.seeds) >= 1, "seeds", self.seeds, "at least one seed"),
        ])


@dataclass(frozen=True)
class RunSpec:
    variant: str
    seed: int
    config: str
    overrides: tuple[str, ...]
    out: Path


def plan(cfg: SweepConfig, out: Path) -> list[RunSpec]:
    """Every (variant, seed) of the grid, in table order."""
    runs = []
    for v in cfg.variants:
        for seed in v.seeds if v.seeds is not None else cfg.seeds:
            runs.append(RunSpec(variant=v.name, seed=seed, config=v.config or cfg.config,
                                overrides=(*cfg.set, *v.set, f"train.seed={seed}"), out=out / v.name / f"seed{seed}"))
    return runs


def run_order(runs: list[RunSpec]) -> list[RunSpec]:
    """Seed-major: every variant's first seed, then every variant's second, so that a partial sweep already
    compares all variants."""
    seen: dict[str, int] = {}
    rank = {}
    for spec in runs:
        rank[spec.out] = seen[spec.variant] = seen.get(spec.variant, -1) + 1
    return sorted(runs, key=lambda spec: rank[spec.out])


def _stxd_train() -> list[str]:
    return [sys.executable, "-m", "stxd_train.cli"]


def _run_one(spec: RunSpec, *, dataroot: str, version: str, cache: str, threads: int, device: str) -> dict[str, Any]:
    """Fit and evaluate one run (skipped when it already has metrics); returns its table row."""
    metrics_path = spec.out / "metrics.json"
    if not metrics_path.is_file():
        spec.out.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        resume = ["--resume"] if (spec.out / "checkpoints" / "last.pt").is_file() else []
        fit = [*_stxd_train(), "fit", "--config", spec.config, "--dataroot", dataroot, "--version", version,
               "--cache", cache, "--out", str(spec.out), "--device", device, *resume,
               *(a for o in spec.overrides for a in ("--set", o))]
        evaluate = [*_stxd_train(), "eval", "--run", str(spec.out), "--device", device]
        with open(spec.out / "sweep.log", "a") as log:
            for cmd in (fit, evaluate):
                log.write(f"$ {' '.join(cmd)}\n")
                log.flush()
                done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
                if done.returncode != 0:
                    raise StxdError(f"sweep run {spec.variant} seed {spec.seed} failed (exit {done.returncode}); "
                                    f"see {spec.out / 'sweep.log'}")
    metrics = json.loads(metrics_path.read_text())
    steps = [json.loads(line) for line in (spec.out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    step_time = statistics.median(s["step_time"] for s in steps) if steps else float("nan")
    return {"variant": spec.variant, "seed": spec.seed, "NDS": metrics["NDS"], "mAP": metrics["mAP"],
            "step_time": step_time, "train_seconds": metrics.get("train_seconds"), "run": str(spec.out)}


def run_sweep(cfg: SweepConfig, *, cache: str, dataroot: str, version: str, out: str | Path, parallel: int = 1,
              device: str = "cpu", progress: bool = True) -> list[dict[str, Any]]:
    """Train and evaluate every run of the grid; writes `OUT/results.json` and `OUT/results.md`."""
    from tqdm import tqdm

    from stxd_cache.store import open_cache

    if parallel < 1:
        raise ConfigError(f"--parallel is {parallel}; expected at least 1 process")
    open_cache(cache).require_complete()   # fail before any process starts
    out = Path(out)
    runs = plan(cfg, out)
    threads = max(1, (os.cpu_count() or 1) // parallel)
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=parallel) as pool, tqdm(total=len(runs), desc="sweep", unit="run",
                                                                 disable=not progress) as bar:
        futures = {spec.out: pool.submit(_run_one, spec, dataroot=dataroot, version=version, cache=cache,
                                         threads=threads, device=device) for spec in run_order(runs)}
        for future in futures.values():
            future.add_done_callback(lambda _: bar.update(1))
        rows = [futures[spec.out].result() for spec in runs]
    out.mkdir(parents=True, exist_ok=True)
    summary = {"rows": rows, "variants": _aggregate(rows), "parallel": parallel,
               "wall_seconds": time.perf_counter() - start}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    (out / "results.md").write_text(results_markdown(rows))
    return rows


def _aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["variant"], []).append(row)
    out = []
    for name, group in groups.items():
        entry: dict[str, Any] = {"variant": name, "seeds": len(group)}
        for key in ("NDS", "mAP", "step_time"):
            values = [r[key] for r in group]
            entry[key] = statistics.fmean(values)
            entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(entry)
    return out


def results_markdown(rows: list[dict[str, Any]]) -> str:
    """Per-run rows, then the mean ± standard deviation over seeds of each variant."""
    lines = ["| variant | seed | NDS | mAP | step time (s) |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['variant']} | {r['seed']} | {r['NDS']:.4f} | {r['mAP']:.4f} | {r['step_time']:.3f} |"
              for r in rows]
    lines += ["", "| variant | seeds | NDS (mean ± std) | mAP (mean ± std) | step time (s) |",
              "|---|---:|---:|---:|---:|"]
    lines += [f"| {a['variant']} | {a['seeds']} | {a['NDS']:.4f} ± {a['NDS_std']:.4f} | "
              f"{a['mAP']:.4f} ± {a['mAP_std']:.4f} | {a['step_time']:.3f} |" for a in _aggregate(rows)]
    return "\n".join(lines) + "\n"
