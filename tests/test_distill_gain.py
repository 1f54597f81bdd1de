"""benchmarks/distill_gain.py: the whole protocol on tiny data (dataset with a synth_test split, tiny teacher, cache,
two variants x two seeds of a tiny student for 2 steps), its results file, its paired statistics, and resuming."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipelines.config import read_yaml
from pipelines.errors import ConfigError
from pipelines.evaluation import source_revision
from tiny import TINY_TEACHER, cache_config_file, tiny_student

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "distill_gain.py"
T_975_1DOF = 12.706   # Student's t, 0.975 quantile, 1 degree of freedom (two seeds)
NUMBER = r"([+-]?\d+\.\d{4})"


def _import_script():
    sys.path.insert(0, str(SCRIPT.parent))
    import distill_gain

    return distill_gain


def _tiny_configs(directory: Path) -> list[str]:
    """The protocol's options for the tiny configs: synth_tiny with one scene held out as synth_test, the tiny
    teacher and cache, and a tiny BEVFormer student."""
    data = read_yaml(REPO / "configs" / "data" / "synth_tiny.yaml")
    data["test_fraction"] = 0.34
    (directory / "data.yaml").write_text(yaml.safe_dump(data))
    teacher = read_yaml(REPO / "configs" / "teacher" / "centerpoint_synth.yaml")
    teacher["model"] = TINY_TEACHER
    teacher["train"].update(max_steps=2, checkpoint_every=1, log_every=1)
    teacher["data"].update(num_workers=0)
    (directory / "teacher.yaml").write_text(yaml.safe_dump(teacher))
    students = directory / "students"
    students.mkdir()
    (students / "tiny_bevformer.yaml").write_text(yaml.safe_dump(tiny_student("bevformer")))
    return ["--data-config", str(directory / "data.yaml"), "--teacher-config", str(directory / "teacher.yaml"),
            "--teacher-steps", "0", "--cache-config", str(cache_config_file(directory)),
            "--student-configs", str(students), "--workers", "2"]


def _file_times(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow   # 12 processes that each import torch and spconv: several minutes on 2 cores
def test_protocol_end_to_end_pairs_seeds_and_resumes(tmp_path: Path) -> None:
    work, results = tmp_path / "work", tmp_path / "results" / "gain.json"
    command = [sys.executable, str(SCRIPT), "--work", str(work), "--results", str(results), "--students",
               "tiny_bevformer", "--variants", "plain,stxd", "--seeds", "0,1", "--steps", "2", "--device", "cpu",
               "--parallel", "2", *_tiny_configs(tmp_path)]
    first = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    threads = max(1, (os.cpu_count() or 1) // 2)
    assert ("schedule: 4 runs in 1 block(s) (tiny_bevformer x plain,stxd x seeds 0,1; each seed-major) = 8 student "
            f"steps (tiny_bevformer 2 steps per run), each scored on synth_test; 4 to do, 0 already recorded at this "
            f"commit; 2 at a time with {threads} torch thread(s) each") in first.stdout

    saved = json.loads(results.read_text())
    assert saved["eval_split"] == "synth_test" and saved["eval_frames"] == 4   # one scene of 4 keyframes
    assert saved["schedule"]["runs"] == 4 and saved["schedule"]["student_steps"] == 8
    assert saved["schedule"]["parallel"] == 2
    assert saved["device"] and saved["teacher"]["steps"] == 2
    assert saved["teacher"]["sha256"] == hashlib.sha256((work / "teacher" / "teacher.pt").read_bytes()).hexdigest()
    commit = source_revision()["commit"]
    # Seed-major: both variants of seed 0 before seed 1, so that a partial grid already pairs; the JSON keeps this
    # order whichever of the 2 runs at a time ends first.
    assert [(r["variant"], r["seed"]) for r in saved["runs"]] == [("plain", 0), ("stxd", 0), ("plain", 1),
                                                                   ("stxd", 1)]
    for record in saved["runs"]:
        run = Path(record["run"])
        metrics = json.loads((run / "eval" / "synth_test" / "metrics.json").read_text())
        assert not (run / "metrics.json").exists()   # the run's headline is its val split's, never scored here
        assert record["student"] == "tiny_bevformer" and record["steps"] == 2 and record["commit"] == commit
        assert (record["nds"], record["map"]) == (metrics["NDS"], metrics["mAP"])
        assert metrics["split"] == "synth_test" and record["eval_frames"] == 4
        assert record["per_class_ap"] == metrics["per_class_AP"]
        assert record["tp_errors"] == {k: metrics[k] for k in ("mATE", "mASE", "mAOE", "mAVE", "mAAE")}
        assert record["wall_seconds"] > 0 and record["device"] == saved["device"] and record["threads"] == threads
        assert isinstance(record["dirty"], bool) or record["dirty"] is None
        config = read_yaml(run / "config.yaml")
        assert config["train"]["max_steps"] == 2 and config["train"]["seed"] == record["seed"]
        assert config["distill"]["terms"] == ([] if record["variant"] == "plain" else ["cd", "td", "rd"])

    # The paired statistics, by hand from the JSON values: per-seed differences, their mean and the t interval.
    by = {(r["variant"], r["seed"]): r for r in saved["runs"]}
    table = results.with_suffix(".md").read_text()
    assert table in first.stdout
    for metric, column in (("nds", 0), ("map", 1)):
        plain = [by["plain", s][metric] for s in (0, 1)]
        stxd = [by["stxd", s][metric] for s in (0, 1)]
        differences = [b - a for a, b in zip(plain, stxd, strict=True)]
        mean = statistics.fmean(differences)
        half = T_975_1DOF * statistics.stdev(differences) / math.sqrt(2)
        summary = next(r for r in saved["summary"] if r["variant"] == "stxd")[f"delta_{metric}"]
        assert summary["differences"] == {"0": differences[0], "1": differences[1]}
        assert summary["mean"] == pytest.approx(mean, abs=1e-12)
        assert summary["ci_low"] == pytest.approx(mean - half, rel=1e-4, abs=1e-12)
        assert summary["ci_high"] == pytest.approx(mean + half, rel=1e-4, abs=1e-12)
        row = re.search(rf"^\| stxd \| 0,1 \| {NUMBER} ± {NUMBER} \| {NUMBER} ± {NUMBER} \| "
                        rf"{NUMBER} \[{NUMBER}, {NUMBER}\] \(n = 2\) \| {NUMBER} \[{NUMBER}, {NUMBER}\] \(n = 2\) \|$",
                        table, re.MULTILINE)
        assert row is not None, table
        values = [float(v) for v in row.groups()]
        assert values[2 * column] == pytest.approx(statistics.fmean(stxd), abs=6e-5)
        assert values[2 * column + 1] == pytest.approx(statistics.stdev(stxd), abs=6e-5)
        assert values[4 + 3 * column: 7 + 3 * column] == pytest.approx([mean, mean - half, mean + half], abs=1e-4)
    assert re.search(r"^\| plain \| 0,1 \| .* \| – \| – \|$", table, re.MULTILINE)

    # A second invocation finds every run recorded at this commit: nothing runs, nothing changes.
    before, text = _file_times(work), results.read_text()
    again = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "4 already recorded" in again.stdout and "stxd-train" not in again.stdout
    assert _file_times(work) == before and results.read_text() == text

    # A run missing from the JSON (killed before it was recorded) is rebuilt from its finished folder, untouched.
    saved["runs"] = saved["runs"][:-1]
    results.write_text(json.dumps(saved, indent=2) + "\n")
    rebuilt = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
    assert "1 to do" in rebuilt.stdout and "stxd-train" not in rebuilt.stdout
    assert _file_times(work) == before and results.read_text() == text

    # Runs distilled from another teacher (here: another checksum) are never mixed into one file.
    saved = json.loads(text)
    saved["runs"], saved["teacher"]["sha256"] = saved["runs"][:-1], "0" * 64
    results.write_text(json.dumps(saved, indent=2) + "\n")
    other = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert other.returncode == 1 and "stxd-train fit" not in other.stdout
    assert f"holds runs distilled from teacher {work / 'teacher'} (sha256 {'0' * 64})" in other.stderr
    assert f"has sha256 {hashlib.sha256((work / 'teacher' / 'teacher.pt').read_bytes()).hexdigest()}" in other.stderr
    assert json.loads(results.read_text()) == saved and _file_times(work) == before


def test_paired_statistics_and_table_by_hand() -> None:
    """Three seeds, and a variant missing a seed: differences pair by seed; the interval uses t(0.975, n - 1)."""
    script = _import_script()

    def record(variant: str, seed: int, nds: float) -> dict:
        return {"student": "s", "steps": 10, "variant": variant, "seed": seed, "nds": nds, "map": nds / 2,
                "per_class_ap": {"car": nds}, "tp_errors": dict.fromkeys(script.TP_ERRORS, 0.5)}

    records = [record("plain", 0, 0.30), record("plain", 1, 0.20), record("plain", 2, 0.25),
               record("stxd", 0, 0.35), record("stxd", 1, 0.26), record("stxd", 2, 0.24),
               record("cd", 1, 0.22)]
    rows = {r["variant"]: r for r in script.summarize(records)}
    assert list(rows) == ["plain", "cd", "stxd"]   # the variants' own order
    delta = rows["stxd"]["delta_nds"]
    differences = [0.05, 0.06, -0.01]
    mean = sum(differences) / 3
    half = 4.3027 * statistics.stdev(differences) / math.sqrt(3)   # t(0.975, 2 dof)
    assert [delta["differences"][s] for s in "012"] == pytest.approx(differences)
    assert delta["n"] == 3 and delta["mean"] == pytest.approx(mean)
    assert (delta["ci_low"], delta["ci_high"]) == pytest.approx((mean - half, mean + half), abs=1e-5)
    assert rows["cd"]["delta_nds"]["n"] == 1 and rows["cd"]["delta_nds"]["ci_low"] is None
    assert rows["plain"]["nds_std"] == pytest.approx(0.05) and "delta_nds" not in rows["plain"]
    table = script.markdown({"eval_split": "synth_test", "eval_frames": 400, "runs": records, "commit": "abc",
                             "dirty": False, "device": "cpu", "schedule": {"runs": 9},
                             "summary": script.summarize(records)})
    assert "| stxd | 0,1,2 | 0.2833 ± 0.0586 | 0.1417 ± 0.0293 | +0.0333 [-0.0607, +0.1274] (n = 3) | " in table
    assert "| cd | 1 | 0.2200 | 0.1100 | +0.0200 (n = 1) |" in table
    assert "7 of 9 runs recorded" in table


@pytest.mark.parametrize(("recorded", "current", "refused"), [
    ({"sha256": "a" * 64, "nds": 0.5, "map": 0.4}, {"sha256": "a" * 64, "nds": 0.5, "map": 0.4}, None),
    ({"sha256": "a" * 64, "nds": 0.5, "map": 0.4}, {"sha256": "b" * 64, "nds": 0.5, "map": 0.4},
     f"(sha256 {'a' * 64}), but the teacher in new/teacher has sha256 {'b' * 64}"),
    # A file written before teachers were checksummed: the teacher's scores on the split tell them apart.
    ({"nds": 0.5, "map": 0.4}, {"sha256": "b" * 64, "nds": 0.5, "map": 0.4}, None),
    ({"nds": 0.5, "map": 0.4}, {"sha256": "b" * 64, "nds": 0.51, "map": 0.4},
     "(NDS 0.5 and mAP 0.4 on the split), but the teacher in new/teacher has NDS 0.51 and mAP 0.4 on the split"),
])
def test_runs_from_another_teacher_are_refused(recorded: dict, current: dict, refused: str | None) -> None:
    script = _import_script()
    recorded, current = {"run": "old/teacher", **recorded}, {"run": "new/teacher", **current}
    if refused is None:
        script.check_same_teacher(Path("gain.json"), recorded, current)
        return
    with pytest.raises(ConfigError) as caught:
        script.check_same_teacher(Path("gain.json"), recorded, current)
    assert str(caught.value).startswith("gain.json holds runs distilled from teacher old/teacher ")
    assert refused in str(caught.value) and "Pass another --results" in str(caught.value)


def test_refuses_an_eval_split_that_the_dataset_does_not_write(tmp_path: Path) -> None:
    script = _import_script()
    result = CliRunner().invoke(script.main, ["--work", str(tmp_path / "work"), "--results",
                                              str(tmp_path / "r.json"), "--data-config",
                                              str(REPO / "configs" / "data" / "synth_tiny.yaml")])
    assert result.exit_code == 1 and "not --eval-split synth_test" in result.output
    assert "test_fraction" in result.output and not (tmp_path / "work" / "data").exists()


def test_the_claims_grid_runs_its_blocks_in_order_each_seed_major(tmp_path: Path) -> None:
    """benchmarks/distill_gain_grid.yaml: 8 paired seeds of plain and STXD first, the ablation on 4 of them, UVTR on
    4; 36 runs of 800 steps, each listed once."""
    script = _import_script()
    blocks, steps = script.load_grid(REPO / script.DEFAULT_GRID)
    assert steps == 800 and [b.variants for b in blocks] == [("plain", "stxd"), ("mse", "cd", "cd_td"),
                                                             ("plain", "stxd")]
    protocol = script.Protocol(work=tmp_path, results=tmp_path / "r.json", eval_split="synth_test", device="cpu",
                               data_config="", teacher_config="", teacher_overrides=(), cache_config="", workers=1)
    runs = script.plan(protocol, version="v1.0-synth", blocks=blocks, steps=steps, overrides=(),
                       student_configs=REPO / "configs" / "student")
    keys = [r.key for r in runs]
    assert len(keys) == len(set(keys)) == 36 and {r.steps for r in runs} == {800}
    assert keys[:4] == [("bevformer_synth", "plain", 0, 800), ("bevformer_synth", "stxd", 0, 800),
                        ("bevformer_synth", "plain", 1, 800), ("bevformer_synth", "stxd", 1, 800)]
    assert keys[16:19] == [("bevformer_synth", v, 0, 800) for v in ("mse", "cd", "cd_td")]
    assert keys[-1] == ("uvtr_synth", "stxd", 3, 800)
    assert runs[0].spec.out == tmp_path / "runs" / "bevformer_synth" / "steps800" / "plain" / "seed0"
    assert runs[-1].config["distill"]["terms"] == ["cd", "td", "rd"] and runs[0].config["distill"]["terms"] == []
    twice = [*blocks, script.Block(("bevformer_synth",), ("stxd",), (7,))]
    with pytest.raises(ConfigError, match="bevformer_synth stxd seed 7 is in more than one block"):
        script.plan(protocol, version="v1.0-synth", blocks=twice, steps=steps, overrides=(),
                    student_configs=REPO / "configs" / "student")


@pytest.mark.parametrize(("text", "message"), [
    ("blocks: []\n", r"found `blocks` \[\]; expected an optional `steps`"),
    ("steps: 10\nseed: [0]\nblocks: []\n", "found the fields seed; expected"),
    ("steps: 0\nblocks: [{students: [s], variants: [plain], seeds: [0]}]\n", "`steps` is 0; expected a positive"),
    ("blocks: [{students: [s], variants: [plain]}]\n", r"blocks\[0\] is .*; expected `blocks`: a list of"),
    ("blocks: [{students: s, variants: [plain], seeds: [0]}]\n", r"blocks\[0\]\.students is 's'; expected a non"),
    ("blocks: [{students: [s], variants: [plain], seeds: [a]}]\n", r"blocks\[0\]\.seeds is \['a'\]; expected a non"),
])
def test_a_bad_grid_file_is_named_with_its_field(tmp_path: Path, text: str, message: str) -> None:
    script = _import_script()
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as caught:
        script.load_grid(path)
    assert str(path) in str(caught.value)


def test_a_grid_file_and_product_options_are_refused_together(tmp_path: Path) -> None:
    script = _import_script()
    result = CliRunner().invoke(script.main, ["--work", str(tmp_path / "work"), "--grid", script.DEFAULT_GRID,
                                              "--seeds", "0,1"])
    assert result.exit_code == 1 and "both name the runs; give one of them" in result.output
    assert not (tmp_path / "work").exists()


def test_per_class_tables_pair_plain_and_stxd_by_seed(tmp_path: Path) -> None:
    """The report's per-class AP, per-class TP errors and mean TP errors, by hand on two seeds; a TP error that a
    seed lacks (no true positive) leaves that seed out of its cell; --report rewrites only the markdown."""
    script = _import_script()

    def record(variant: str, seed: int, car: float, cone: float, orient: float | None) -> dict:
        errors = dict.fromkeys(("trans_err", "scale_err", "vel_err", "attr_err"), 0.5)
        return {"student": "s", "steps": 10, "variant": variant, "seed": seed, "nds": car, "map": car,
                "commit": "abc1234def", "wall_seconds": 720.0, "per_class_ap": {"car": car, "traffic_cone": cone},
                "per_class": {"car": {**errors, "orient_err": orient}, "traffic_cone": {**errors, "orient_err": None}},
                "tp_errors": {k: orient or 0.0 for k in script.TP_ERRORS}}

    runs = [record("plain", 0, 0.40, 0.20, 0.50), record("plain", 1, 0.50, 0.10, 0.70),
            record("stxd", 0, 0.46, 0.10, 0.30), record("stxd", 1, 0.60, 0.12, None), record("stxd", 2, 0.9, 0.9, 0.1)]
    text = "\n".join(script.details(runs))
    mean, half = 0.08, 12.706 * statistics.stdev([0.06, 0.10]) / math.sqrt(2)
    assert "### s, 10 steps: plain against stxd, seeds 0,1" in text   # seed 2 has no plain: left out
    assert f"| car | 0.450 | 0.530 | +0.080 [{mean - half:+.3f}, {mean + half:+.3f}] | 0.500 → 0.500 | " in text
    # car's AOE: seed 1 of stxd has none, so the cell is seed 0 alone: 0.5 -> 0.3.
    assert "| 0.500 → 0.300 | 0.500 → 0.500 | 0.500 → 0.500 |" in text
    assert "| traffic_cone | 0.150 | 0.110 | -0.040 [" in text and "| – → – |" in text
    assert "| mAOE | 0.600 | 0.150 | -0.450 [" in text

    path = tmp_path / "gain.json"
    saved = {"eval_split": "synth_test", "eval_frames": 4, "runs": runs, "commit": "abc", "dirty": False,
             "device": "cpu", "schedule": {"runs": 5}}
    path.write_text(json.dumps(saved))
    result = CliRunner().invoke(script.main, ["--report", "--results", str(path)])
    assert result.exit_code == 0, result.output
    assert path.with_suffix(".md").read_text() == result.output and "| car | 0.450 | 0.530 |" in result.output
    assert "Runs by the commit of their fit: `abc1234` 5. Their fits and scorings took 1.0 h" in result.output
    assert json.loads(path.read_text()) == saved


def test_the_ablation_is_reported_step_by_step_paired_by_seed() -> None:
    """Each step of the ladder pairs its two variants over the seeds both ran; a step whose variants share no
    seed is left out."""
    script = _import_script()

    def record(variant: str, seed: int, nds: float, map_: float) -> dict:
        return {"student": "s", "steps": 10, "variant": variant, "seed": seed, "nds": nds, "map": map_,
                "per_class_ap": {"car": map_}, "per_class": None, "tp_errors": dict.fromkeys(script.TP_ERRORS, 0.5)}

    runs = [record("plain", 0, 0.30, 0.20), record("plain", 1, 0.32, 0.22), record("plain", 2, 0.31, 0.21),
            record("mse", 0, 0.31, 0.20), record("mse", 1, 0.30, 0.23),
            record("cd", 0, 0.33, 0.24), record("cd", 1, 0.35, 0.24), record("cd", 2, 0.36, 0.25),
            record("cd_td", 5, 0.37, 0.26), record("stxd", 0, 0.40, 0.30)]
    text = "\n".join(script.ladder(runs))
    half = T_975_1DOF * statistics.stdev([0.02, 0.05]) / math.sqrt(2)   # cd - mse on seeds 0 and 1
    assert f"| mse → cd | 0,1 | {0.035:+.4f} [{0.035 - half:+.4f}, {0.035 + half:+.4f}] | +0.0250 [" in text
    assert "| plain → cd | 0,1,2 | +0.0367 [" in text and "| +0.0333 [" in text
    assert "cd_td" not in text   # cd_td ran seed 5 alone, which neither cd nor stxd ran: no row for either step
    assert text.index("mse → cd") < text.index("plain → cd")
    results = {"eval_split": "synth_test", "eval_frames": 4, "runs": runs, "commit": "abc", "dirty": False,
               "device": "cpu", "schedule": {"runs": 9}, "summary": script.summarize(runs)}
    assert "## The ablation, step by step" in script.markdown(results)
