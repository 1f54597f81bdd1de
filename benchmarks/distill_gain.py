"""The distillation gain as a claim: camera students trained with and without distillation from the LiDAR teacher's
cache, over several seeds, scored on scenes that no choice was made on.

    .venv/bin/python benchmarks/distill_gain.py                      # the protocol (`make distill-gain`)
    .venv/bin/python benchmarks/distill_gain.py --eval-split synth_val --variants plain,cd,cd_td,stxd   # a screen

One command runs every stage, each resumable, so that the same command continues where a kill left it:

1. the dataset (`stxd-data synth --reuse`; configs/data/synth_bench.yaml has disjoint synth_train, synth_val and
   synth_test scenes);
2. the LiDAR teacher (`stxd-train teacher`, resumed from its last checkpoint), scored on the eval split;
3. its cache over every split of the dataset (`stxd-cache extract`);
4. the grid students x variants x seeds, seed-major (every run of seed 0, then of seed 1, ...) so that a partial
   grid already pairs each variant with `plain` of the same seed: per run `stxd-train fit`, which is skipped for a
   finished run folder as in `stxd-train sweep`, then `stxd-train eval --split EVAL_SPLIT`.

After each run the results JSON is rewritten atomically, with a markdown table beside it: per student, each
variant's NDS and mAP (mean ± std over seeds) and its paired difference to `plain` of the same seed (mean and
paired-t 95 % interval). A run already in the JSON at the current commit is skipped without opening its folder.

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
#: `distill.terms` of each variant.
VARIANTS = {"plain": [], "mse": ["mse"], "cd": ["cd"], "cd_td": ["cd", "td"], "stxd": ["cd", "td", "rd"]}
REFERENCE = "plain"
#: The protocol's own notes in each run folder: the commit, device and seconds of its fit and of each evaluation.
NOTES_FILE = "distill_gain.json"
TP_ERRORS = ("mATE", "mASE", "mAOE", "mAVE", "mAAE")
#: Teacher fields that a finished teacher may differ in without being another teacher.
TEACHER_BOOKKEEPING = frozenset({"train.checkpoint_every", "train.log_every", "data.num_workers"})
#: The benchmark teacher's schedule: 8 epochs of batch 2 over synth_bench's 600 synth_train keyframes (the demo
#: teacher's 650 steps are 8 epochs of the demo's 160). A step on synth_bench took 2.2 s (median of the logged
#: steps) on the 2-core development machine, so about 90 minutes.
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


def _call(cmd: list[str], log: Path | None = None) -> float:
    """Run one command, on the console or appended to `log`; returns its wall-clock seconds."""
    start = time.perf_counter()
    if log is None:
        print("$ " + shlex.join(cmd), flush=True)
        done = subprocess.run(cmd)
    else:
        with open(log, "a") as out:
            out.write(f"$ {shlex.join(cmd)}\n")
            out.flush()
            done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT)
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
    return {"run": str(run), "name": cfg.model.name, "steps": cfg.train.max_steps, "nds": metrics["NDS"],
            "map": metrics["mAP"], "per_class_ap": metrics["per_class_AP"]}


def extract_cache(p: Protocol, version: str, splits: Sequence[str]) -> None:
    from stxd_cache.store import is_complete

    if not is_complete(p.cache):
        _call(_tool("stxd-cache", "extract", "--dataroot", p.dataroot, "--version", version, "--splits",
                    ",".join(splits), "--teacher", p.teacher_run / "teacher.pt", "--config", p.cache_config,
                    "--out", p.cache, "--device", p.device))


def plan(p: Protocol, *, version: str, students: Sequence[str], variants: Sequence[str], seeds: Sequence[int],
         steps: int | None, overrides: Sequence[str], student_configs: Path) -> list[Run]:
    """Every run, seed-major; each run's config is loaded here, so that a bad override fails before any stage."""
    from stxd_train.sweep import run_config_of

    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"--variants: unknown {', '.join(unknown)}; expected some of {', '.join(VARIANTS)}")
    for student in students:
        if not (student_configs / f"{student}.yaml").is_file():
            known = sorted(f.stem for f in student_configs.glob("*.yaml"))
            raise ConfigError(f"--students: {student_configs / f'{student}.yaml'} does not exist; the student "
                              f"configs in {student_configs} are {', '.join(known) or 'none'}")
    runs = []
    for seed in seeds:
        for student in students:
            for variant in variants:
                sets = (*overrides, *([f"train.max_steps={steps}"] if steps else []),
                        f"distill.terms=[{','.join(VARIANTS[variant])}]", f"train.seed={seed}")
                spec = RunSpec(variant=variant, seed=seed, config=str(student_configs / f"{student}.yaml"),
                               overrides=sets, out=p.work)
                config = run_config_of(spec, dataroot=str(p.dataroot), version=version, cache=str(p.cache))
                n = config["train"]["max_steps"]
                spec = replace(spec, out=p.work / "runs" / student / f"steps{n}" / variant / f"seed{seed}")
                runs.append(Run(student, variant, seed, n, spec, config))
    return runs


