"""`stxd-train fit` / `eval` for students on the tiny root and cache: run outputs, exact resume, start-up
errors, and 2-process DDP with gloo against a 1-process run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipelines.config import from_dict
from pipelines.errors import ConfigError
from stxd_train.cli import main
from stxd_train.fit import StudentRunConfig, fit
from tiny import cli_error, strip_annotations, tiny_student

VERSION = "v1.0-synth"


def _config(tmp_path: Path, name: str = "bevformer", **model: object) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tiny_student(name, **model)))
    return path


def _invoke(*args: str) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_fit_then_eval_writes_a_complete_run(tmp_path: Path, synth_root: Path, cache: Path) -> None:
    run = tmp_path / "run"
    _invoke("fit", "--config", _config(tmp_path), "--dataroot", synth_root, "--version", VERSION, "--out", run,
            "--cache", cache, "--device", "cpu")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["kind"] == "student" and saved["cache"] == str(cache) and saved["model"]["name"] == "bevformer"
    lines = _metrics(run)
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    assert all({"loss_heatmap", "loss_bbox"} == set(m["terms"]) and m["loss"] > 0 for m in lines)
    assert (run / "checkpoints" / "last.pt").is_file() and (run / "student.pt").is_file()
    assert any((run / "tb").iterdir())
    out = _invoke("eval", "--run", run, "--device", "cpu")
    assert "synth_val: NDS" in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["split"] == "synth_val" and 0.0 <= metrics["NDS"] <= 1.0 and metrics["samples"] == 4
    assert set(metrics["per_class_AP"]) >= {"car", "pedestrian", "barrier"}
    assert metrics["boxes_per_sample"] > 0
    report = run / "eval" / "synth_val"
    assert (report / "summary.md").is_file() and (report / "submission.json").is_file()
    plots = [*(report / "plots").glob("*.png"), run / "training_curves.png"]
    assert len(plots) == 16 and all(p.read_bytes()[:4] == b"\x89PNG" for p in plots)

    # The student's boxes and the GT on the cameras and in BEV.
    from pipelines.nuscenes import SampleIndex

    sample = SampleIndex.load(synth_root, VERSION, ["synth_val"])[1]
    shown = _invoke("show", "--run", run, "--sample", sample.token, "--out", tmp_path / "show.png",
                    "--min-score", "0.2", "--device", "cpu")
    predictions = json.loads((report / "submission.json").read_text())["results"][sample.token]
    drawn = sum(p["detection_score"] >= 0.2 for p in predictions)
    assert shown.strip().startswith(f"wrote {tmp_path / 'show.png'}: {drawn} boxes scoring >= 0.2 and "
                                    f"{len(sample.gt.boxes)} GT boxes; ")
    assert (tmp_path / "show.png").read_bytes()[:4] == b"\x89PNG"

    # The scores are in TensorBoard at the last step, beside the losses.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    [logged] = events.Scalars("eval/synth_val/NDS")
    assert logged.step == 4 and logged.value == pytest.approx(metrics["NDS"])
    assert "loss/total" in events.Tags()["scalars"]

    # Another split's scores go to its own folder; RUN/metrics.json stays the val split's.
    headline = (run / "metrics.json").read_bytes()
    assert "synth_train: NDS" in _invoke("eval", "--run", run, "--split", "synth_train", "--device", "cpu")
    assert (run / "metrics.json").read_bytes() == headline
    train_metrics = json.loads((run / "eval" / "synth_train" / "metrics.json").read_text())
    assert train_metrics["split"] == "synth_train" and train_metrics["samples"] == 8
    assert json.loads((report / "metrics.json").read_text())["NDS"] == metrics["NDS"]
    side = _invoke("compare", "--run", run, "--split", "synth_train", "--draws", "0").splitlines()
    assert side[0] == "| synth_train | run (none) |" and side[2] == f"| NDS | {train_metrics['NDS']:.4f} |"

    # A split without annotations (as nuScenes' test split) is predicted, never scored.
    stripped = strip_annotations(synth_root, "synth_val", tmp_path / "test_root")
    message = cli_error(main, "eval", "--run", run, "--split", "synth_val", "--dataroot", stripped,
                        "--device", "cpu")
    assert message.startswith(f"split synth_val of {stripped} ({VERSION}) has no annotations (4 samples, "
                              "0 annotations), so it cannot be scored;")
    assert f"stxd-train predict --run {run} --split synth_val" in message
    assert (run / "metrics.json").read_bytes() == headline
    out = _invoke("predict", "--run", run, "--split", "synth_val", "--dataroot", stripped, "--device", "cpu",
                  "--out", tmp_path / "results.json")
    submission = json.loads((tmp_path / "results.json").read_text())
    assert submission["meta"]["use_camera"] and not submission["meta"]["use_lidar"]
    expected = json.loads((report / "submission.json").read_text())["results"]
    assert submission["results"] == expected     # the same boxes as the scored run, annotations or not
    boxes = sum(len(v) for v in expected.values())
    assert boxes > 0 and out.strip().endswith(f"4 samples of synth_val, {boxes} boxes")


def test_resume_checks_the_config(tmp_path: Path, synth_root: Path) -> None:
    """A run resumes only with the config it was trained with (logging knobs aside)."""
    raw = tiny_student("uvtr")
    raw["train"]["max_steps"] = 2
    out = tmp_path / "run"
    fit(from_dict(StudentRunConfig, raw), dataroot=str(synth_root), version=VERSION, out=out, device="cpu")
    changed = {**raw, "optim": {**raw["optim"], "lr": 0.01}}
    with pytest.raises(ConfigError, match=r"optim.lr: run has 0.001, now 0.01"):
        fit(from_dict(StudentRunConfig, changed), dataroot=str(synth_root), version=VERSION, out=out, device="cpu",
            resume=True)
    relogged = {**raw, "train": {**raw["train"], "log_every": 5}}
    fit(from_dict(StudentRunConfig, relogged), dataroot=str(synth_root), version=VERSION, out=out, device="cpu",
        resume=True)
    assert [m["step"] for m in _metrics(out)] == [1, 2]
    with pytest.raises(ConfigError, match="never started"):
        fit(from_dict(StudentRunConfig, raw), dataroot=str(synth_root), version=VERSION, out=tmp_path / "new",
            device="cpu", resume=True)


def test_the_resume_advice_works_when_followed(tmp_path: Path, synth_root: Path) -> None:
    """A resume with another config is refused with the advice `--config RUN/config.yaml`; given as advised (with
    the run's data options), that file resumes the run, here extended from 2 to 4 steps. It is a student config
    only: the teacher command refuses it."""
    raw = tiny_student("bevformer")
    raw["train"]["max_steps"] = 2
    config, run = tmp_path / "student.yaml", tmp_path / "run"
    config.write_text(yaml.safe_dump(raw))
    base = ("--dataroot", synth_root, "--version", VERSION, "--out", run, "--device", "cpu")
    _invoke("fit", "--config", config, *base)
    message = cli_error(main, "fit", "--config", config, *base, "--resume", "--set", "optim.lr=0.01", "--set",
                        "train.max_steps=4")
    assert "optim.lr: run has 0.001, now 0.01" in message
    advised = re.search(r"resume with `--config (\S+)`", message).group(1)
    assert advised == str(run / "config.yaml")
    _invoke("fit", "--config", advised, *base, "--resume", "--set", "train.max_steps=4")
    assert [m["step"] for m in _metrics(run)] == [1, 2, 3, 4]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 0.001 and saved["train"]["max_steps"] == 4 and saved["kind"] == "student"
    message = cli_error(main, "teacher", "--config", advised, *base, "--resume")
    assert message.startswith(f"{advised} is the config.yaml of a run of kind 'student', expected a teacher config")


def test_bad_inputs_fail_at_start_up(tmp_path: Path, synth_root: Path, cache: Path) -> None:
    def fails(*args: object) -> str:
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code != 0
        return " ".join(result.output.split())   # the message is one paragraph, wrapped to the terminal

    base = ("fit", "--dataroot", synth_root, "--version", VERSION, "--device", "cpu")
    out = fails(*base, "--config", _config(tmp_path), "--out", tmp_path / "r1", "--set", "model.colour=red")
    assert "unknown key(s) colour" in out and "embed_dims" in out
    out = fails(*base, "--config", _config(tmp_path), "--out", tmp_path / "r2", "--set", "data.batch_size=two")
    assert "batch_size" in out
    out = fails(*base, "--config", _config(tmp_path, grid_half_extent=51.2), "--out", tmp_path / "r3",
                "--cache", cache)
    assert "ranges must match" in out and "-25.6..25.6" in out and "-51.2..51.2" in out
    assert not (tmp_path / "r3" / "checkpoints").exists()


_CONFIG_ERROR = """
import sys
from stxd_train.cli import main
try:
    main(args={args}, prog_name="stxd-train")
except SystemExit as exc:
    print(exc.code, sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "spconv", "nuscenes")))
