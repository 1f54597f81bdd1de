"""Distillation inside a fit: terms from the cache, the teacher never built, no LiDAR read, each term
learnable (overfit on one batch), and start-up checks of the distill config against the cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipelines.config import from_dict
from pipelines.errors import ConfigError
from stxd_cache.store import open_cache
from stxd_train.data import CameraDataset, collate
from stxd_train.distiller import DistillConfig, Distiller
from stxd_train.fit import StudentRunConfig, fit
from stxd_train.students.config import StudentConfig
from stxd_train.students.registry import build_student
from tiny import tiny_student

ALL_TERMS = {"terms": ["cd", "td", "rd", "mse"], "alpha_cd": 0.1, "alpha_td": 1.0, "alpha_rd": 1.0,
             "alpha_mse": 1.0, "k": 2}


def test_cached_fit_never_builds_the_teacher_nor_reads_lidar(tmp_path: Path, synth_root: Path, cache: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import pipelines.lidar
    import stxd_cache.teacher.model

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the teacher or the LiDAR was touched during a cached fit")

    monkeypatch.setattr(stxd_cache.teacher.model.CenterPoint, "__init__", forbidden)
    monkeypatch.setattr(stxd_cache.teacher.model, "build_teacher", forbidden)
    monkeypatch.setattr(pipelines.lidar, "load_points", forbidden)
    monkeypatch.setattr(pipelines.lidar, "load_sweeps", forbidden)
    raw = tiny_student("bevformer")
    raw["distill"] = ALL_TERMS
    raw["train"]["max_steps"] = 2
    out = tmp_path / "run"
    fit(from_dict(StudentRunConfig, raw), dataroot=str(synth_root), version="v1.0-synth", out=out,
        cache=str(cache), device="cpu")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        assert set(line["terms"]) == {"loss_heatmap", "loss_bbox", "loss_cd", "loss_td", "loss_rd", "loss_mse"}
        assert all(v == v and v >= 0 for v in line["terms"].values())
    # The saved student is the student alone: it loads without the adapter.
    saved = torch.load(out / "student.pt", weights_only=True)
    assert not any(k.startswith("adapter") for k in saved["state_dict"]) and saved["adapter"] is not None
    # d_eff of the teacher (cache) and of the run's adapted BEV, in the teacher's channels.
    from stxd_train.diagnose import diagnose

    table = diagnose(cache, runs=[out], split="synth_val", device="cpu")
    channels = open_cache(cache).meta.channels
    assert [row["channels"] for row in table] == [channels, channels]
    assert "adapted BEV" in table[1]["features"] and table[0]["rows"] == 4 * 16 * 16
    assert all(1.0 <= row["d_eff"] <= channels for row in table)


def _distiller(cache: Path, **distill: object) -> Distiller:
    torch.manual_seed(0)
    student = build_student(from_dict(StudentConfig, tiny_student("bevformer")["model"]))
    meta = open_cache(cache).meta
    return Distiller(student=student, cfg=from_dict(DistillConfig, {**ALL_TERMS, **distill}), teacher_grid=meta.grid,
                     teacher_channels=meta.channels, token_grid=meta.token_grid, k_max=meta.k_max)


@pytest.mark.parametrize("terms", [["cd", "td", "rd"], ["mse"]])
def test_each_distillation_term_decreases_when_overfitting_one_batch(terms: list[str], train_index,
                                                                     cache: Path) -> None:
    """STXD's three terms together (and the MSE baseline alone) each fall when one batch is fitted."""
    model = _distiller(cache, terms=terms)
    dataset = CameraDataset(train_index, image_size=(64, 32), grid=model.student.grid, queue=1,
                            cache_path=str(cache))
    batch = collate([dataset[2], dataset[3]])
    assert batch.cache["past_valid"].any() and (batch.cache["count"] > 0).all()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = []
    for _ in range(25):
        losses = model(batch)
        history.append({k: float(v.detach()) for k, v in losses.items()})
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    for name in (f"loss_{t}" for t in terms):
        first, last = history[0][name], min(h[name] for h in history[-5:])
        assert last < 0.8 * first, (name, [round(h[name], 4) for h in history])


def test_distill_config_is_checked_against_the_cache(cache: Path, tmp_path: Path, synth_root: Path) -> None:
    with pytest.raises(ConfigError, match=r"distill.k is 3 but the cache holds 2"):
        _distiller(cache, k=3)
    with pytest.raises(ConfigError, match="does not divide the cache's token grid 4"):
        _distiller(cache, tokens=3)
    with pytest.raises(ConfigError, match="terms"):
        from_dict(DistillConfig, {"terms": ["cd", "kd"]})
    raw = tiny_student("uvtr")
    raw["distill"] = ALL_TERMS
    with pytest.raises(ConfigError, match="need the teacher cache"):
        fit(from_dict(StudentRunConfig, raw), dataroot=str(synth_root), version="v1.0-synth", out=tmp_path / "r",
            device="cpu")


