"""Run every benchmark and write BENCHMARKS.md (`make bench` runs the quick mode).

    .venv/bin/python benchmarks/run_all.py --quick --out BENCHMARKS.md

Needs a synthetic root (`make bench` generates the demo one with `--reuse`). The teacher is the demo teacher
when `teacher/teacher.pt` exists next to the root (`make demo` makes it), else one trained for a few steps into
`--work` (speed does not depend on how well it is trained); the cache is the demo cache for the demo teacher,
else extracted into `--work` once. Each script runs as its own process; its exact command and its output go
into the file. Everything below the notes marker of an existing output file is kept: the hand-written analysis.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import click

HERE = Path(__file__).resolve().parent
MARKER = "<!-- notes: everything below this line is kept when run_all.py rewrites the file -->"
QUICK = {"step": ["--rounds", "6", "--steps", "3"], "io": ["--samples", "32", "--rounds", "2"],
         "extract": ["--splits", "synth_val", "--rounds", "2"], "loader": ["--batches", "12", "--rounds", "2"]}
FULL = {"step": ["--rounds", "8", "--steps", "4"], "io": ["--samples", "96", "--rounds", "3"],
        "extract": ["--splits", "synth_val", "--rounds", "3"], "loader": ["--batches", "32", "--rounds", "3"]}


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _run(cmd: list[str]) -> str:
    """Run one command with its output shown as it comes; returns stdout (what the scripts print as markdown)."""
    click.echo(f"$ {shlex.join(cmd)}", err=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode:
        raise click.ClickException(f"`{shlex.join(cmd)}` failed with exit code {proc.returncode}; its output is "
                                   "above")
    click.echo(proc.stdout, err=True)
    return proc.stdout


def _inputs(dataroot: str, version: str, work: Path, teacher: str | None, cache: str | None) -> tuple[str, str]:
    """(teacher checkpoint, complete cache over both splits), made in `work` when not given or found."""
    demo = Path(dataroot).parent   # the demo's layout: DIR/data, DIR/teacher, DIR/cache.zarr
    demo_teacher, demo_cache = demo / "teacher" / "teacher.pt", demo / "cache.zarr"
    if teacher is None:
        if demo_teacher.is_file():
            teacher = str(demo_teacher)
            cache = cache or (str(demo_cache) if (demo_cache / "zarr.json").is_file() else None)
        else:
            teacher = str(work / "teacher" / "teacher.pt")
            if not Path(teacher).is_file():
                _run([_bin("stxd-train"), "teacher", "--config", "configs/teacher/centerpoint_synth.yaml",
                      "--dataroot", dataroot, "--version", version, "--out", str(work / "teacher"), "--no-eval",
                      "--set", "train.max_steps=10", "--set", "train.checkpoint_every=10"])
    cache = cache or str(work / "cache.zarr")
    from stxd_cache.store import is_complete

    if is_complete(cache):
        return teacher, cache
    _run([_bin("stxd-cache"), "extract", "--dataroot", dataroot, "--version", version, "--splits",
          "synth_train,synth_val", "--teacher", teacher, "--config", "configs/cache/synth.yaml", "--out", cache])
    return teacher, cache


@click.command()
@click.option("--dataroot", default="out/demo/data", show_default=True)
@click.option("--version", default="v1.0-synth", show_default=True)
@click.option("--teacher", default=None, help="Teacher checkpoint (default: the demo teacher, else a short one).")
@click.option("--cache", default=None, help="Its cache over synth_train and synth_val (default: made as needed).")
@click.option("--work", default="out/bench", show_default=True, help="Where made inputs and results go.")
@click.option("--quick", is_flag=True, help="The quick mode of `make bench` (7.5 to 10 minutes on 2 cores).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda: the training step and extraction.")
@click.option("--out", "out_path", default="BENCHMARKS.md", show_default=True)
def main(dataroot: str, version: str, teacher: str | None, cache: str | None, work: str, quick: bool, device: str,
         out_path: str) -> None:
    work_dir = Path(work)
    work_dir.mkdir(parents=True, exist_ok=True)
    teacher, cache = _inputs(dataroot, version, work_dir, teacher, cache)
    params = QUICK if quick else FULL
    data = ["--dataroot", dataroot, "--version", version]
    step_json = str(work_dir / "step_time.json")
    py = sys.executable
    commands = {
        "Training step": [py, str(HERE / "step_time.py"), *data, "--cache", cache, "--teacher", teacher, "--k", "3",
                          "--device", device, *params["step"], "--json", step_json],
        "Cache I/O": [py, str(HERE / "cache_io.py"), "--cache", cache, *params["io"], "--step-json", step_json,
                      "--json", str(work_dir / "cache_io.json")],
        "Extraction": [py, str(HERE / "extract.py"), *data, "--teacher", teacher, "--device", device,
                       *params["extract"], "--json", str(work_dir / "extract.json")],
        "Data loading for students": [py, str(HERE / "loader.py"), *data, "--cache", cache, *params["loader"],
                                      "--step-json", step_json, "--json", str(work_dir / "loader.json")],
    }
    start = time.perf_counter()
    sections = []
    for title, cmd in commands.items():
        began = time.perf_counter()
        output = _run(cmd)
        shown = shlex.join(cmd).replace(sys.executable, ".venv/bin/python").replace(str(HERE) + "/", "benchmarks/")
        sections.append(f"## {title}\n\n```bash\n{shown}\n```\n\n{output.strip()}\n\n"
                        f"({time.perf_counter() - began:.0f} s)\n")
    total = time.perf_counter() - start
    results = {name: json.loads((work_dir / f"{name}.json").read_text())
               for name in ("step_time", "cache_io", "extract", "loader")}
    header = _header(results, quick, total, " ".join(sys.argv[1:]))
    out = Path(out_path)
    notes = ""
    if out.is_file() and MARKER in out.read_text():
        notes = out.read_text().split(MARKER, 1)[1]
    out.write_text(header + "\n".join(sections) + "\n" + MARKER + (notes or "\n"))
    click.echo(f"wrote {out} ({total / 60:.1f} min)", err=True)


def _header(results: dict, quick: bool, seconds: float, args: str) -> str:
    step, io, ex = results["step_time"], results["cache_io"], results["extract"]
    targets = [
        ("cached / student-only step", f"{step['ratios']['cached/student']:.3f}", "<= 1.10",
         step["ratios"]["cached/student"] <= 1.10),
        ("online (K = 3) / cached step", f"{step['ratios']['online/cached']:.2f}", ">= 2",
         step["ratios"]["online/cached"] >= 2),
        ("cache loader / cached step consumption", f"{io['consumption']['loader_over_step']:.1f}x", ">= 3x",
         io["consumption"]["loader_over_step"] >= 3),
        ("extraction / forward alone, steady state", f"{ex['steady_s'] / ex['forward_s']:.2f}", "<= 1.15",
         ex["steady_s"] / ex["forward_s"] <= 1.15),
        ("extraction / forward alone, end to end", f"{ex['single_s'] / ex['forward_s']:.2f}", "<= 1.15",
         ex["single_s"] / ex["forward_s"] <= 1.15),
        ("dask 2 workers / 1 worker speed-up, end to end", f"x{ex['dask_speedup'][0]:.2f}", "", None),
    ]
    rows = "\n".join(f"| {name} | {value} | {target} | {'' if ok is None else ('met' if ok else '**missed**')} |"
                     for name, value, target, ok in targets)
    return (f"# Benchmarks\n\nWritten by `benchmarks/run_all.py {args}` (`make bench`"
            f"{'' if quick else ' with the full repetitions'}) on {datetime.now(UTC):%Y-%m-%d} in "
            f"{seconds / 60:.1f} min. Every section below gives its exact command, the machine, and the medians "
            "of repetitions interleaved in one run; ratios are taken within one run.\n\n"
            "| headline | measured | target | |\n|---|---:|---:|---|\n" + rows + "\n\n")


if __name__ == "__main__":
    main()
