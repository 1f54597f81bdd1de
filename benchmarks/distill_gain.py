"""The distillation gain as a claim: camera students trained with and without distillation from the LiDAR teacher's
cache, over several seeds, scored on scenes that no choice was made on.

    .venv/bin/python benchmarks/distill_gain.py --parallel 2   # the claim's grid (`make distill-gain`)
    .venv/bin/python benchmarks/distill_gain.py --eval-split synth_val --students bevformer_synth \
        --variants plain,cd,cd_td,stxd                          # a screen: a product grid

One command runs every stage, each resumable, so that the same command continues where a kill left it:

1. the dataset (`stxd-data synth --reuse`; configs/data/synth_bench.yaml has disjoint synth_train, synth_val and
   synth_test scenes);
2. the LiDAR teacher (`stxd-train teacher`, resumed from its last checkpoint), scored on the eval split;
3. its cache over every split of the dataset (`stxd-cache extract`);
4. the grid: the blocks of `--grid` (default benchmarks/distill_gain_grid.yaml) in their order, or the product of
   `--students` x `--variants` x `--seeds`. Each block runs seed-major (every run of seed 0, then of seed 1, ...),
   so that a partial grid already pairs each variant with `plain` of the same seed. Per run: `stxd-train fit`,
   which resumes an unfinished run folder and skips a finished one as in `stxd-train sweep`, then `stxd-train eval
   --split EVAL_SPLIT`. `--parallel N` runs N at a time, each with cores / N torch threads.

After each run the results JSON is rewritten atomically, with a markdown table beside it: per student, each
variant's NDS and mAP (mean ± std over seeds) and its paired difference to `plain` of the same seed (mean and
paired-t 95 % interval); each step of the ablation (mse → cd, plain → cd → cd_td → stxd), paired the same way; and
plain against stxd per class and in the TP errors. A run already in the JSON at the current commit is skipped
without opening its folder.

Defaults are chosen on synth_val (`--eval-split synth_val`); synth_test is scored only with them frozen.
Run it from the repository root: the default config paths are relative to it.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import CancelledError, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import click
from common import cpu_model, resolve_device

from pipelines.errors import ConfigError, StxdError
from stxd_train.sweep import RunSpec

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEFAULT_WORK = "out/distill_gain"
#: The claim's grid, run when no --grid, --students, --variants or --seeds is given.
DEFAULT_GRID = "benchmarks/distill_gain_grid.yaml"
#: The product grid of --students x --variants x --seeds, for the options not given.
PRODUCT_DEFAULTS = {"students": "bevformer_synth,uvtr_synth", "variants": "plain,stxd", "seeds": "0,1,2"}
#: `distill.terms` of each variant.
VARIANTS = {"plain": [], "mse": ["mse"], "cd": ["cd"], "cd_td": ["cd", "td"], "stxd": ["cd", "td", "rd"]}
REFERENCE = "plain"
#: The protocol's own notes in each run folder: the commit, device and seconds of its fit and of each evaluation.
NOTES_FILE = "distill_gain.json"
TP_ERRORS = ("mATE", "mASE", "mAOE", "mAVE", "mAAE")
#: A class's TP errors in `metrics.json`'s per_class, and their column names.
CLASS_ERRORS = ("trans_err", "scale_err", "orient_err", "vel_err", "attr_err")
CLASS_ERROR_NAMES = ("ATE", "ASE", "AOE", "AVE", "AAE")
#: The variant that the per-class tables compare with `plain`.
COMPARED = "stxd"
#: The steps of the ablation, each paired by seed: what CD adds over MSE feature imitation, then each STXD term in turn.
LADDER = (("mse", "cd"), ("plain", "cd"), ("cd", "cd_td"), ("cd_td", "stxd"))
#: Teacher fields that a finished teacher may differ in without being another teacher.
TEACHER_BOOKKEEPING = frozenset({"train.checkpoint_every", "train.log_every", "data.num_workers"})
#: The benchmark teacher's schedule: 8 epochs of batch 2 over synth_bench's 600 synth_train keyframes (the demo
#: teacher's 650 steps are 8 epochs of the demo's 160). A step on synth_bench took a median of 2.1 s on one 2-core
#: machine and 0.96 s on another: 40 to 90 minutes.
TEACHER_STEPS = 2400
AGAIN = "run the same benchmarks/distill_gain.py command again: it resumes"


@dataclass(frozen=True, kw_only=True)
class Protocol:
    """Where the protocol reads and writes, and how its commands run."""

    work: Path
    results: Path
    eval_split: str
    device: str
    data_config: str
    teacher_config: str
    teacher_overrides: tuple[str, ...]
    cache_config: str
    workers: int

    @property
    def dataroot(self) -> Path:
        return self.work / "data"

    @property
    def teacher_run(self) -> Path:
        return self.work / "teacher"

    @property
    def cache(self) -> Path:
        return self.work / "cache.zarr"


@dataclass(frozen=True)
class Run:
    """One cell of the grid: its run folder and the `config.yaml` that its fit writes."""

    student: str
    variant: str
    seed: int
    steps: int
    spec: RunSpec
    config: dict[str, Any]

    @property
    def key(self) -> tuple[str, str, int, int]:
        return self.student, self.variant, self.seed, self.steps


@dataclass(frozen=True)
class Block:
    """Students x variants x seeds: one block of a grid."""

    students: tuple[str, ...]
    variants: tuple[str, ...]
    seeds: tuple[int, ...]

    def describe(self) -> str:
        return f"{','.join(self.students)} x {','.join(self.variants)} x seeds {','.join(map(str, self.seeds))}"


def load_grid(path: str | Path) -> tuple[list[Block], int | None]:
    """The blocks of a grid file, in its order, and its `steps` (None: each student config's)."""
    from pipelines.config import read_yaml

    path = Path(path)
    raw = read_yaml(path)
    expected = "`blocks`: a list of {students: [names], variants: [names], seeds: [integers]}"
    unknown = sorted(set(raw) - {"steps", "blocks"})
    if unknown or not isinstance(raw.get("blocks"), list) or not raw["blocks"]:
        found = f"the fields {', '.join(unknown)}" if unknown else f"`blocks` {raw.get('blocks')!r}"
        raise ConfigError(f"--grid {path}: found {found}; expected an optional `steps` (integer) and {expected}")
    steps = raw.get("steps")
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise ConfigError(f"--grid {path}: `steps` is {steps!r}; expected a positive integer, or no `steps` for each "
                          "student config's train.max_steps")
    blocks = []
    for i, block in enumerate(raw["blocks"]):
        where = f"--grid {path}: blocks[{i}]"
        if not isinstance(block, dict) or set(block) != {"students", "variants", "seeds"}:
            raise ConfigError(f"{where} is {block!r}; expected {expected}")
        for field in ("students", "variants"):
            if (not isinstance(block[field], list) or not block[field]
                    or not all(isinstance(v, str) for v in block[field])):
                raise ConfigError(f"{where}.{field} is {block[field]!r}; expected a non-empty list of names")
        if (not isinstance(block["seeds"], list) or not block["seeds"]
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in block["seeds"])):
            raise ConfigError(f"{where}.seeds is {block['seeds']!r}; expected a non-empty list of integers")
        blocks.append(Block(tuple(block["students"]), tuple(block["variants"]), tuple(block["seeds"])))
    return blocks, steps


