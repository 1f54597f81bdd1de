"""Paired statistics of a sweep: hand-computed t intervals, the frame bootstrap, the paired view of `sweep` and
`compare`, and the premise of pairing: two fits of one seed differ only in their loss."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipelines.config import from_dict
from pipelines.errors import ConfigError
from stxd_train.stats import (
    frame_bootstrap,
    paired_comparison,
    paired_markdown,
    paired_summary,
    paired_t_interval,
    t_quantile,
)
from tiny import tiny_student

T_975_1DOF = 12.706   # Student's t, 0.975 quantile, 1 degree of freedom (tables)


def test_paired_statistics_by_hand() -> None:
    """Two variants x two seeds: NDS per seed -> differences, their mean and the 95% paired-t interval."""
    plain = {0: 0.300, 1: 0.320}
    stxd = {0: 0.350, 1: 0.340, 7: 0.9}   # seed 7 has no partner: left out
    diffs = [0.350 - 0.300, 0.340 - 0.320]   # 0.05, 0.02
    mean = (diffs[0] + diffs[1]) / 2   # 0.035
    std = math.sqrt(((diffs[0] - mean) ** 2 + (diffs[1] - mean) ** 2) / (2 - 1))   # 0.0212132
    half = T_975_1DOF * std / math.sqrt(2)   # 12.706 * 0.015 = 0.19059
    summary = paired_summary(plain, stxd)
    assert summary["seeds"] == [0, 1] and summary["n"] == 2
    assert summary["differences"] == pytest.approx({0: 0.05, 1: 0.02}, abs=1e-12)
    assert summary["mean"] == pytest.approx(0.035, abs=1e-12) and summary["std"] == pytest.approx(std, abs=1e-12)
    assert summary["ci_low"] == pytest.approx(mean - half, abs=1e-4)   # 12.706 is the table's rounding
    assert summary["ci_high"] == pytest.approx(mean + half, abs=1e-4)
    assert (summary["ci_low"], summary["ci_high"]) == pytest.approx((-0.15559, 0.22559), abs=1e-4)
    assert t_quantile(0.975, 1) == pytest.approx(T_975_1DOF, abs=1e-3)
    assert paired_t_interval(diffs) == (summary["mean"], summary["ci_low"], summary["ci_high"])
    # Three seeds: t(0.975, 2) = 4.303.
    m, _, high = paired_t_interval([0.01, 0.03, 0.02])
    assert m == pytest.approx(0.02) and high - m == pytest.approx(4.303 * 0.01 / math.sqrt(3), abs=1e-5)
    assert paired_t_interval([0.01, 0.03, 0.02], confidence=0.9)[2] < high
    # Too few seeds: NaN bounds.
    one = paired_t_interval([0.04])
    assert one[0] == 0.04 and math.isnan(one[1]) and math.isnan(one[2])
    assert all(math.isnan(v) for v in paired_t_interval([]))
    lone = paired_summary({0: 0.3}, {0: 0.31, 1: 0.5})
    assert lone["n"] == 1 and math.isnan(lone["std"]) and math.isnan(lone["ci_low"])


class _Frames:
    """A stand-in run for the bootstrap: its metric is the count-weighted mean of a per-frame value."""

    def __init__(self, values: dict[str, float]) -> None:
        self.tokens = np.array(list(values))
        self.values = np.array(list(values.values()))
        self.calls = 0

    def score(self, counts: np.ndarray | None = None) -> dict[str, float]:
        self.calls += 1
        w = np.ones(len(self.values)) if counts is None else counts
        return {"NDS": float(w @ self.values / w.sum()), "mAP": float(w @ self.values / w.sum()) / 2}


def test_frame_bootstrap_resamples_every_run_alike() -> None:
    rng = np.random.default_rng(3)
    tokens = [f"t{i}" for i in range(30)]
    base = {s: dict(zip(tokens, rng.uniform(0, 1, 30), strict=True)) for s in (0, 1)}
    # The variant of seed 0 equals its reference frame by frame, listed in another order: whatever the resample,
    # the difference is 0 only if both runs get the same one.
    same = {t: base[0][t] for t in reversed(tokens)}
    boot = frame_bootstrap({0: _Frames(base[0])}, {0: _Frames(same)}, draws=200)
    assert boot["NDS"]["low"] == pytest.approx(0.0, abs=1e-12) and boot["NDS"]["draws"] == 200
    assert boot["NDS"]["high"] == pytest.approx(0.0, abs=1e-12)
    # A constant gain of 0.01 on every frame of seed 0 and of 0.03 on seed 1: every draw's mean is 0.02.
    variant = {0: _Frames({t: v + 0.01 for t, v in base[0].items()}),
               1: _Frames({t: v + 0.03 for t, v in base[1].items()})}
    boot = frame_bootstrap({0: _Frames(base[0]), 1: _Frames(base[1])}, variant, draws=100)
    assert boot["NDS"]["low"] == pytest.approx(0.02) and boot["NDS"]["high"] == pytest.approx(0.02)
    assert boot["mAP"]["mean"] == pytest.approx(0.01) and boot["NDS"]["seeds"] == 2
    # A gain on half the frames: the interval is a spread around the full-data difference, reproducible.
    half = {t: v + (0.1 if i % 2 else 0.0) for i, (t, v) in enumerate(base[0].items())}
    first = frame_bootstrap({0: _Frames(base[0])}, {0: _Frames(half)}, draws=400, seed=5)
    assert first == frame_bootstrap({0: _Frames(base[0])}, {0: _Frames(half)}, draws=400, seed=5)
    assert 0.02 < first["NDS"]["low"] < 0.05 < first["NDS"]["high"] < 0.08
    other = _Frames(dict(list(base[0].items())[:-1]))
    from pipelines.matches import MatchesError

    with pytest.raises(MatchesError, match="different frames"):
        frame_bootstrap({0: _Frames(base[0])}, {0: other}, draws=2)


def _scored_run(folder: Path, nusc, val_index, *, seed: int, noise: float) -> Path:
    """A run folder as `stxd-train eval` leaves it, scored on noisy GT instead of a trained student."""
    from pipelines.evaluation import Detections, build_submission, evaluate

    rng = np.random.default_rng(seed)
    predictions = {}
    for sample in val_index:
        keep = sample.gt.num_lidar_pts > 0
        boxes = sample.gt.boxes[keep].copy()
        boxes[:, :2] += rng.normal(0.0, noise, (len(boxes), 2))
        predictions[sample.token] = Detections(boxes=boxes, scores=rng.uniform(0.1, 1.0, len(boxes)),
                                               labels=sample.gt.labels[keep])
    metrics = evaluate(nusc, build_submission(val_index, predictions), "synth_val", folder / "eval" / "synth_val")
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "config.yaml").write_text(yaml.safe_dump({"kind": "student", "train": {"seed": seed},
                                                        "distill": {"terms": []}}))
    return folder


def test_compare_pairs_runs_by_seed_and_bootstraps_their_frames(tmp_path: Path, nusc, val_index) -> None:
    """`compare --reference`: variants from the run folders' names, pairs from train.seed, the t interval of the
    per-seed differences and a frame-bootstrap interval re-scored from each run's matches.npz."""
    from stxd_train.sweep import compare_markdown, run_variant

    runs = {(v, s): _scored_run(tmp_path / v / f"seed{s}", nusc, val_index, seed=s, noise=noise)
            for v, noise in (("plain", 1.2), ("stxd", 0.6)) for s in (0, 1)}
    metrics = {k: json.loads((run / "metrics.json").read_text()) for k, run in runs.items()}
    assert run_variant(runs["stxd", 1]) == "stxd" and run_variant(tmp_path / "stxd") == "stxd"
    rows = [{"variant": v, "seed": s, "NDS": m["NDS"], "mAP": m["mAP"], "run": str(runs[v, s])}
            for (v, s), m in metrics.items()]
    [entry] = paired_comparison(rows, reference="plain", draws=300)
    assert entry["variant"] == "stxd" and entry["seeds"] == [0, 1]
    for key in ("NDS", "mAP"):
        diffs = [metrics["stxd", s][key] - metrics["plain", s][key] for s in (0, 1)]
        mean = (diffs[0] + diffs[1]) / 2
        half = T_975_1DOF * abs(diffs[0] - diffs[1]) / math.sqrt(2) / math.sqrt(2)
        got = entry[key]
        assert got["differences"] == pytest.approx(diffs, abs=1e-12) and got["mean"] == pytest.approx(mean)
        assert (got["ci_low"], got["ci_high"]) == pytest.approx((mean - half, mean + half), abs=1e-4)
        assert got["bootstrap_draws"] == 300 and got["bootstrap_low"] <= got["bootstrap_high"]
        # The full-data difference lies inside the frame-resampling interval, which is not degenerate.
        assert got["bootstrap_low"] < mean < got["bootstrap_high"]
    assert entry["NDS"]["mean"] > 0   # less noise scores better
    # A variant paired with a copy of itself differs by exactly 0 in every draw.
    shutil.copytree(runs["plain", 0], tmp_path / "copy" / "seed0")
    [self_pair] = paired_comparison([rows[0], {**rows[0], "variant": "copy", "run": str(tmp_path / "copy/seed0")}],
                                    reference="plain", draws=50)
    assert self_pair["NDS"]["bootstrap_low"] == self_pair["NDS"]["bootstrap_high"] == 0.0
    # A run scored before match data was written: t interval only, and the table says how to get the bootstrap.
    (tmp_path / "copy" / "seed0" / "eval" / "synth_val" / "matches.npz").unlink()
    [old] = paired_comparison([rows[0], {**rows[0], "variant": "copy", "run": str(tmp_path / "copy/seed0")}],
                              reference="plain", draws=50)
    assert old["NDS"]["bootstrap_low"] is None and old["without_matches"] == [str(tmp_path / "copy/seed0")]
    assert "score it again with `stxd-train eval --run RUN`" in "\n".join(paired_markdown([old]))

    text = compare_markdown([runs["plain", 0], runs["plain", 1], runs["stxd", 0], runs["stxd", 1]],
                            reference=str(runs["plain", 1]), draws=300)
    nds = entry["NDS"]
    assert (f"| stxd | NDS | 2 | 0: {nds['differences'][0]:+.4f}, 1: {nds['differences'][1]:+.4f} | "
            f"{nds['mean']:+.4f} | [{nds['ci_low']:+.4f}, {nds['ci_high']:+.4f}] | "
            f"[{nds['bootstrap_low']:+.4f}, {nds['bootstrap_high']:+.4f}] |") in text
    commit = metrics["plain", 0]["source"]["commit"]
    assert "| commit | " + ("–" if commit is None else commit[:10]) in text
    from click.testing import CliRunner

    from stxd_train.cli import main

    printed = CliRunner().invoke(main, ["compare", *(a for run in runs.values() for a in ("--run", str(run))),
                                        "--reference", "plain", "--draws", "300"])
    assert printed.exit_code == 0, printed.output
    assert printed.output == text + "\n"
    with pytest.raises(ConfigError, match="neither one of the variants"):
        compare_markdown([runs["plain", 0], runs["stxd", 0]], reference="mse")
    with pytest.raises(ConfigError, match="two runs of seed 0"):
        paired_comparison([*rows, {**rows[0], "run": "elsewhere"}], reference="plain")


