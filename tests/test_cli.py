"""The console scripts: instant --help, one-paragraph errors without tracebacks, real commands."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipelines.cli import main as data_main

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("script", ["stxd-data", "stxd-cache", "stxd-train"])
def test_help_does_not_import_torch(script: str) -> None:
    module = {"stxd-data": "pipelines.cli", "stxd-cache": "stxd_cache.cli", "stxd-train": "stxd_train.cli"}[script]
    probe = f"import sys, {module}; print(sorted(m for m in ('torch', 'nuscenes', 'zarr') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    result = subprocess.run([BIN / script, "--help"], capture_output=True, text=True, check=True)
    assert "Usage:" in result.stdout


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BIN / "stxd-data", *args], capture_output=True, text=True,
                          env={**os.environ, "TQDM_DISABLE": "1"})


def test_errors_are_one_paragraph_without_traceback(synth_root: Path, tmp_path: Path) -> None:
    cases = [
        (["index", "--dataroot", str(tmp_path / "missing"), "--version", "v1.0-synth"], "does not exist"),
        (["index", "--dataroot", str(synth_root), "--version", "v1.0-mini"], "version 'v1.0-mini' not found"),
        (["index", "--dataroot", str(synth_root), "--version", "v1.0-synth", "--splits", "nope"], "unknown split"),
        (["synth", "--out", str(tmp_path / "x"), "--set", "colour=red"], "unknown key(s) colour"),
        (["synth", "--out", str(tmp_path / "x"), "--scenes", "0"], "found 0, expected at least 1"),
    ]
    for args, expected in cases:
        result = _run(args)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr
        assert expected in " ".join(result.stderr.split()), (args, result.stderr)
    debug = _run(["--debug", "index", "--dataroot", str(tmp_path / "missing"), "--version", "v1.0-synth"])
    assert "Traceback" in debug.stderr
    after = _run(["index", "--dataroot", str(tmp_path / "missing"), "--version", "v1.0-synth", "--debug"])
    assert "Traceback" in after.stderr and "DatasetError" in after.stderr


def _broken_copy(synth_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "broken"
    shutil.copytree(synth_root, root)
    return root


def test_missing_and_truncated_files_through_the_data_layer(synth_root: Path, tmp_path: Path) -> None:
    root = _broken_copy(synth_root, tmp_path)
    lidar = sorted((root / "samples" / "LIDAR_TOP").iterdir())[0]
    lidar.write_bytes(lidar.read_bytes()[:-7])
    result = _run(["index", "--dataroot", str(root), "--version", "v1.0-synth", "--splits", "synth_train", "--load"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert lidar.name in result.stderr and "not a multiple of 20" in result.stderr
    lidar.unlink()
    result = _run(["index", "--dataroot", str(root), "--version", "v1.0-synth", "--splits", "synth_train", "--load"])
    assert result.returncode == 2 and lidar.name in result.stderr and "missing" in result.stderr


def test_index_loads_every_sample(synth_root: Path) -> None:
    result = CliRunner().invoke(data_main, ["index", "--dataroot", str(synth_root), "--version", "v1.0-synth",
                                            "--splits", "synth_train,synth_val", "--load", "--sweeps", "3"])
    assert result.exit_code == 0, result.output
    assert "12 samples in 3 scenes" in result.output
    assert "read 12 samples" in result.output


def test_splits_that_select_nothing_are_errors(synth_root: Path, tmp_path: Path) -> None:
    """Official split names on a synthetic root, and a split none of whose scenes is in the root, are errors that
    list the splits with samples; a root that no split selects fails `check`."""
    listed = "the splits with samples here are synth_train (8 samples), synth_val (4 samples); pass one of these"
    official = _run(["index", "--dataroot", str(synth_root), "--version", "v1.0-synth", "--splits", "train"])
    message = " ".join(official.stderr.split())
    assert official.returncode == 2 and "split 'train' is an official nuScenes split, but" in message
    assert "is a synthetic root written by `stxd-data synth`" in message and message.endswith(listed)

    # The same tables without the synthetic stamp, as a real root with its own splits.json: the official mini
    # splits name none of its scenes.
    root = tmp_path / "plain"
    shutil.copytree(synth_root, root, symlinks=True)
    (root / "v1.0-synth" / "synth_config.yaml").unlink()
    empty = _run(["index", "--dataroot", str(root), "--version", "v1.0-synth", "--splits", "synth_val,mini_val"])
    message = " ".join(empty.stderr.split())
    assert empty.returncode == 2, empty.stdout
    assert message.startswith(f"error: split 'mini_val' selects no sample of {root} (v1.0-synth): none of its 2 "
                              "scenes is in this root;") and message.endswith(listed), message
    (root / "v1.0-synth" / "splits.json").unlink()
    checked = _run(["check", "--dataroot", str(root), "--version", "v1.0-synth", "--no-files"])
    assert checked.returncode == 1
    assert "no split selects a sample of this root: none of its 3 scene names (e.g. 'synth-0000')" in checked.stderr


def test_check_accepts_a_valid_root_and_lists_every_problem(synth_root: Path, tmp_path: Path) -> None:
    ok = _run(["check", "--dataroot", str(synth_root), "--version", "v1.0-synth"])
    assert ok.returncode == 0, ok.stderr
    assert "ok: the root is valid" in ok.stdout and "12 samples" in ok.stdout
    assert "splits with samples: synth_train (8 samples), synth_val (4 samples)" in ok.stdout

    root = _broken_copy(synth_root, tmp_path)
    cam = sorted((root / "samples" / "CAM_FRONT").iterdir())[0]
    cam.unlink()
    lidar = sorted((root / "samples" / "LIDAR_TOP").iterdir())[1]
    lidar.write_bytes(lidar.read_bytes()[:-3])
    anns = json.loads((root / "v1.0-synth" / "sample_annotation.json").read_text())
    anns[0]["instance_token"] = "dangling"
    (root / "v1.0-synth" / "sample_annotation.json").write_text(json.dumps(anns))
    bad = _run(["check", "--dataroot", str(root), "--version", "v1.0-synth"])
    assert bad.returncode == 1
    assert "3 problem(s)" in bad.stderr
    assert f"{cam} is missing" in bad.stderr
    assert f"{lidar} has" in bad.stderr
    assert "instance_token that is not a instance token" in bad.stderr and "'dangling'" in bad.stderr


@pytest.mark.parametrize("recipe", ["configs/student/bevformer_synth.yaml", "configs/teacher/centerpoint_synth.yaml"])
def test_config_prints_every_field_with_its_help_and_round_trips(recipe: str) -> None:
    """`stxd-train config` resolves a recipe with its overrides; each printed line given back as --set changes
    nothing."""
    from pipelines.config import read_yaml
    from stxd_train.cli import main as train_main

    repo = Path(__file__).resolve().parents[1]
    printed = CliRunner().invoke(train_main, ["config", "--config", str(repo / recipe), "--set", "train.seed=7"])
    assert printed.exit_code == 0, printed.output
    lines = printed.output.splitlines()
    kind = "student" if "student" in recipe else "teacher"
    assert lines[0] == f"# {kind} run config of {repo / recipe} --set train.seed=7"
    assert "train.seed: 7  # seed of the model init, dropout and data order" in lines
    assert "optim.lr: " + str(read_yaml(repo / recipe)["optim"]["lr"]) + "  # peak learning rate" in lines
    sets = [a for line in lines[1:] for a in ("--set", line.split("  # ")[0].replace(": ", "=", 1))]
    again = CliRunner().invoke(train_main, ["config", "--config", str(repo / recipe), *sets])
    assert again.exit_code == 0, again.output
    assert again.output.splitlines()[1:] == lines[1:]
