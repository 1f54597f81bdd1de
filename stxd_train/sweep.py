"""`stxd-train sweep`: many student fits against one read-only cache, each evaluated, and one results table.

A grid file (configs/sweeps/*.yaml) names a base student config, the seeds, overrides shared by every run, and
the variants, each a list of `--set` overrides (and optionally its own config and seeds). Every (variant, seed)
is one `stxd-train fit` process writing `OUT/<variant>/seed<S>/`, followed by `stxd-train eval` (unless the
grid says `evaluate: false`); `--parallel N` runs N at once, all reading the same cache, each with `cores / N`
torch threads. A finished run is not trained again, so an interrupted sweep is continued by running it again:
a run counts as finished when its `config.yaml` is the one this grid gives it, its last checkpoint reached
`train.max_steps` and its `student.pt` loads; one that stopped early (or whose grid raised `max_steps`) is
resumed from its last checkpoint, and one trained with another config is refused.

Besides NDS, mAP and the step time, the table gives each loss term's mean over the first `early_steps`
steps: the sizes that distillation weights are chosen by (configs/sweeps/weights_synth.yaml).

With a `reference` variant, each other variant is also compared with it seed by seed: two runs of one seed share
the initial weights, the sample order and the augmentation draws, so their difference is the loss's alone. For NDS
and mAP the table gives the per-seed differences, their mean, a paired-t interval over seeds and a bootstrap
interval over the evaluation frames (the same resample for all runs of a draw, re-scored from each run's
`eval/<split>/matches.npz`). `stxd-train compare --reference` gives the same view of any evaluated runs.
"""

from __future__ import annotations