def _probe_fit(raw: dict, monkeypatch: pytest.MonkeyPatch, **fit_args: object) -> dict[str, list]:
    """Fit `raw` and record what a seed decides: the student's initial weights, and per step the sample tokens,
    the input images (augmentation included), the augmentation draws and the global torch RNG state."""
    import stxd_train.data
    import stxd_train.students.registry
    from stxd_train.fit import StudentRunConfig, fit

    seen: dict[str, list] = {"init": [], "tokens": [], "images": [], "views": [], "rng": []}
    build, collate, draw_view = (stxd_train.students.registry.build_student, stxd_train.data.collate,
                                 stxd_train.data._draw_view)

    def recording_build(cfg):
        student = build(cfg)
        seen["init"].append({k: v.clone() for k, v in student.state_dict().items()})
        return student

    def recording_collate(samples):
        batch = collate(samples)
        seen["tokens"].append(list(batch.tokens))
        seen["images"].append(batch.images.clone())
        seen["rng"].append(torch.get_rng_state())
        return batch

    def recording_view(cfg, rng):
        view = draw_view(cfg, rng)
        seen["views"].append(view)
        return view

    monkeypatch.setattr(stxd_train.students.registry, "build_student", recording_build)
    monkeypatch.setattr(stxd_train.data, "collate", recording_collate)
    monkeypatch.setattr(stxd_train.data, "_draw_view", recording_view)
    fit(from_dict(StudentRunConfig, raw), version="v1.0-synth", device="cpu", **fit_args)
    monkeypatch.undo()
    return seen