def run_one(p: Protocol, run: Run, *, device_name: str, source: Mapping[str, Any]) -> dict[str, Any]:
    """Fit (unless its folder holds the finished run) and score one run; returns its record."""
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
                        log)
        before = (notes.get("fit") or {}).get("seconds", 0.0) if resume else 0.0
        notes = {"fit": {"commit": source["commit"], "dirty": source["dirty"], "device": device_name,
                         "seconds": before + seconds}, "eval": {}}
        _write_json(notes_path, notes)
    metrics_path = out / "eval" / p.eval_split / "metrics.json"
    scored = notes.get("eval", {}).get(p.eval_split)
    if (scored is None or not metrics_path.is_file()
            or metrics_path.stat().st_mtime_ns < (out / STUDENT_FILE).stat().st_mtime_ns):
        seconds = _call(_tool("stxd-train", "eval", "--run", out, "--split", p.eval_split, "--device", p.device), log)
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
        "device": fit.get("device", scored["device"]),
        "wall_seconds": fit.get("seconds", 0.0) + scored["seconds"],
        "train_seconds": float(train_seconds.read_text()) if train_seconds.is_file() else None,
        "dirty": fit.get("dirty"), "eval_commit": scored["commit"], "eval_frames": metrics.get("samples"),
        "tp_errors": {k: metrics[k] for k in TP_ERRORS}, "per_class_ap": metrics["per_class_AP"],
        "per_class": metrics.get("per_class"), "distill_terms": VARIANTS[run.variant], "run": str(out),
    }


