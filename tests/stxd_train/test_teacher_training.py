"""`stxd-train teacher` and `stxd-train eval` end to end on the tiny root with a tiny teacher."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml
from click.testing import CliRunner

from pipelines.config import read_yaml
from pipelines.evaluation import source_revision
from stxd_train.cli import main
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