def test_one_seed_gives_a_plain_and_a_distilled_fit_the_same_start_data_and_draws(
        tmp_path: Path, synth_root: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The premise of the paired comparison: with the same train.seed, a fit without distillation and one with
    it (whose adapter is built, and whose cache records are read) start from the same student weights and see
    the same samples, step by step, with the same augmentation, and the same RNG stream at every step."""
    raw = tiny_student("bevformer")
    raw["train"].update(max_steps=4, seed=3)
    raw["data"]["augment"] = {"scale": [0.8, 1.2], "brightness": 0.3, "contrast": 0.2}
    distilled = {**raw, "distill": {"terms": ["cd", "td", "rd"], "alpha_cd": 0.1, "k": 2}}
    plain = _probe_fit(raw, monkeypatch, dataroot=str(synth_root), out=tmp_path / "plain")
    stxd = _probe_fit(distilled, monkeypatch, dataroot=str(synth_root), out=tmp_path / "stxd", cache=str(cache))
    assert len(plain["init"]) == len(stxd["init"]) == 1
    assert plain["init"][0].keys() == stxd["init"][0].keys()
    assert all(torch.equal(plain["init"][0][k], stxd["init"][0][k]) for k in plain["init"][0])
    assert len(plain["tokens"]) == 4 and plain["tokens"] == stxd["tokens"]
    assert len({t for step in plain["tokens"] for t in step}) > 2   # shuffled over the split, not one batch
    assert plain["views"] == stxd["views"] and len({v[0] for v in plain["views"]}) > 2   # drawn, and alike
    assert all(torch.equal(a, b) for a, b in zip(plain["images"], stxd["images"], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(plain["rng"], stxd["rng"], strict=True))
    # Another seed changes all of them.
    raw["train"]["seed"] = 4
    other = _probe_fit(raw, monkeypatch, dataroot=str(synth_root), out=tmp_path / "other")
    assert other["tokens"] != plain["tokens"] and other["views"] != plain["views"]
    assert not torch.equal(next(iter(other["init"][0].values())), next(iter(plain["init"][0].values())))


@pytest.mark.slow
def test_sweep_with_a_reference_tables_paired_differences(tmp_path: Path, synth_root: Path, cache: Path) -> None:
    """A grid with `reference`: results.json and results.md carry, per other variant, the per-seed differences,
    their t interval and a frame-bootstrap interval; every row names the commit it was scored with; a run scored
    before match data existed is scored again, not trained again."""
    from pipelines.config import load_config
    from stxd_train.sweep import SweepConfig, run_sweep

    raw = tiny_student("bevformer")
    raw["train"]["max_steps"] = 1
    base = tmp_path / "student.yaml"
    base.write_text(yaml.safe_dump(raw))
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({
        "config": str(base), "seeds": [0, 1], "reference": "plain", "bootstrap_draws": 200,
        "variants": [{"name": "plain"},
                     {"name": "stxd", "set": ["distill.terms=[cd,td,rd]", "distill.alpha_cd=0.1"]}]}))
    with pytest.raises(ConfigError, match="`reference`: found 'mse', expected one of the variants"):
        load_config(SweepConfig, grid, ["reference=mse"])
    out = tmp_path / "sweep"

    def sweep() -> list[dict]:
        return run_sweep(load_config(SweepConfig, grid), cache=str(cache), dataroot=str(synth_root),
                         version="v1.0-synth", out=out, parallel=2, progress=False)

    rows = sweep()
    results = json.loads((out / "results.json").read_text())
    assert results["reference"] == "plain" and results["bootstrap"]["draws"] == 200
    [entry] = results["paired"]
    nds = {(r["variant"], r["seed"]): r["NDS"] for r in rows}
    diffs = [nds["stxd", s] - nds["plain", s] for s in (0, 1)]
    assert entry["variant"] == "stxd" and entry["seeds"] == [0, 1]
    assert entry["NDS"]["differences"] == pytest.approx(diffs, abs=1e-12)
    mean, half = sum(diffs) / 2, T_975_1DOF * abs(diffs[0] - diffs[1]) / 2
    assert entry["NDS"]["mean"] == pytest.approx(mean, abs=1e-12)
    assert (entry["NDS"]["ci_low"], entry["NDS"]["ci_high"]) == pytest.approx((mean - half, mean + half), abs=1e-4)
    boot = entry["mAP"]
    assert boot["bootstrap_draws"] == 200 and boot["bootstrap_low"] <= boot["bootstrap_high"]
    for row in results["rows"]:
        run_metrics = json.loads((Path(row["run"]) / "metrics.json").read_text())
        assert row["commit"] == run_metrics["source"]["commit"] and "dirty" in row
        assert (Path(row["run"]) / "eval" / "synth_val" / "matches.npz").is_file()
    table = (out / "results.md").read_text()
    assert "Paired differences to plain" in table and f"| stxd | NDS | 2 | 0: {diffs[0]:+.4f}, " in table
    # A run scored without match data is scored again (its eval only), and the table is the same.
    (out / "stxd" / "seed1" / "eval" / "synth_val" / "matches.npz").unlink()
    assert sweep() == rows
    log = (out / "stxd" / "seed1" / "sweep.log").read_text()
    assert [line.split()[4] for line in log.splitlines() if line.startswith("$ ")] == ["fit", "eval", "eval"]
    assert json.loads((out / "results.json").read_text())["paired"] == results["paired"]


def test_short_names_tell_runs_apart() -> None:
    from stxd_train.sweep import short_names

    assert short_names(["out/demo/bevformer", "out/demo/bevformer_stxd"]) == ["bevformer", "bevformer_stxd"]
    assert short_names(["s/plain/seed0", "s/stxd/seed0", "s/stxd/seed1"]) == ["plain/seed0", "stxd/seed0", "stxd/seed1"]
    assert short_names(["a/x/run", "b/x/run"]) == ["a/x/run", "b/x/run"]