def _finite(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else value


def summarize(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per student and schedule, each variant's NDS and mAP over seeds, and its paired difference to `plain` of the
    same seed (`stxd_train.stats.paired_summary`: mean, std, n, paired-t 95 % interval)."""
    from stxd_train.stats import paired_summary

    groups: dict[tuple[str, int], dict[str, dict[int, Mapping[str, Any]]]] = {}
    for r in records:
        groups.setdefault((r["student"], r["steps"]), {}).setdefault(r["variant"], {})[r["seed"]] = r
    rows = []
    for (student, steps), by_variant in groups.items():
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
        lines += ["", f"Teacher `{teacher['name']}` ({teacher['steps']} steps) on {split}: NDS {teacher['nds']:.4f}, "
                      f"mAP {teacher['map']:.4f}."]
    summary = results["summary"]
    for student, steps in dict.fromkeys((r["student"], r["steps"]) for r in summary):
        rows = [r for r in summary if (r["student"], r["steps"]) == (student, steps)]
        lines += ["", f"## {student}, {steps} steps", "",
                  f"| variant | seeds | NDS | mAP | ΔNDS vs {REFERENCE} | ΔmAP vs {REFERENCE} |",
                  "|---|---|---:|---:|---:|---:|"]
        lines += [f"| {r['variant']} | {','.join(map(str, r['seeds']))} | {_mean_std(r, 'nds')} | "
                  f"{_mean_std(r, 'map')} | {_delta(r, 'nds')} | {_delta(r, 'map')} |" for r in rows]
    return "\n".join(lines) + "\n"


def write_results(path: Path, results: dict[str, Any]) -> str:
    """Refresh the summary, then write the JSON and the markdown beside it, each atomically; returns the markdown."""
    from stxd_train.engine import atomic_write_text

    results["summary"] = summarize(results["runs"])
    atomic_write_text(path, json.dumps(results, indent=2) + "\n", then=AGAIN)
    text = markdown(results)
    atomic_write_text(path.with_suffix(".md"), text, then=AGAIN)
    return text


def load_results(path: Path, eval_split: str) -> dict[str, Any]:
    results = _read_json(path)
    if results and results.get("eval_split") != eval_split:
        raise ConfigError(f"{path} holds runs scored on {results.get('eval_split')}, not on --eval-split "
                          f"{eval_split}; pass another --results for this split")
    return results or {"eval_split": eval_split, "runs": []}


def run_protocol(p: Protocol, *, students: Sequence[str], variants: Sequence[str], seeds: Sequence[int],
                 steps: int | None, overrides: Sequence[str], student_configs: Path) -> dict[str, Any]:
    from pipelines.config import load_config
    from pipelines.evaluation import source_revision
    from pipelines.synth import SynthConfig

    data = load_config(SynthConfig, p.data_config)
    if p.eval_split not in data.splits:
        raise ConfigError(f"{p.data_config} writes the splits {', '.join(data.splits)}, not --eval-split "
                          f"{p.eval_split}; give it a test_fraction (configs/data/synth_bench.yaml has one), or pass "
                          "--eval-split synth_val")
    runs = plan(p, version=data.version, students=students, variants=variants, seeds=seeds, steps=steps,
                overrides=overrides, student_configs=student_configs)
    source, device_name = source_revision(), describe_device(p.device)
    results = load_results(p.results, p.eval_split)
    recorded = {record_key(r): r for r in results["runs"]}
    pending = [run for run in runs if run.key not in recorded or recorded[run.key]["commit"] != source["commit"]]
    per_student = {s: next(r.steps for r in runs if r.student == s) for s in students}
    total = sum(r.steps for r in runs)
    schedule = {"order": "seed-major", "students": list(students), "variants": list(variants),
                "seeds": list(seeds), "runs": len(runs), "steps_per_run": per_student, "student_steps": total}
    results.update(schedule=schedule, device=device_name, commit=source["commit"], dirty=source["dirty"],
                   work=str(p.work))
    print(f"schedule: {len(runs)} runs ({len(students)} students x {len(variants)} variants x {len(seeds)} seeds, "
          f"seed-major) = {total} student steps ({', '.join(f'{s} {n}' for s, n in per_student.items())} steps "
          f"per run), each scored on {p.eval_split}; {len(pending)} to do, {len(runs) - len(pending)} already "
          f"recorded at this commit; device {p.device} ({device_name})", flush=True)
    if pending:
        make_data(p)
        results["eval_frames"] = split_frames(p.dataroot, data.version, p.eval_split)
        results["teacher"] = train_teacher(p, data.version)
        extract_cache(p, data.version, list(data.splits))
    started = time.perf_counter()
    for i, run in enumerate(pending, 1):
        print(f"[{i}/{len(pending)}] {run.student} {run.variant} seed {run.seed}, {run.steps} steps: "
              f"{run.spec.out}", flush=True)
        record = run_one(p, run, device_name=device_name, source=source)
        results["runs"] = [r for r in results["runs"] if record_key(r) != run.key] + [record]
        write_results(p.results, results)
        left = (time.perf_counter() - started) / i * (len(pending) - i)
        print(f"    NDS {record['nds']:.4f}  mAP {record['map']:.4f}  ({record['wall_seconds']:.0f} s; about "
              f"{left / 60:.0f} min left at this pace)", flush=True)
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
@click.option("--students", default="bevformer_synth,uvtr_synth", show_default=True, help="Student config names.")
@click.option("--variants", default="plain,stxd", show_default=True, help=f"Some of {', '.join(VARIANTS)}.")
@click.option("--seeds", default="0,1,2", show_default=True, help="train.seed of each run.")
@click.option("--steps", type=int, help="train.max_steps of every run [default: each student config's].")
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
def main(work: str, results: str | None, eval_split: str, students: str, variants: str, seeds: str,
         steps: int | None, device: str, overrides: tuple[str, ...], teacher_steps: int,
         teacher_overrides: tuple[str, ...], data_config: str, teacher_config: str, cache_config: str,
         student_configs: str, workers: int) -> None:
    """Train and score students x variants x seeds against one teacher cache; resumable."""
    from pipelines.paths import check_output_path

    try:
        if work == DEFAULT_WORK:
            Path(work).parent.mkdir(parents=True, exist_ok=True)
        suffix = "" if eval_split == "synth_test" else f"_{eval_split}"
        results_path = Path(results or REPO / "benchmarks" / "results" / f"distill_gain{suffix}.json")
        results_path.parent.mkdir(parents=True, exist_ok=True)
        protocol = Protocol(work=check_output_path(work, option="--work"), results=results_path,
                            eval_split=eval_split, device=device, data_config=data_config,
                            teacher_config=teacher_config,
                            teacher_overrides=(*([f"train.max_steps={teacher_steps}"] if teacher_steps else []),
                                               *teacher_overrides),
                            cache_config=cache_config, workers=workers)
        protocol.work.mkdir(exist_ok=True)
        run_protocol(protocol, students=_names(students), variants=_names(variants),
                     seeds=_seeds(seeds), steps=steps, overrides=overrides,
                     student_configs=Path(student_configs))
    except StxdError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