def test_rd_alone_has_no_adapter(cache: Path) -> None:
    model = _distiller(cache, terms=["rd"])
    assert model.adapter is None


def test_sweep_of_two_variants_in_parallel_reads_one_cache(tmp_path: Path, synth_root: Path, cache: Path) -> None:
    """Two tiny variants as 2 concurrent fit processes on the same read-only cache, evaluated, in one table."""
    import yaml

    from pipelines.config import load_config
    from pipelines.nuscenes import SampleIndex
    from stxd_train.diagnose import diagnose
    from stxd_train.sweep import SweepConfig, compare_markdown, run_sweep

    raw = tiny_student("bevformer")
    raw["train"]["max_steps"] = 2
    base = tmp_path / "student.yaml"
    base.write_text(yaml.safe_dump(raw))
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({
        "config": str(base), "seeds": [0], "set": ["train.log_every=1"],
        "variants": [{"name": "baseline"},
                     {"name": "stxd", "set": ["distill.terms=[cd,td,rd]", "distill.alpha_cd=0.1"]}]}))
    before = sorted(p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file())
    rows = run_sweep(load_config(SweepConfig, grid), cache=str(cache), dataroot=str(synth_root),
                     version="v1.0-synth", out=tmp_path / "sweep", parallel=2, progress=False)
    assert [(r["variant"], r["seed"]) for r in rows] == [("baseline", 0), ("stxd", 0)]
    assert all(0.0 <= r["NDS"] <= 1.0 and r["step_time"] > 0 for r in rows)
    table = (tmp_path / "sweep" / "results.md").read_text()
    assert "| baseline | 0 |" in table and "| stxd | 1 |" in table
    saved = yaml.safe_load((tmp_path / "sweep" / "stxd" / "seed0" / "config.yaml").read_text())
    assert saved["distill"]["terms"] == ["cd", "td", "rd"] and saved["cache"] == str(cache)
    stxd_terms = json.loads((tmp_path / "sweep" / "stxd" / "seed0" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"loss_cd", "loss_td", "loss_rd"} <= set(stxd_terms["terms"])
    # The early loss terms are the logged ones (steps 1-2 here), per run.
    logged = [json.loads(line)["terms"] for line in
              (tmp_path / "sweep" / "stxd" / "seed0" / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["early_terms"]["loss_cd"] == pytest.approx((logged[0]["loss_cd"] + logged[1]["loss_cd"]) / 2)
    assert set(rows[0]["early_terms"]) == {"loss_heatmap", "loss_bbox"}
    assert "| stxd | 0 | " in table.split("Loss terms")[1]
    # Read-only: the cache's files are untouched; a second call reuses the finished runs.
    assert sorted(p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()) == before
    again = run_sweep(load_config(SweepConfig, grid), cache=str(cache), dataroot=str(synth_root),
                      version="v1.0-synth", out=tmp_path / "sweep", parallel=2, progress=False)
    assert again == rows
    fit_only = run_sweep(load_config(SweepConfig, grid, ["evaluate=false"]), cache=str(cache),
                         dataroot=str(synth_root), version="v1.0-synth", out=tmp_path / "sweep", progress=False)
    assert [r["NDS"] for r in fit_only] == [None, None]
    assert "| baseline | 0 | – | – |" in (tmp_path / "sweep" / "results.md").read_text()

    # The two runs side by side, and the d_eff of the teacher and of the distilled student's adapted BEV.
    runs = [tmp_path / "sweep" / "baseline" / "seed0", tmp_path / "sweep" / "stxd" / "seed0"]
    side = compare_markdown(runs).splitlines()
    assert side[0].endswith("seed0 (distill: none) | " + f"{runs[1]} (distill: CD+TD+RD) |")
    assert side[2] == f"| NDS | {rows[0]['NDS']:.4f} | {rows[1]['NDS']:.4f} |"
    table = diagnose(cache, runs=runs[1:], split="synth_val", device="cpu")
    channels = open_cache(cache).meta.channels
    assert [r["channels"] for r in table] == [channels, channels]
    assert all(1.0 <= r["d_eff"] <= channels for r in table)
    assert table[1]["rows"] == len(SampleIndex.load(synth_root, "v1.0-synth", ["synth_val"])) * 8 * 8


def test_sweep_resumes_a_run_that_stopped_early_and_refuses_another_config(tmp_path: Path, synth_root: Path,
                                                                           cache: Path) -> None:
    """A run whose student.pt exists but whose last checkpoint is short of `train.max_steps` (rolled back to step 1
    here, or the grid raised `max_steps`) is not taken as done: the sweep resumes it from that checkpoint. A
    finished run is left alone, and a run folder trained with another config is refused."""
    import shutil

    import yaml

    from pipelines.config import load_config
    from pipelines.errors import StxdError
    from stxd_train.sweep import SweepConfig, run_sweep

    raw = tiny_student("bevformer")
    raw["train"].update(max_steps=2, checkpoint_every=1, keep_checkpoints=True)
    base = tmp_path / "student.yaml"
    base.write_text(yaml.safe_dump(raw))
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"config": str(base), "seeds": [0], "evaluate": False,
                                    "variants": [{"name": "baseline"}]}))
    out = tmp_path / "sweep"
    run = out / "baseline" / "seed0"

    def sweep(*overrides: str) -> list[dict]:
        return run_sweep(load_config(SweepConfig, grid, overrides), cache=str(cache), dataroot=str(synth_root),
                         version="v1.0-synth", out=out, progress=False)

    def commands() -> list[str]:
        return [line for line in (run / "sweep.log").read_text().splitlines() if line.startswith("$ ")]

    def last_step() -> int:
        return int(torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"])

    def steps() -> list[int]:
        return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    sweep()
    assert len(commands()) == 1 and "--resume" not in commands()[0] and last_step() == 2
    # Stopped early: the last checkpoint is the one of step 1, the student file still there.
    shutil.copyfile(run / "checkpoints" / "step_000001.pt", run / "checkpoints" / "last.pt")
    written = (run / "student.pt").stat().st_mtime_ns
    sweep()
    assert len(commands()) == 2 and commands()[1].endswith("--resume --set train.seed=0")
    assert last_step() == 2 and steps() == [1, 2] and (run / "student.pt").stat().st_mtime_ns != written
    sweep()   # finished: nothing runs
    assert len(commands()) == 2
    sweep("set=[train.max_steps=3]")   # a longer schedule continues the run
    assert len(commands()) == 3 and "--resume" in commands()[2] and last_step() == 3 and steps() == [1, 2, 3]
    with pytest.raises(StxdError) as refused:
        sweep("set=[train.max_steps=3, optim.lr=0.01]")
    assert str(refused.value) == (
        f"sweep run baseline seed 0: {run / 'config.yaml'} is not the config that the grid gives this run (1 field(s) "
        "differ: optim.lr: run has 0.001, now 0.01); it was trained with another grid, cache or dataset. Move "
        f"{run} away to train it again, or give this sweep another --out")
    assert len(commands()) == 3


def test_sweep_runs_seed_major() -> None:
    from stxd_train.sweep import SweepConfig, Variant, plan, run_order

    cfg = SweepConfig(config="s.yaml", seeds=(0, 1), variants=(Variant(name="a"), Variant(name="b", seeds=(5,))))
    runs = plan(cfg, Path("out"))
    assert [(r.variant, r.seed) for r in runs] == [("a", 0), ("a", 1), ("b", 5)]
    assert [(r.variant, r.seed) for r in run_order(runs)] == [("a", 0), ("b", 5), ("a", 1)]
    assert runs[2].overrides == ("train.seed=5",) and runs[2].out == Path("out/b/seed5")


@pytest.mark.parametrize(("precision", "rtol"), [("fp16", 2e-3), ("int8", 2e-2)])
def test_cached_and_online_losses_agree(precision: str, rtol: float, train_index, synth_root: Path, cache: Path,
                                        teacher_ckpt: Path, tmp_path: Path) -> None:
    """For one batch and one student output, every distillation term from the cache equals the term from the live
    teacher: within fp16 rounding for an fp16 cache, within the documented int8 tolerance (2 %) for int8."""
    import dataclasses

    from stxd_cache.extract import extract
    from stxd_train.fit import build_online_teacher
    from tiny import CACHE, extract_job

    if precision == "int8":
        cache = tmp_path / "int8.zarr"
        extract(extract_job(synth_root, teacher_ckpt, cache, precision="int8"))
    model = _distiller(cache)
    online = build_online_teacher(str(teacher_ckpt), dataclasses.replace(CACHE, precision=precision), 2,
                                  torch.device("cpu"))
    dataset = CameraDataset(train_index, image_size=(64, 32), grid=model.student.grid, queue=1,
                            cache_path=str(cache), lidar=online.frames)
    batch = collate([dataset[2], dataset[3]])
    with torch.no_grad():
        out = model.student.eval()(batch)
        cached = model.distill_terms(out, batch.cache, batch.gt_boxes)
        live = online.records(batch.points)
        recomputed = model.distill_terms(out, live, batch.gt_boxes)
    assert torch.equal(live["past_valid"], batch.cache["past_valid"]) and torch.equal(live["count"],
                                                                                       batch.cache["count"])
    assert set(cached) == {"loss_cd", "loss_td", "loss_rd", "loss_mse"}
    # The loader's per-sample IoU gives the same qualities as computing them in the step.
    from stxd_train.distill import quality_weights

    args = (batch.cache["boxes"], batch.cache["scores"], batch.gt_boxes)
    assert torch.allclose(quality_weights(*args, iou=batch.cache["iou"]), quality_weights(*args), atol=1e-6)
    # Without RD the loader skips the IoU, and RD-free terms are unchanged.
    no_iou = CameraDataset(train_index, image_size=(64, 32), grid=model.student.grid, queue=1, cache_path=str(cache),
                           gt_iou=False)
    plain = collate([no_iou[2], no_iou[3]])
    assert no_iou[2].cache_iou is None and "iou" not in plain.cache
    assert torch.equal(plain.cache["bev"], batch.cache["bev"])
    for name, value in cached.items():
        assert float(recomputed[name]) == pytest.approx(float(value), rel=rtol), name


def test_head_read_at_decodes_the_centre_cell() -> None:
    """π reads the task of the box's class at its centre cell and decodes the box as `decode` does."""
    import math

    from pipelines.grid import BEVGrid
    from stxd_cache.teacher.center_head import CenterHead
    from stxd_cache.teacher.config import DecodeConfig, LossConfig, TargetConfig

    grid = BEVGrid.square(8.0, 8)                   # 2 m cells, cell (col 5, row 2) spans x 2..4, y -4..-2
    head = CenterHead(in_channels=4, tasks=[["car"], ["truck", "construction_vehicle"]], share_conv_channels=4,
                      head_conv_channels=4, num_heatmap_convs=2, target=TargetConfig(), loss=LossConfig(),
                      decode=DecodeConfig(nms="rotated", score_threshold=0.5))
    task_classes = head.task_classes                # car; truck + construction vehicle
    preds = []
    for ids in task_classes:
        p = {"heatmap": torch.full((1, len(ids), 8, 8), -5.0), "reg": torch.zeros(1, 2, 8, 8),
             "height": torch.zeros(1, 1, 8, 8), "dim": torch.zeros(1, 3, 8, 8), "rot": torch.zeros(1, 2, 8, 8),
             "vel": torch.zeros(1, 2, 8, 8)}
        preds.append(p)
    truck = preds[1]
    truck["heatmap"][0, 0, 2, 5] = 2.0
    truck["reg"][0, :, 2, 5] = torch.tensor([0.25, 0.75])
    truck["height"][0, 0, 2, 5] = -1.0
    truck["dim"][0, :, 2, 5] = torch.log(torch.tensor([2.5, 6.0, 3.0]))
    truck["rot"][0, :, 2, 5] = torch.tensor([1.0, 0.0])
    truck["vel"][0, :, 2, 5] = torch.tensor([3.0, -1.0])
    boxes = torch.tensor([[[3.1, -2.9, 0.0, 2.0, 5.0, 3.0, 0.0, 0.0, 0.0],      # truck centre in cell (5, 2)
                           [30.0, 0.0, 0.0, 2.0, 5.0, 3.0, 0.0, 0.0, 0.0]]])   # off the grid
    labels = torch.tensor([[1, 0]])
    student, probs, valid = head.read_at(preds, grid, boxes, labels, torch.ones(1, 2, dtype=torch.bool))
    assert valid.tolist() == [[True, False]]
    expected = [-8 + (5 + 0.25) * 2, -8 + (2 + 0.75) * 2, -1.0, 2.5, 6.0, 3.0, math.pi / 2, 3.0, -1.0]
    assert student[0, 0].tolist() == pytest.approx(expected, abs=1e-5)
    assert probs[0, 0, 1].item() == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item())
    assert probs[0, 0, 0].item() == pytest.approx(torch.sigmoid(torch.tensor(-5.0)).item())
    assert probs[0, 0, 3:].abs().sum() == 0         # classes no task predicts
    decoded = head.decode(preds, grid)[0]           # the one cell above the score threshold
    assert decoded.boxes[0].tolist() == pytest.approx(expected, abs=1e-5)


def test_bev_tokens_match_the_cache_token_order() -> None:
    import numpy as np

    from stxd_cache.schema import pool_tokens
    from stxd_train.distiller import bev_tokens

    bev = torch.randn(2, 3, 8, 8)
    np.testing.assert_allclose(bev_tokens(bev, 4).numpy(), pool_tokens(bev.numpy(), 4), atol=1e-6)