def record_key(record: Mapping[str, Any]) -> tuple[str, str, int, int]:
    return record["student"], record["variant"], record["seed"], record["steps"]


def describe_device(device: str) -> str:
    """The GPU's name on CUDA, else the CPU model."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(resolve_device(device)))
    return cpu_model()


def _tool(name: str, *args: object) -> list[str]:
    return [str(BIN / name), *(str(a) for a in args)]


def _call(cmd: list[str], log: Path | None = None, threads: int | None = None) -> float:
    """Run one command, on the console or appended to `log`, with `threads` torch threads (None: torch's default);
    returns its wall-clock seconds."""
    start = time.perf_counter()
    env = None if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads),
                                        "MKL_NUM_THREADS": str(threads)}
    if log is None:
        print("$ " + shlex.join(cmd), flush=True)
        done = subprocess.run(cmd, env=env)
    else:
        with open(log, "a") as out:
            out.write(f"$ {shlex.join(cmd)}\n")
            out.flush()
            done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        where = f" (its output is in {log})" if log else ""
        raise StxdError(f"`{shlex.join(cmd)}` failed with exit code {done.returncode}{where}; fix the cause, then "
                        f"{AGAIN}")
    return time.perf_counter() - start


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    from stxd_train.engine import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2) + "\n", then=AGAIN)


def make_data(p: Protocol) -> None:
    _call(_tool("stxd-data", "synth", "--config", p.data_config, "--out", p.dataroot, "--reuse",
                "--workers", p.workers))


def split_frames(dataroot: Path, version: str, split: str) -> int:
    """Keyframes of a custom split, from the tables (without loading the devkit)."""
    scenes = {s["name"]: s["nbr_samples"] for s in json.loads((dataroot / version / "scene.json").read_text())}
    return sum(scenes[name] for name in json.loads((dataroot / version / "splits.json").read_text())[split])


def train_teacher(p: Protocol, version: str) -> dict[str, Any]:
    """Train the teacher unless `teacher.pt` is there (resuming from its last checkpoint), score it on the eval
    split once; returns its record."""
    from pipelines.config import read_yaml, to_dict
    from stxd_cache.teacher.checkpoint import sha256_file
    from stxd_train.engine import RUN_KEYS, config_changes, load_run_config
    from stxd_train.engine.checkpoint import LAST_CHECKPOINT, checkpoint_dir
    from stxd_train.teacher import TeacherRunConfig

    cfg = load_run_config(TeacherRunConfig, p.teacher_config, p.teacher_overrides, kind="teacher")
    run = p.teacher_run
    weights = run / "teacher.pt"
    if weights.is_file():
        saved = {k: v for k, v in read_yaml(run / "config.yaml").items() if k not in RUN_KEYS}
        changed = config_changes(saved, to_dict(cfg), allowed=TEACHER_BOOKKEEPING)
        if changed:
            raise StxdError(f"{run} holds a teacher trained with another config than {p.teacher_config} and "
                            f"--teacher-set give ({'; '.join(changed[:6])}); pass the same --teacher-set, or another "
                            "--work to train a new teacher (its cache and students depend on it)")
    else:
        resume = ["--resume"] if (checkpoint_dir(run) / LAST_CHECKPOINT).is_file() else []
        _call(_tool("stxd-train", "teacher", "--config", p.teacher_config, "--dataroot", p.dataroot, "--version",
                    version, "--out", run, "--device", p.device, "--no-eval", *resume,
                    *(a for o in p.teacher_overrides for a in ("--set", o))))
    metrics_path = run / "eval" / p.eval_split / "metrics.json"
    if not metrics_path.is_file() or metrics_path.stat().st_mtime_ns < weights.stat().st_mtime_ns:
        _call(_tool("stxd-train", "eval", "--run", run, "--split", p.eval_split, "--device", p.device))
    metrics = json.loads(metrics_path.read_text())
    return {"run": str(run), "name": cfg.model.name, "steps": cfg.train.max_steps, "sha256": sha256_file(weights),
            "nds": metrics["NDS"], "map": metrics["mAP"], "per_class_ap": metrics["per_class_AP"]}


def check_same_teacher(path: Path, recorded: Mapping[str, Any] | None, current: Mapping[str, Any]) -> None:
    """Refuse to add runs to a results file whose runs were distilled from another teacher: one file is one grid
    against one teacher. Teachers are compared by checksum, or by their scores where the file predates checksums."""
    if not recorded:
        return
    def identity(teacher: Mapping[str, Any]) -> str:
        return (f"sha256 {teacher['sha256']}" if "sha256" in recorded
                else f"NDS {teacher['nds']!r} and mAP {teacher['map']!r} on the split")

    found, expected = identity(current), identity(recorded)
    if found != expected:
        raise ConfigError(f"{path} holds runs distilled from teacher {recorded.get('run')} ({expected}), but the "
                          f"teacher in {current['run']} has {found}: a teacher trained again is another teacher. "
                          "Pass another --results to start a grid against this teacher, or put the recorded "
                          "teacher back in place")


def extract_cache(p: Protocol, version: str, splits: Sequence[str]) -> None:
    from stxd_cache.store import is_complete

    if not is_complete(p.cache):
        _call(_tool("stxd-cache", "extract", "--dataroot", p.dataroot, "--version", version, "--splits",
                    ",".join(splits), "--teacher", p.teacher_run / "teacher.pt", "--config", p.cache_config,
                    "--out", p.cache, "--device", p.device))


def plan(p: Protocol, *, version: str, blocks: Sequence[Block], steps: int | None, overrides: Sequence[str],
         student_configs: Path) -> list[Run]:
    """Every run: the blocks in their order, each seed-major. Each run's config is loaded here, so that a bad
    override fails before any stage."""
    from stxd_train.sweep import run_config_of

    unknown = sorted({v for b in blocks for v in b.variants} - set(VARIANTS))
    if unknown:
        raise ConfigError(f"variants: unknown {', '.join(unknown)}; expected some of {', '.join(VARIANTS)}")
    for student in dict.fromkeys(s for b in blocks for s in b.students):
        if not (student_configs / f"{student}.yaml").is_file():
            known = sorted(f.stem for f in student_configs.glob("*.yaml"))
            raise ConfigError(f"students: {student_configs / f'{student}.yaml'} does not exist; the student "
                              f"configs in {student_configs} are {', '.join(known) or 'none'}")
    runs: list[Run] = []
    cells = [(b, seed, student, variant) for b in blocks for seed in b.seeds for student in b.students
             for variant in b.variants]
    for block, seed, student, variant in cells:
        sets = (*overrides, *([f"train.max_steps={steps}"] if steps else []),
                f"distill.terms=[{','.join(VARIANTS[variant])}]", f"train.seed={seed}")
        spec = RunSpec(variant=variant, seed=seed, config=str(student_configs / f"{student}.yaml"),
                       overrides=sets, out=p.work)
        config = run_config_of(spec, dataroot=str(p.dataroot), version=version, cache=str(p.cache))
        n = config["train"]["max_steps"]
        spec = replace(spec, out=p.work / "runs" / student / f"steps{n}" / variant / f"seed{seed}")
        run = Run(student, variant, seed, n, spec, config)
        if any(r.key == run.key for r in runs):
            raise ConfigError(f"{student} {variant} seed {seed} is in more than one block of the grid "
                              f"(block {block.describe()}); list each run once")
        runs.append(run)
    return runs


def run_one(p: Protocol, run: Run, *, device_name: str, source: Mapping[str, Any],
            threads: int | None = None) -> dict[str, Any]:
    """Fit (unless its folder holds the finished run) and score one run, each command with `threads` torch threads
    (None: torch's default); returns its record."""
    from stxd_train.fit import STUDENT_FILE
    from stxd_train.sweep import training_to_do

    out = run.spec.out
    notes_path, log = out / NOTES_FILE, out / "distill_gain.log"
    notes = _read_json(notes_path)
    training = training_to_do(run.spec, run.config)
    if training is not None:
        out.mkdir(parents=True, exist_ok=True)
        resume = ["--resume"] if training == "resume" else []
        seconds = _call(_tool("stxd-train", "fit", "--config", run.spec.config, "--dataroot", p.dataroot,
                              "--version", run.config["version"], "--cache", p.cache, "--out", out,
                              "--device", p.device, *resume, *(a for o in run.spec.overrides for a in ("--set", o))),
                        log, threads)
        before = (notes.get("fit") or {}).get("seconds", 0.0) if resume else 0.0
        notes = {"fit": {"commit": source["commit"], "dirty": source["dirty"], "device": device_name,
                         "threads": threads, "seconds": before + seconds}, "eval": {}}
        _write_json(notes_path, notes)
    metrics_path = out / "eval" / p.eval_split / "metrics.json"
    scored = notes.get("eval", {}).get(p.eval_split)
    if (scored is None or not metrics_path.is_file()
            or metrics_path.stat().st_mtime_ns < (out / STUDENT_FILE).stat().st_mtime_ns):
        seconds = _call(_tool("stxd-train", "eval", "--run", out, "--split", p.eval_split, "--device", p.device), log,
                        threads)
        notes.setdefault("eval", {})[p.eval_split] = {"commit": source["commit"], "device": device_name,
                                                     "seconds": seconds}
        _write_json(notes_path, notes)
    return run_record(run, p.eval_split, notes)


def run_record(run: Run, split: str, notes: Mapping[str, Any]) -> dict[str, Any]:
    """The results entry of a scored run, from its folder: the scores of `eval/<split>/metrics.json` and notes."""
    out = run.spec.out
    metrics = json.loads((out / "eval" / split / "metrics.json").read_text())
    fit, scored = notes.get("fit") or {}, notes["eval"][split]
    train_seconds = out / "train_seconds.txt"
    return {
        "student": run.student, "variant": run.variant, "seed": run.seed, "steps": run.steps,
        "commit": fit.get("commit"), "nds": metrics["NDS"], "map": metrics["mAP"],
        "device": fit.get("device", scored["device"]), "threads": fit.get("threads"),
        "wall_seconds": fit.get("seconds", 0.0) + scored["seconds"],
        "train_seconds": float(train_seconds.read_text()) if train_seconds.is_file() else None,
        "dirty": fit.get("dirty"), "eval_commit": scored["commit"], "eval_frames": metrics.get("samples"),
        "tp_errors": {k: metrics[k] for k in TP_ERRORS}, "per_class_ap": metrics["per_class_AP"],
        "per_class": metrics.get("per_class"), "distill_terms": VARIANTS[run.variant], "run": str(out),
    }


def _finite(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else value


def by_group(records: Sequence[Mapping[str, Any]]) -> dict[tuple[str, int], dict[str, dict[int, Mapping[str, Any]]]]:
    """Records as {(student, steps): {variant: {seed: record}}}, in their order."""
    groups: dict[tuple[str, int], dict[str, dict[int, Mapping[str, Any]]]] = {}
    for r in records:
        groups.setdefault((r["student"], r["steps"]), {}).setdefault(r["variant"], {})[r["seed"]] = r
    return groups


def summarize(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per student and schedule, each variant's NDS and mAP over seeds, and its paired difference to `plain` of the
    same seed (`stxd_train.stats.paired_summary`: mean, std, n, paired-t 95 % interval)."""
    from stxd_train.stats import paired_summary

    rows = []
    for (student, steps), by_variant in by_group(records).items():
        reference = by_variant.get(REFERENCE)
        for variant in sorted(by_variant, key=list(VARIANTS).index):
            seeds = by_variant[variant]
            row: dict[str, Any] = {"student": student, "steps": steps, "variant": variant, "seeds": sorted(seeds)}
            for metric in ("nds", "map"):
                values = [seeds[s][metric] for s in sorted(seeds)]
                row[metric] = statistics.fmean(values)
                row[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else None
                if reference is not None and variant != REFERENCE:
                    paired = paired_summary({s: r[metric] for s, r in reference.items()},
                                            {s: r[metric] for s, r in seeds.items()})
                    row[f"delta_{metric}"] = {
                        "differences": {str(s): d for s, d in paired["differences"].items()}, "n": paired["n"],
                        **{k: _finite(paired[k]) for k in ("mean", "std", "ci_low", "ci_high")}}
            rows.append(row)
    return rows


def _mean_std(row: Mapping[str, Any], metric: str) -> str:
    std = row[f"{metric}_std"]
    return f"{row[metric]:.4f}" + ("" if std is None else f" ± {std:.4f}")


def _delta(row: Mapping[str, Any], metric: str) -> str:
    delta = row.get(f"delta_{metric}")
    if delta is None or delta["mean"] is None:
        return "–"
    interval = "" if delta["ci_low"] is None else f" [{delta['ci_low']:+.4f}, {delta['ci_high']:+.4f}]"
    return f"{delta['mean']:+.4f}{interval} (n = {delta['n']})"


def markdown(results: Mapping[str, Any]) -> str:
    """The results as markdown: per student, mean ± std over seeds and the paired difference to plain."""
    split, schedule = results["eval_split"], results["schedule"]
    lines = [f"# Distillation gain on {split} ({results.get('eval_frames')} keyframes)", "",
             f"{len(results['runs'])} of {schedule['runs']} runs recorded; commit {results['commit']}"
             f"{' (dirty)' if results['dirty'] else ''}; device {results['device']}. Differences are paired by seed "
             f"(variant minus {REFERENCE}), with the paired-t 95 % interval."]
    teacher = results.get("teacher")
    if teacher:
        checksum = f", sha256 `{teacher['sha256'][:12]}`" if "sha256" in teacher else ""
        lines += ["", f"Teacher `{teacher['name']}` ({teacher['steps']} steps{checksum}) on {split}: NDS "
                      f"{teacher['nds']:.4f}, mAP {teacher['map']:.4f}."]
    runs = results["runs"]
    if runs:
        commits: dict[str, int] = {}
        for r in runs:
            commits[str(r.get("commit"))[:7]] = commits.get(str(r.get("commit"))[:7], 0) + 1
        hours = sum(r.get("wall_seconds") or 0.0 for r in runs) / 3600
        lines += ["", f"Runs by the commit of their fit: {', '.join(f'`{c}` {n}' for c, n in commits.items())}. Their "
                      f"fits and scorings took {hours:.1f} h of wall clock summed over the runs "
                      f"({schedule.get('parallel', 1)} at a time)."]
    summary = results["summary"]
    for student, steps in dict.fromkeys((r["student"], r["steps"]) for r in summary):
        rows = [r for r in summary if (r["student"], r["steps"]) == (student, steps)]
        lines += ["", f"## {student}, {steps} steps", "",
                  f"| variant | seeds | NDS | mAP | ΔNDS vs {REFERENCE} | ΔmAP vs {REFERENCE} |",
                  "|---|---|---:|---:|---:|---:|"]
        lines += [f"| {r['variant']} | {','.join(map(str, r['seeds']))} | {_mean_std(r, 'nds')} | "
                  f"{_mean_std(r, 'map')} | {_delta(r, 'nds')} | {_delta(r, 'map')} |" for r in rows]
    ablation = ladder(results["runs"])
    if ablation:
        lines += ["", "## The ablation, step by step", "",
                  "Each step's difference is paired by seed over the seeds that both of its variants ran, with the "
                  "paired-t 95 % interval.", *ablation]
    detail = details(results["runs"])
    if detail:
        lines += ["", f"## Per class and TP errors: {REFERENCE} against {COMPARED}", "",
                  "Means over the seeds that both ran; Δ is paired by seed, with the paired-t 95 % interval. "
                  "Per-class TP errors: mean of " + f"{REFERENCE} → mean of {COMPARED}.", *detail]
    return "\n".join(lines) + "\n"


def _paired_cell(reference: Mapping[int, float | None], variant: Mapping[int, float | None],
                 digits: int = 3) -> tuple[str, str, str]:
    """(reference mean, variant mean, paired difference [95 % interval]) over the seeds where both have a value."""
    from stxd_train.stats import paired_summary

    seeds = sorted(s for s in reference.keys() & variant.keys() if reference[s] is not None and variant[s] is not None)
    if not seeds:
        return "–", "–", "–"
    ref = {s: float(reference[s]) for s in seeds}   # type: ignore[arg-type]
    var = {s: float(variant[s]) for s in seeds}   # type: ignore[arg-type]
    paired = paired_summary(ref, var)
    d = digits
    interval = "" if math.isnan(paired["ci_low"]) else f" [{paired['ci_low']:+.{d}f}, {paired['ci_high']:+.{d}f}]"
    missing = "" if len(seeds) == len(reference.keys() & variant.keys()) else f" (n = {len(seeds)})"
    return (f"{statistics.fmean(ref.values()):.{d}f}", f"{statistics.fmean(var.values()):.{d}f}",
            f"{paired['mean']:+.{d}f}{interval}{missing}")


def ladder(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Markdown lines: per student, each step of `LADDER` whose two variants share seeds, as the paired difference in
    NDS and mAP (mean [95 % interval]) over those seeds."""
    lines: list[str] = []
    for (student, steps), by_variant in by_group(runs).items():
        rows = []
        for before, after in LADDER:
            a, b = by_variant.get(before, {}), by_variant.get(after, {})
            seeds = sorted(a.keys() & b.keys())
            if seeds:
                cells = [_paired_cell({s: a[s][m] for s in seeds}, {s: b[s][m] for s in seeds}, digits=4)[2]
                         for m in ("nds", "map")]
                rows.append(f"| {before} → {after} | {','.join(map(str, seeds))} | {' | '.join(cells)} |")
        if rows:
            lines += ["", f"### {student}, {steps} steps", "", "| step | seeds | ΔNDS | ΔmAP |", "|---|---|---:|---:|",
                      *rows]
    return lines


def details(runs: Sequence[Mapping[str, Any]], variant: str = COMPARED) -> list[str]:
    """Markdown lines: per student, `variant` against `plain` over their paired seeds, per class (mean AP and each TP
    error) and in the mean TP errors; means over those seeds, differences paired by seed with the 95 % interval."""
    lines: list[str] = []
    for (student, steps), by_variant in by_group(runs).items():
        ref, var = by_variant.get(REFERENCE, {}), by_variant.get(variant, {})
        seeds = sorted(ref.keys() & var.keys())
        if not seeds:
            continue
        ref, var = {s: ref[s] for s in seeds}, {s: var[s] for s in seeds}
        lines += ["", f"### {student}, {steps} steps: {REFERENCE} against {variant}, seeds {','.join(map(str, seeds))}",
                  "", f"| class | AP {REFERENCE} | AP {variant} | ΔAP | " +
                  " | ".join(f"{e} {REFERENCE} → {variant}" for e in CLASS_ERROR_NAMES) + " |",
                  "|---|---:|---:|---:|" + "---:|" * len(CLASS_ERROR_NAMES)]
        classes = list(next(iter(ref.values()))["per_class_ap"])
        for name in classes:
            ap = _paired_cell({s: r["per_class_ap"][name] for s, r in ref.items()},
                              {s: r["per_class_ap"][name] for s, r in var.items()})
            errors = []
            for key in CLASS_ERRORS:
                a, b, _ = _paired_cell({s: (r.get("per_class") or {}).get(name, {}).get(key) for s, r in ref.items()},
                                       {s: (r.get("per_class") or {}).get(name, {}).get(key) for s, r in var.items()})
                errors.append(f"{a} → {b}")
            lines.append(f"| {name} | {' | '.join(ap)} | {' | '.join(errors)} |")
        lines += ["", f"| TP error (lower is better) | {REFERENCE} | {variant} | Δ |", "|---|---:|---:|---:|"]
        for key in TP_ERRORS:
            cells = _paired_cell({s: r["tp_errors"][key] for s, r in ref.items()},
                                 {s: r["tp_errors"][key] for s, r in var.items()})
            lines.append(f"| {key} | {' | '.join(cells)} |")
    return lines


def write_results(path: Path, results: dict[str, Any]) -> str:
    """Refresh the summary, then write the JSON and the markdown beside it, each atomically; returns the markdown."""
    from stxd_train.engine import atomic_write_text

    results["summary"] = summarize(results["runs"])
    atomic_write_text(path, json.dumps(results, indent=2) + "\n", then=AGAIN)
    text = markdown(results)
    atomic_write_text(path.with_suffix(".md"), text, then=AGAIN)
    return text


def rewrite_markdown(path: Path) -> str:
    """Rewrite the markdown beside a results JSON from its runs (the JSON is left as it is); returns it."""
    from stxd_train.engine import atomic_write_text

    results = _read_json(path)
    results["summary"] = summarize(results["runs"])
    text = markdown(results)
    atomic_write_text(path.with_suffix(".md"), text, then="run the same --report command again")
    return text


def load_results(path: Path, eval_split: str) -> dict[str, Any]:
    results = _read_json(path)
    if results and results.get("eval_split") != eval_split:
        raise ConfigError(f"{path} holds runs scored on {results.get('eval_split')}, not on --eval-split "
                          f"{eval_split}; pass another --results for this split")
    return results or {"eval_split": eval_split, "runs": []}


def run_protocol(p: Protocol, *, blocks: Sequence[Block], steps: int | None, overrides: Sequence[str],
                 student_configs: Path, parallel: int = 1) -> dict[str, Any]:
    """Every stage, then the grid's runs, `parallel` at a time (each with cores / parallel torch threads)."""
    from pipelines.config import load_config
    from pipelines.evaluation import source_revision
    from pipelines.synth import SynthConfig

    if parallel < 1:
        raise ConfigError(f"--parallel is {parallel}; expected at least 1 run at a time")
    data = load_config(SynthConfig, p.data_config)
    if p.eval_split not in data.splits:
        raise ConfigError(f"{p.data_config} writes the splits {', '.join(data.splits)}, not --eval-split "
                          f"{p.eval_split}; give it a test_fraction (configs/data/synth_bench.yaml has one), or pass "
                          "--eval-split synth_val")
    runs = plan(p, version=data.version, blocks=blocks, steps=steps, overrides=overrides,
                student_configs=student_configs)
    source, device_name = source_revision(), describe_device(p.device)
    results = load_results(p.results, p.eval_split)
    recorded = {record_key(r): r for r in results["runs"]}
    pending = [run for run in runs if run.key not in recorded or recorded[run.key]["commit"] != source["commit"]]
    per_student = {s: next(r.steps for r in runs if r.student == s) for s in dict.fromkeys(r.student for r in runs)}
    total = sum(r.steps for r in runs)
    threads = max(1, (os.cpu_count() or 1) // parallel) if parallel > 1 else None
    schedule = {"order": "blocks in order, each seed-major", "blocks": [b.describe() for b in blocks],
                "runs": len(runs), "steps_per_run": per_student, "student_steps": total, "parallel": parallel}
    results.update(schedule=schedule, device=device_name, commit=source["commit"], dirty=source["dirty"],
                   work=str(p.work))
    print(f"schedule: {len(runs)} runs in {len(blocks)} block(s) ({'; '.join(b.describe() for b in blocks)}; each "
          f"seed-major) = {total} student steps ({', '.join(f'{s} {n}' for s, n in per_student.items())} steps per "
          f"run), each scored on {p.eval_split}; {len(pending)} to do, {len(runs) - len(pending)} already recorded "
          f"at this commit; {parallel} at a time{f' with {threads} torch thread(s) each' if threads else ''}; device "
          f"{p.device} ({device_name})", flush=True)
    if pending:
        make_data(p)
        results["eval_frames"] = split_frames(p.dataroot, data.version, p.eval_split)
        teacher = train_teacher(p, data.version)
        check_same_teacher(p.results, results.get("teacher") if results["runs"] else None, teacher)
        results["teacher"] = teacher
        extract_cache(p, data.version, list(data.splits))
    started = time.perf_counter()
    order = {r.key: i for i, r in enumerate(runs)}   # the JSON keeps the grid's order, whichever run ends first

    def one(i: int, run: Run) -> dict[str, Any]:
        # One write per line: print() writes the text and its newline separately, which runs in parallel interleave.
        sys.stdout.write(f"[{i}/{len(pending)}] {run.student} {run.variant} seed {run.seed}, {run.steps} steps: "
                         f"{run.spec.out}\n")
        sys.stdout.flush()
        return run_one(p, run, device_name=device_name, source=source, threads=threads)

    failures: list[BaseException] = []
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = {pool.submit(one, i, run): run for i, run in enumerate(pending, 1)}
        for done, future in enumerate(as_completed(futures), 1):
            run = futures[future]
            try:
                record = future.result()
            except CancelledError:
                continue
            except Exception as exc:   # the runs in flight still finish and are recorded; none starts after
                failures.append(exc)
                for other in futures:
                    other.cancel()
                continue
            results["runs"] = sorted([r for r in results["runs"] if record_key(r) != run.key] + [record],
                                     key=lambda r: order.get(record_key(r), len(order)))
            write_results(p.results, results)
            left = (time.perf_counter() - started) / done * (len(pending) - done)
            print(f"    {run.student} {run.variant} seed {run.seed}: NDS {record['nds']:.4f}  mAP "
                  f"{record['map']:.4f}  ({record['wall_seconds']:.0f} s; about {left / 60:.0f} min left at this "
                  "pace)", flush=True)
    if failures:
        raise failures[0]
    print(write_results(p.results, results))
    return results


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in _names(text)]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None


@click.command()
@click.option("--work", default=DEFAULT_WORK, show_default=True, help="Folder of the dataset, teacher, cache and runs.")
@click.option("--results", type=click.Path(dir_okay=False),
              help="Results JSON (a .md beside it) [default: benchmarks/results/distill_gain.json, or "
                   "distill_gain_<split>.json for another --eval-split].")
@click.option("--eval-split", default="synth_test", show_default=True,
              help="Split every run is scored on: synth_val to screen, synth_test for the claim.")
@click.option("--grid", help=f"YAML of the grid's blocks (students x variants x seeds each) and steps [default: "
                           f"{DEFAULT_GRID}, unless --students, --variants or --seeds give a product grid].")
@click.option("--students", help=f"Student config names [default: {PRODUCT_DEFAULTS['students']}].")
@click.option("--variants", help=f"Some of {', '.join(VARIANTS)} [default: {PRODUCT_DEFAULTS['variants']}].")
@click.option("--seeds", help=f"train.seed of each run [default: {PRODUCT_DEFAULTS['seeds']}].")
@click.option("--steps", type=int, help="train.max_steps of every run [default: the grid file's, else each student "
                                        "config's].")
@click.option("--report", is_flag=True,
              help="Only rewrite the markdown beside the results JSON from the runs it holds, and print it.")
@click.option("--parallel", type=int, default=1, show_default=True,
              help="Runs at a time, each with cores / parallel torch threads (on 2 CPU cores, 2 runs of 1 thread "
                   "fit 1.37x the steps per hour of 1 run of 2 threads).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:i], passed to every command.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Student config override (repeatable).")
@click.option("--teacher-steps", type=int, default=TEACHER_STEPS, show_default=True,
              help="train.max_steps of the teacher (0: the teacher config's).")
@click.option("--teacher-set", "teacher_overrides", multiple=True, metavar="KEY=VALUE",
              help="Teacher config override, e.g. train.max_steps=100 (repeatable).")
@click.option("--data-config", default="configs/data/synth_bench.yaml", show_default=True)
@click.option("--teacher-config", default="configs/teacher/centerpoint_synth.yaml", show_default=True)
@click.option("--cache-config", default="configs/cache/synth.yaml", show_default=True)
@click.option("--student-configs", default="configs/student", show_default=True,
              help="Folder of the students' <name>.yaml.")
@click.option("--workers", type=int, default=os.cpu_count() or 1, show_default="all cores",
              help="Processes generating the dataset.")
def main(work: str, results: str | None, eval_split: str, grid: str | None, students: str | None,
         variants: str | None, seeds: str | None, steps: int | None, report: bool, parallel: int, device: str,
         overrides: tuple[str, ...], teacher_steps: int, teacher_overrides: tuple[str, ...], data_config: str,
         teacher_config: str, cache_config: str, student_configs: str, workers: int) -> None:
    """Train and score a grid of students x variants x seeds against one teacher cache; resumable."""
    from pipelines.paths import check_output_path

    try:
        suffix = "" if eval_split == "synth_test" else f"_{eval_split}"
        results_path = Path(results or REPO / "benchmarks" / "results" / f"distill_gain{suffix}.json")
        if report:
            if not results_path.is_file():
                raise ConfigError(f"--report: {results_path} does not exist; run the grid first, or pass the "
                                  "--results or --eval-split of the runs to report")
            print(rewrite_markdown(results_path), end="")
            return
        product = {"students": students, "variants": variants, "seeds": seeds}
        given = [f"--{k}" for k, v in product.items() if v is not None]
        if grid is not None and given:
            raise ConfigError(f"--grid {grid} and {', '.join(given)} both name the runs; give one of them")
        if given:
            product = {k: PRODUCT_DEFAULTS[k] if v is None else v for k, v in product.items()}
            blocks = [Block(tuple(_names(product["students"])), tuple(_names(product["variants"])),
                            tuple(_seeds(product["seeds"])))]
            grid_steps = None
        else:
            blocks, grid_steps = load_grid(grid or REPO / DEFAULT_GRID)
        if work == DEFAULT_WORK:
            Path(work).parent.mkdir(parents=True, exist_ok=True)
        results_path.parent.mkdir(parents=True, exist_ok=True)
        protocol = Protocol(work=check_output_path(work, option="--work"), results=results_path,
                            eval_split=eval_split, device=device, data_config=data_config,
                            teacher_config=teacher_config,
                            teacher_overrides=(*([f"train.max_steps={teacher_steps}"] if teacher_steps else []),
                                               *teacher_overrides),
                            cache_config=cache_config, workers=workers)
        protocol.work.mkdir(exist_ok=True)
        run_protocol(protocol, blocks=blocks, steps=steps or grid_steps, overrides=overrides,
                     student_configs=Path(student_configs), parallel=parallel)
    except StxdError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
