"""`stxd-train teacher` and `stxd-train eval` end to end on the tiny root with a tiny teacher."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml
from click.testing import CliRunner

from pipelines.config import read_yaml
from pipelines.evaluation import source_revision
from stxd_train.cli import main
from stxd_train.engine.hooks import read_sources
from tiny import cli_error

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]


def _tiny_run_config(tmp_path: Path) -> Path:
    sys.path.insert(0, str(REPO / "tests" / "stxd_cache"))
    from test_extract import TINY_TEACHER

    cfg = read_yaml(REPO / "configs" / "teacher" / "centerpoint_synth.yaml")
    cfg["model"] = TINY_TEACHER
    cfg["train"].update(max_steps=6, checkpoint_every=3, log_every=1)
    cfg["data"].update(num_workers=0)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_resume_and_evaluate(synth_root: Path, tmp_path: Path) -> None:
    config = _tiny_run_config(tmp_path)
    run = tmp_path / "run"
    base = [str(BIN / "stxd-train"), "teacher", "--config", str(config), "--dataroot", str(synth_root),
            "--version", "v1.0-synth", "--out", str(run), "--device", "cpu"]
    first = subprocess.run([*base, "--set", "train.max_steps=3", "--no-eval"], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    again = subprocess.run([*base, "--no-eval"], capture_output=True, text=True)
    assert again.returncode == 2 and "--resume" in again.stderr     # a run folder is never silently reused
    other = subprocess.run([*base, "--resume", "--set", "optim.lr=0.5", "--no-eval"], capture_output=True, text=True)
    assert other.returncode == 2 and "optim.lr" in " ".join(other.stderr.split())   # nor resumed with another config
    resumed = subprocess.run([*base, "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert (run / "teacher.pt").is_file() and (run / "tb").is_dir()
    saved = read_yaml(run / "config.yaml")
    assert saved["kind"] == "teacher" and saved["train"]["max_steps"] == 6
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["split"] == "synth_val" and 0.0 <= metrics["mAP"] <= 1.0 and 0.0 <= metrics["NDS"] <= 1.0
    assert set(metrics["per_class_AP"]) >= {"car", "pedestrian"}
    # Each training session (the first 3 steps, the resume from step 3) recorded the code's commit.
    source = source_revision()
    assert metrics["trained_by"] == [{"start_step": 0, **source}, {"start_step": 3, **source}]
    evaluated = subprocess.run([str(BIN / "stxd-train"), "eval", "--run", str(run), "--device", "cpu"],
                               capture_output=True, text=True)
    assert evaluated.returncode == 0, evaluated.stderr
    assert f"NDS {metrics['NDS']:.4f}" in evaluated.stdout   # the same teacher scores the same
    # A teacher run gets what a student run gets: the summary, PR curves and training curves.
    report = run / "eval" / "synth_val"
    assert "NDS" in (report / "summary.md").read_text()
    plots = [*(report / "plots").glob("*.png"), run / "training_curves.png"]
    assert len(plots) == 16 and all(p.read_bytes()[:4] == b"\x89PNG" for p in plots)
    submission = json.loads((report / "submission.json").read_text())
    assert submission["meta"]["use_lidar"] and not submission["meta"]["use_camera"]


def test_the_resume_advice_works_when_followed(synth_root: Path, tmp_path: Path) -> None:
    """`--config RUN/config.yaml`, as the refusal of a changed config advises, resumes a teacher run."""
    config, run = _tiny_run_config(tmp_path), tmp_path / "run"
    base = ["--dataroot", str(synth_root), "--version", "v1.0-synth", "--out", str(run), "--device", "cpu",
            "--no-eval"]
    result = CliRunner().invoke(main, ["teacher", "--config", str(config), *base, "--set", "train.max_steps=1"])
    assert result.exit_code == 0, result.output
    message = cli_error(main, "teacher", "--config", config, *base, "--resume", "--set", "optim.lr=0.5")
    advised = re.search(r"resume with `--config (\S+)`", message).group(1)
    assert advised == str(run / "config.yaml")
    result = CliRunner().invoke(main, ["teacher", "--config", advised, *base, "--resume", "--set", "train.max_steps=2"])
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    saved = read_yaml(run / "config.yaml")
    assert saved["kind"] == "teacher" and saved["train"]["max_steps"] == 2


def _teacher_run(tmp_path: Path, synth_root: Path, name: str, nproc: int, batch: int) -> Path:
    """A 2-step tiny teacher run of `nproc` torchrun processes (gloo) with `batch` samples per process."""
    config = _tiny_run_config(tmp_path)
    out = tmp_path / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
           "stxd_train.cli", "teacher", "--config", str(config), "--dataroot", str(synth_root), "--version",
           "v1.0-synth", "--out", str(out), "--no-eval", "--set", "train.max_steps=2", "--set",
           "train.checkpoint_every=2", "--set", f"data.batch_size={batch}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_torchrun_trains_the_teacher(synth_root: Path, tmp_path: Path) -> None:
    """2 gloo ranks × batch 1 against 1 process × batch 2 (the same samples per step): the all-reduced losses agree
    within the BatchNorm statistics' difference, only rank 0 writes, and the teacher it writes loads."""
    from stxd_cache.teacher.checkpoint import load_teacher

    single, ddp = (_teacher_run(tmp_path, synth_root, "single", 1, 2), _teacher_run(tmp_path, synth_root, "ddp", 2, 1))
    a, b = ([json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (single, ddp))
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2]
    gaps = [abs(y["loss"] - x["loss"]) / x["loss"] for x, y in zip(a, b, strict=True)]
    print("teacher DDP vs 1 process, relative loss gap per step:", ", ".join(f"{100 * g:.2f} %" for g in gaps))
    assert max(gaps) < 0.05, (a, b)
    assert len(list((ddp / "checkpoints").glob("*.pt"))) == 1 and len(read_sources(ddp)) == 1
    weights = [load_teacher(run / "teacher.pt").model.state_dict() for run in (single, ddp)]
    assert weights[0].keys() == weights[1].keys() and all(v.isfinite().all() for v in weights[1].values())