"""


@pytest.mark.parametrize(("command", "recipe", "bad", "expected"), [
    ("fit", "configs/student/bevformer_synth.yaml", "model.colour=red", "unknown key(s) colour"),
    ("fit", "configs/student/bevformer_synth.yaml", "model.name=detr3d", "expected one of bevformer, uvtr"),
    ("fit", "configs/student/uvtr_synth.yaml", "distill.terms=[kd]", "distinct names among cd, td, rd, mse"),
    ("teacher", "configs/teacher/centerpoint_synth.yaml", "optim.lr=-1", "`lr`: found -1"),
    ("config", "configs/student/bevformer_synth.yaml", "train.amp=fp8", "train.amp: found 'fp8', expected one of"),
])
def test_a_config_error_is_reported_before_torch_is_imported(command: str, recipe: str, bad: str, expected: str,
                                                              tmp_path: Path) -> None:
    args = [command, "--config", str(Path(__file__).parents[2] / recipe), "--set", bad]
    if command != "config":
        args += ["--dataroot", str(tmp_path), "--version", VERSION, "--out", str(tmp_path / "run")]
    done = subprocess.run([sys.executable, "-c", _CONFIG_ERROR.format(args=args)], capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.strip() == "2 []", (done.stdout, done.stderr[-2000:])
    assert expected in " ".join(done.stderr.split()), done.stderr
    assert not (tmp_path / "run").exists()


def test_ddp_two_cpu_ranks_match_one_process(tmp_path: Path, synth_root: Path) -> None:
    """torchrun with 2 gloo ranks × batch 1 against 1 process × batch 2: same samples per step, the same
    all-reduced losses within tolerance, and only rank 0 writes."""
    def run(name: str, nproc: int, batch: int) -> Path:
        raw = tiny_student("bevformer")
        raw["data"]["batch_size"] = batch
        raw["train"].update(max_steps=3, checkpoint_every=3)
        # Per-sample normalisation differs between one batch of 2 and two batches of 1 only through the
        # number of objects; frozen BatchNorm statistics keep the forward passes identical.
        raw["model"]["backbone"]["norm_eval"] = True
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump(raw))
        out = tmp_path / name
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "stxd_train.cli", "fit", "--config", str(config), "--dataroot", str(synth_root),
               "--version", VERSION, "--out", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return out

    single, ddp = run("single", 1, 2), run("ddp", 2, 1)
    a, b = _metrics(single), _metrics(ddp)
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3]
    gaps = [abs(y["loss"] - x["loss"]) / x["loss"] for x, y in zip(a, b, strict=True)]
    print("DDP vs 1 process, relative loss gap per step:", ", ".join(f"{100 * g:.2f} %" for g in gaps))
    assert max(gaps) < 0.02, (a, b)
    assert (ddp / "student.pt").is_file() and len(list((ddp / "checkpoints").glob("*.pt"))) == 1


#: Shrinks a shipped student config to the tiny data and cache, keeping its backbone and FPN layout (stages,
#: out_indices, fpn_levels), which decide which parameters receive a gradient.
_SHRINK = ("model.grid_half_extent=25.6", "model.grid_size=8", "model.embed_dims=16", "model.backbone.depth=18",
           "model.backbone.base_channels=8", "model.head.share_conv_channels=8", "model.head.head_conv_channels=8",
           "data.image_size=[64,32]", "data.batch_size=1", "data.num_workers=0", "data.train_splits=[synth_train]",
           "data.val_split=synth_val", "train.max_steps=2", "train.checkpoint_every=2", "train.log_every=1",
           "distill.terms=[cd,td,rd]", "distill.k=2")
_SHRINK_MODEL = {"bevformer": ("model.bevformer.num_layers=1", "model.bevformer.num_heads=2",
                               "model.bevformer.ffn_channels=16", "model.bevformer.queue=1"),
                 "uvtr": ("model.uvtr.depth_bins=8",)}


@pytest.mark.parametrize("config", sorted((Path(__file__).parents[2] / "configs" / "student").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_torchrun_trains_every_shipped_student_config(config: Path, tmp_path: Path, synth_root: Path,
                                                      cache: Path) -> None:
    """2 gloo ranks, distillation on: DDP fails at the second step if any parameter got no gradient."""
    name = yaml.safe_load(config.read_text())["model"]["name"]
    sets = [a for o in (*_SHRINK, *_SHRINK_MODEL[name]) for a in ("--set", o)]
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "stxd_train.cli", "fit", "--config", str(config), "--dataroot", str(synth_root), "--version", VERSION,
           "--cache", str(cache), "--out", str(out), *sets]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    steps = _metrics(out)
    assert [m["step"] for m in steps] == [1, 2] and all(m["terms"]["loss_cd"] > 0 for m in steps), steps
    assert (out / "student.pt").is_file()


_CAMERA_ONLY = """
import sys
from stxd_train.cli import main
for args in ({fit}, {eval}, {diagnose}):
    try:
        main(args=args, prog_name="stxd-train")
    except SystemExit as exc:
        assert exc.code in (0, None), (args, exc.code)
print(sorted(m for m in sys.modules if m.split(".")[0] == "spconv"))
"""


def test_a_cached_fit_eval_and_diagnose_never_import_spconv(tmp_path: Path, synth_root: Path, cache: Path) -> None:
    """Camera runs read the teacher's records from the cache: the teacher's library (spconv, 8 s of imports) stays
    out of the process."""
    raw = tiny_student("bevformer")
    raw["train"]["max_steps"] = 1
    raw["distill"] = {"terms": ["cd", "td", "rd"], "k": 2}
    config, run = tmp_path / "s.yaml", tmp_path / "run"
    config.write_text(yaml.safe_dump(raw))
    fit_args = ["fit", "--config", str(config), "--dataroot", str(synth_root), "--version", VERSION, "--out",
                str(run), "--cache", str(cache), "--device", "cpu"]
    script = _CAMERA_ONLY.format(fit=fit_args, eval=["eval", "--run", str(run), "--device", "cpu"],
                                 diagnose=["diagnose", "--cache", str(cache), "--run", str(run), "--split",
                                           "synth_val", "--device", "cpu"])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout[-2000:]