import json
import os
import re
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
from stxd_train.stats import BOOTSTRAP_SEED, json_safe, matches_path, paired_comparison, paired_markdown


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
    evaluate: bool = field(default=True, metadata={"help": "score each run on the val split (false: fit only)"})
    early_steps: int = field(default=10, metadata={"help": "steps over which the loss terms are averaged"})
    reference: str | None = field(default=None, metadata={
        "help": "variant every other one is compared with, seed by seed (None: no paired differences)"})
    bootstrap_draws: int = field(default=1000, metadata={
        "help": "frame resamples of the paired bootstrap interval (0: no bootstrap)"})

    def __post_init__(self) -> None:
        names = [v.name for v in self.variants]
        require("sweep", [
            (len(self.variants) >= 1, "variants", names, "at least one variant"),
            (len(set(names)) == len(names), "variants", names, "distinct names"),
            (len(self.seeds) >= 1, "seeds", self.seeds, "at least one seed"),
            (self.early_steps >= 1, "early_steps", self.early_steps, "at least 1"),
            (self.reference is None or self.reference in names, "reference", self.reference,
             f"one of the variants {names}"),
            (self.reference is None or self.evaluate, "reference", self.reference,
             "no reference when `evaluate: false` (paired differences compare scores)"),
            (self.bootstrap_draws >= 0, "bootstrap_draws", self.bootstrap_draws, "0 or more"),
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


def run_config_of(spec: RunSpec, *, dataroot: str, version: str, cache: str) -> dict[str, Any]:
    """The `config.yaml` that the `stxd-train fit` of `spec` writes (its config is loaded as `fit` loads it)."""
    from stxd_train.engine import load_run_config
    from stxd_train.fit import StudentRunConfig, run_record

    cfg = load_run_config(StudentRunConfig, spec.config, spec.overrides, kind="student")
    return run_record(cfg, dataroot=dataroot, version=version, cache=cache)


def training_to_do(spec: RunSpec, config: dict[str, Any]) -> str | None:
    """What the run folder of `spec` needs to hold the finished run of `config` (the `config.yaml` that its fit
    writes): None when it does, "fresh" (train from the start) or "resume" (continue from its last checkpoint, which
    also rewrites a missing or damaged `student.pt`). Raises `StxdError` when the folder holds another run."""
    from pipelines.config import read_yaml
    from stxd_train.engine import CheckpointError, config_changes, load_checkpoint
    from stxd_train.engine.checkpoint import LAST_CHECKPOINT, checkpoint_dir
    from stxd_train.fit import STUDENT_FILE, load_student

    run = f"sweep run {spec.variant} seed {spec.seed}"
    saved_path, last = spec.out / "config.yaml", checkpoint_dir(spec.out) / LAST_CHECKPOINT
    student = spec.out / STUDENT_FILE
    if not last.is_file():
        if student.is_file():
            raise StxdError(f"{run}: {student} exists but {last} does not, so whether it finished training cannot be "
                            f"told; move {spec.out} away to train the run again")
        return "fresh"   # never reached its first checkpoint: nothing to keep
    if not saved_path.is_file():
        raise StxdError(f"{run}: {last} exists but {saved_path} does not, so the config it was trained with is "
                        f"unknown; move {spec.out} away to train the run again")
    saved = read_yaml(saved_path)
    changed = config_changes(saved, config)
    if changed:
        raise StxdError(f"{run}: {saved_path} is not the config that the grid gives this run ({len(changed)} "
                        f"field(s) differ: {'; '.join(changed[:6])}); it was trained with another grid, cache or "
                        f"dataset. Move {spec.out} away to train it again, or give this sweep another --out")
    try:
        step = int(load_checkpoint(last)["step"])
    except (CheckpointError, KeyError, TypeError, ValueError) as exc:
        raise StxdError(f"{run}: its last checkpoint {last} cannot be read ({exc}); move {spec.out} away to train "
                        "the run again") from None
    max_steps = config["train"]["max_steps"]
    if step > max_steps:
        raise StxdError(f"{run}: its last checkpoint {last} is at step {step}, past train.max_steps {max_steps} of "
                        f"the grid; a run cannot be shortened: move {spec.out} away to train it again")
    if step < max_steps or config_changes(saved, config, allowed=frozenset()):
        return "resume"
    try:
        import torch

        load_student(student, torch.device("cpu"))
    except StxdError:
        return "resume"
    return None


def _run_one(spec: RunSpec, *, dataroot: str, version: str, cache: str, threads: int, device: str, evaluate: bool,
             early_steps: int, config: dict[str, Any]) -> dict[str, Any]:
    """Fit and evaluate one run (each skipped when already done); returns its table row."""
    metrics_path = spec.out / "metrics.json"
    training = training_to_do(spec, config)
    if training is not None:
        metrics_path.unlink(missing_ok=True)   # it scored the student that is about to be replaced
    if training is not None or (evaluate and not (metrics_path.is_file() and matches_path(spec.out).is_file())):
        spec.out.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        resume = ["--resume"] if training == "resume" else []
        fit = [*_stxd_train(), "fit", "--config", spec.config, "--dataroot", dataroot, "--version", version,
               "--cache", cache, "--out", str(spec.out), "--device", device, *resume,
               *(a for o in spec.overrides for a in ("--set", o))]
        score = [*_stxd_train(), "eval", "--run", str(spec.out), "--device", device]
        commands = ([fit] if training is not None else []) + ([score] if evaluate else [])
        with open(spec.out / "sweep.log", "a") as log:
            for cmd in commands:
                log.write(f"$ {' '.join(cmd)}\n")
                log.flush()
                done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
                if done.returncode != 0:
                    raise StxdError(f"sweep run {spec.variant} seed {spec.seed} failed (exit {done.returncode}); "
                                    f"see {spec.out / 'sweep.log'}")
    metrics = json.loads(metrics_path.read_text()) if evaluate else {}
    steps = [json.loads(line) for line in (spec.out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    step_time = statistics.median(s["step_time"] for s in steps) if steps else float("nan")
    early = [s["terms"] for s in steps if s["step"] <= early_steps] or [s["terms"] for s in steps[:1]]
    terms = {name: statistics.fmean(t[name] for t in early) for name in early[0]} if early else {}
    source = metrics.get("source") or {}
    return {"variant": spec.variant, "seed": spec.seed, "NDS": metrics.get("NDS"), "mAP": metrics.get("mAP"),
            "step_time": step_time, "train_seconds": metrics.get("train_seconds"), "early_terms": terms,
            "run": str(spec.out), "commit": source.get("commit"), "dirty": source.get("dirty")}


def run_sweep(cfg: SweepConfig, *, cache: str, dataroot: str, version: str, out: str | Path, parallel: int = 1,
              device: str = "cpu", progress: bool = True) -> list[dict[str, Any]]:
    """Train and evaluate every run of the grid; writes `OUT/results.json` and `OUT/results.md`."""
    from tqdm import tqdm

    from stxd_cache.store import open_cache
    from stxd_train.engine import atomic_write_text

    if parallel < 1:
        raise ConfigError(f"--parallel is {parallel}; expected at least 1 process")
    from pipelines.paths import check_output_path

    out = check_output_path(out, inputs={"--cache": cache, "--dataroot": dataroot})
    open_cache(cache).require_complete()   # fail before any process starts
    runs = plan(cfg, out)
    # Every run's config is loaded here, so that a bad override fails before any process starts.
    configs = {spec.out: run_config_of(spec, dataroot=dataroot, version=version, cache=cache) for spec in runs}
    threads = max(1, (os.cpu_count() or 1) // parallel)
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=parallel) as pool, tqdm(total=len(runs), desc="sweep", unit="run",
                                                                 disable=not progress) as bar:
        futures = {spec.out: pool.submit(_run_one, spec, dataroot=dataroot, version=version, cache=cache,
                                         threads=threads, device=device, evaluate=cfg.evaluate,
                                         early_steps=cfg.early_steps, config=configs[spec.out])
                   for spec in run_order(runs)}
        for future in futures.values():
            future.add_done_callback(lambda _: bar.update(1))
        rows = [futures[spec.out].result() for spec in runs]
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"rows": rows, "variants": _aggregate(rows), "parallel": parallel}
    paired = None
    if cfg.reference is not None:
        paired = paired_comparison(rows, reference=cfg.reference, draws=cfg.bootstrap_draws)
        summary.update(reference=cfg.reference, paired=paired,
                       bootstrap={"draws": cfg.bootstrap_draws, "seed": BOOTSTRAP_SEED, "confidence": 0.95})
    summary["wall_seconds"] = time.perf_counter() - start
    again = "then run the same `stxd-train sweep` again: it reuses the finished runs"
    atomic_write_text(out / "results.json", json.dumps(json_safe(summary), indent=2), then=again)
    atomic_write_text(out / "results.md", results_markdown(rows, early_steps=cfg.early_steps, paired=paired),
                      then=again)
    return rows


def _aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["variant"], []).append(row)
    out = []
    for name, group in groups.items():
        entry: dict[str, Any] = {"variant": name, "seeds": len(group)}
        for key in ("NDS", "mAP", "step_time"):
            values = [r[key] for r in group if r[key] is not None]
            entry[key] = statistics.fmean(values) if values else None
            entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(entry)
    return out


def _num(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _mean_std(entry: dict[str, Any], key: str) -> str:
    return "–" if entry[key] is None else f"{entry[key]:.4f} ± {entry[f'{key}_std']:.4f}"


def results_markdown(rows: list[dict[str, Any]], *, early_steps: int = 10,
                     paired: list[dict[str, Any]] | None = None) -> str:
    """Per-run rows, the mean ± standard deviation over seeds of each variant, the paired differences to the
    reference variant (`paired_comparison`), and the early loss terms."""
    lines = ["| variant | seed | NDS | mAP | step time (s) |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['variant']} | {r['seed']} | {_num(r['NDS'])} | {_num(r['mAP'])} | {r['step_time']:.3f} |"
              for r in rows]
    lines += ["", "| variant | seeds | NDS (mean ± std) | mAP (mean ± std) | step time (s) |",
              "|---|---:|---:|---:|---:|"]
    lines += [f"| {a['variant']} | {a['seeds']} | {_mean_std(a, 'NDS')} | {_mean_std(a, 'mAP')} | "
              f"{a['step_time']:.3f} |" for a in _aggregate(rows)]
    if paired:
        lines += ["", *paired_markdown(paired)]
    names = list(dict.fromkeys(n for r in rows for n in r.get("early_terms", {})))
    if names:
        short = [n.removeprefix("loss_") for n in names]
        lines += ["", f"Loss terms as trained (weighted), mean over steps 1-{early_steps}:", "",
                  f"| variant | seed | {' | '.join(short)} |", "|---|---:|" + "---:|" * len(names)]
        lines += [f"| {r['variant']} | {r['seed']} | "
                  + " | ".join(_num(r["early_terms"].get(n), 3) for n in names) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def compare_markdown(runs: list[str | Path], *, reference: str | None = None, draws: int = 1000,
                     split: str | None = None) -> str:
    """Evaluated runs side by side (`stxd-train compare`): headline metrics with each run's difference to the first
    run, AP per class and the commit each was scored with; with `reference`, then the paired differences of every
    variant to it (`paired_comparison`).

    Each column is a run folder holding `metrics.json` (from `stxd-train eval`; with `split`, the split's
    `eval/<split>/metrics.json`) and `config.yaml`, headed by the shortest name that tells the runs apart; the full
    paths follow the table. For the paired view, runs are grouped into variants by `run_variant` and paired by their
    `train.seed`; `reference` is a variant name or one of `runs`.
    """
    from pipelines.config import read_yaml
    from pipelines.matches import MATCHES_FILE

    columns = []
    rows = []
    for run in map(Path, runs):
        path = run / "metrics.json" if split is None else run / "eval" / split / "metrics.json"
        if not path.is_file():
            score = f"stxd-train eval --run {run}" + ("" if split is None else f" --split {split}")
            raise ConfigError(f"{path} is missing: score the run first ({score})")
        metrics = json.loads(path.read_text())
        config = read_yaml(run / "config.yaml")
        distill = config.get("distill") or {}
        terms = "+".join(t.upper() for t in distill.get("terms", [])) or "none"
        columns.append((terms, metrics))
        rows.append({"variant": run_variant(run), "seed": (config.get("train") or {}).get("seed"),
                     "NDS": metrics["NDS"], "mAP": metrics["mAP"], "run": str(run),
                     "matches": None if split is None else path.parent / MATCHES_FILE})
    splits = {m["split"] for _, m in columns}
    if len(splits) > 1:
        raise ConfigError(f"the runs were scored on different splits {sorted(splits)}; compare runs of one split "
                          "(`--split` reads each run's scores of that split)")
    names = short_names(runs)
    lines = [f"| {splits.pop()} | " + " | ".join(f"{n} ({terms})" for n, (terms, _) in zip(names, columns,
                                                                                            strict=True)) + " |",
             "|---|" + "---:|" * len(columns)]
    first = columns[0][1]
    for key in ("NDS", "mAP", "mATE", "mASE", "mAOE", "mAVE", "mAAE"):
        cells = [f"{first[key]:.4f}"] + [f"{m[key]:.4f} ({m[key] - first[key]:+.4f})" for _, m in columns[1:]]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    classes = list(dict.fromkeys(c for _, m in columns for c in m.get("per_class_AP", {})))
    for name in classes:
        lines.append(f"| AP {name} | " + " | ".join(_num(m.get("per_class_AP", {}).get(name), 3)
                                                    for _, m in columns) + " |")
    lines.append("| commit | " + " | ".join(_commit(m.get("source")) for _, m in columns) + " |")
    lines += ["", f"In brackets: the difference to {names[0]}. Runs: "
              + "; ".join(f"{n} = {run}" for n, run in zip(names, runs, strict=True)) + "."]
    if reference is not None:
        unseeded = [row["run"] for row in rows if not isinstance(row["seed"], int)]
        if unseeded:
            raise ConfigError(f"{unseeded[0]}/config.yaml has no integer train.seed, so its run cannot be paired "
                              "with a run of the same seed; compare it without --reference")
        variant = _reference_variant(reference, runs, rows)
        lines += ["", *paired_markdown(paired_comparison(rows, reference=variant, draws=draws))]
    return "\n".join(lines) + "\n"


def short_names(runs: list[str | Path]) -> list[str]:
    """The shortest trailing parts of the run paths that tell them apart: `bevformer` and `bevformer_stxd` for
    out/demo/bevformer and out/demo/bevformer_stxd, `plain/seed0` and `stxd/seed0` for a sweep's runs."""
    parts = [Path(r).resolve().parts for r in runs]
    for n in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-n:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(r) for r in runs]   # the same folder given twice


def run_variant(run: str | Path) -> str:
    """The variant a run folder belongs to in `stxd-train compare`: the parent folder's name for a folder named
    `seed<N>` (a sweep's `OUT/<variant>/seed<N>`), else the folder's own name."""
    path = Path(run).resolve()
    return path.parent.name if re.fullmatch(r"seed\d+", path.name) else path.name


def _reference_variant(reference: str, runs: list[str | Path], rows: list[dict[str, Any]]) -> str:
    variants = list(dict.fromkeys(row["variant"] for row in rows))
    if reference in variants:
        return reference
    for run in runs:
        if Path(run).resolve() == Path(reference).resolve():
            return run_variant(run)
    raise ConfigError(f"--reference {reference} is neither one of the variants {variants} nor one of the --run "
                      "folders; name the variant (a sweep's variant folder, or the run folder's name) or its run")


def _commit(source: dict[str, Any] | None) -> str:
    if not source or not source.get("commit"):
        return "–"
    return source["commit"][:10] + (" (uncommitted changes)" if source.get("dirty") else "")
