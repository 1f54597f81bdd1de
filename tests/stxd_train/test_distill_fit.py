"""Distillation inside a fit: terms from the cache, the teacher never built, no LiDAR read, each term
learnable (overfit on one batch), and start-up checks of the distill config against the cache."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from pipelines.config import from_dict
from pipelines.errors import ConfigError
from stxd_cache.store import open_cache
from stxd_train.data import CameraDataset, TeacherBatch, collate
from stxd_train.distiller import DistillConfig, Distiller
from stxd_train.fit import StudentRunConfig, fit, open_training_cache
from stxd_train.students.config import StudentConfig
from stxd_train.students.registry import build_student
from tiny import tiny_student

ALL_TERMS = {"terms": ["cd", "td", "rd", "mse"], "alpha_cd": 0.1, "alpha_td": 1.0, "alpha_rd": 1.0,
             "alpha_mse": 1.0, "k": 2}
# The tiny teacher is untrained: none of its boxes lies on a GT box of its class, and RD is 0 with the class-aware
# matching. The class-blind matching keeps two boxes of samples 2 and 3 (one of them turned by more than 90°);
# `test_rd_learns_from_a_teacher_that_matches_the_gt` covers the default matching.
BLIND_RD = {"rd_class_aware": False, "rd_drop_flipped": False}


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
    assert [row["channels"] for row in (table[0], table[2])] == [channels, channels] and len(table) == 3
    assert "adapted BEV" in table[2]["features"] and table[0]["rows"] == 4 * 16 * 16
    assert all(1.0 <= row["d_eff"] <= row["channels"] for row in table)


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
    model = _distiller(cache, terms=terms, **BLIND_RD)
    dataset = CameraDataset(train_index, image_size=(64, 32), grid=model.student.grid, queue=1,
                            cache=open_training_cache(cache, grid=model.student.grid), gt_match=model.cfg.gt_match)
    batch = collate([dataset[2], dataset[3]])
    assert batch.cache.past_valid.any() and (batch.cache.count > 0).all()
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


def test_rd_on_a_cache_without_teacher_boxes_is_refused(tmp_path: Path, synth_root: Path) -> None:
    """A teacher that decodes nothing leaves RD at 0 for every step: fit refuses it before training."""
    from stxd_cache.extract import extract
    from tiny import extract_job, tiny_teacher_checkpoint

    teacher = tiny_teacher_checkpoint(tmp_path / "teacher.pt", score_threshold=0.999)
    empty = tmp_path / "empty.zarr"
    extract(extract_job(synth_root, teacher, empty))
    assert not open_cache(empty).box_counts().any()
    raw = tiny_student("bevformer")
    raw["distill"] = ALL_TERMS
    with pytest.raises(ConfigError) as caught:
        fit(from_dict(StudentRunConfig, raw), dataroot=str(synth_root), version="v1.0-synth", out=tmp_path / "r",
            cache=str(empty), device="cpu")
    assert str(caught.value).startswith(f"distill.terms has rd, but the cache {empty} holds no teacher box for any "
                                        "of the 8 training samples")
    assert not (tmp_path / "r" / "checkpoints").exists()
    raw["distill"] = {**ALL_TERMS, "terms": ["cd", "td"]}
    raw["train"]["max_steps"] = 1
    fit(from_dict(StudentRunConfig, raw), dataroot=str(synth_root), version="v1.0-synth", out=tmp_path / "r2",
        cache=str(empty), device="cpu")


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
    assert side[0] == "| synth_val | baseline/seed0 (none) | stxd/seed0 (CD+TD+RD) |"
    delta = rows[1]["NDS"] - rows[0]["NDS"]
    assert side[2] == f"| NDS | {rows[0]['NDS']:.4f} | {rows[1]['NDS']:.4f} ({delta:+.4f}) |"
    assert side[-1] == f"In brackets: the difference to baseline/seed0. Runs: baseline/seed0 = {runs[0]}; " \
                       f"stxd/seed0 = {runs[1]}."
    table = diagnose(cache, runs=runs[1:], split="synth_val", device="cpu")
    channels = open_cache(cache).meta.channels
    assert [r["channels"] for r in (table[0], table[2])] == [channels, channels] and len(table) == 3
    assert all(1.0 <= r["d_eff"] <= r["channels"] for r in table)
    assert table[2]["rows"] == len(SampleIndex.load(synth_root, "v1.0-synth", ["synth_val"])) * 8 * 8


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


@pytest.mark.parametrize(("precision", "rtol"), [("fp16", 1e-4), ("int8", 2e-2)])
def test_cached_and_online_losses_agree(precision: str, rtol: float, train_index, synth_root: Path, cache: Path,
                                        teacher_ckpt: Path, tmp_path: Path) -> None:
    """For one batch and one student output, every distillation term from the cache equals the term from the live
    teacher: once the live features are rounded to float16 as an fp16 cache stores them (TD's sharp softmax turns
    that rounding alone into up to 1 % of its value), and within the documented int8 tolerance (2 %) for int8."""

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
                            cache=open_training_cache(cache, grid=model.student.grid), lidar=online.frames)
    batch = collate([dataset[2], dataset[3]])
    with torch.no_grad():
        out = model.student.eval()(batch)
        cached = model.distill_terms(out, batch.cache, batch.gt_boxes, batch.gt_labels)
        live = online.records(batch.points)
        if precision == "fp16":   # the cache's storage rounding, applied to the live record
            live = dataclasses.replace(live, **{k: getattr(live, k).half().float()
                                                for k in ("bev", "tokens", "past_tokens", "probs")})
        recomputed = model.distill_terms(out, live, batch.gt_boxes, batch.gt_labels)
    assert torch.equal(live.past_valid, batch.cache.past_valid) and torch.equal(live.count, batch.cache.count)
    assert set(cached) == {"loss_cd", "loss_td", "loss_rd", "loss_mse"}
    # The loader's per-sample IoU gives the same qualities as computing them in the step.
    from stxd_train.distill import quality_weights

    args = (batch.cache.boxes, batch.cache.scores, batch.gt_boxes)
    labels = {"teacher_labels": batch.cache.labels, "gt_labels": batch.gt_labels}
    assert torch.allclose(quality_weights(*args, iou=batch.cache.iou), quality_weights(*args, **labels), atol=1e-6)
    # Without RD the loader skips the IoU, and RD-free terms are unchanged.
    no_iou = CameraDataset(train_index, image_size=(64, 32), grid=model.student.grid, queue=1,
                           cache=open_training_cache(cache, grid=model.student.grid), gt_iou=False)
    plain = collate([no_iou[2], no_iou[3]])
    assert no_iou[2].cache_iou is None and plain.cache.iou is None
    assert torch.equal(plain.cache.bev, batch.cache.bev)
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

    from stxd_cache.schema import bev_tokens, pool_tokens

    bev = torch.randn(2, 3, 8, 8)
    np.testing.assert_allclose(bev_tokens(bev, 4).numpy(), pool_tokens(bev.numpy(), 4), atol=1e-6)


# ---------------------------------------------------------------- knobs beside the paper's losses


def _batch(train_index, model: Distiller, cache: Path, items: tuple[int, ...] = (2, 3)):
    dataset = CameraDataset(train_index, image_size=(64, 32), grid=model.student.grid, queue=1,
                            cache=open_training_cache(cache, grid=model.student.grid), gt_match=model.cfg.gt_match)
    return collate([dataset[i] for i in items])



def test_warmup_ramps_every_distillation_weight(train_index, cache: Path) -> None:
    assert [DistillConfig(warmup_steps=4).warmup_factor(s) for s in (None, 0, 1, 2, 4, 100)] == [
        1.0, 0.0, 0.25, 0.5, 1.0, 1.0]
    assert DistillConfig().warmup_factor(0) == 1.0
    with pytest.raises(ConfigError, match="warmup_steps"):
        DistillConfig(warmup_steps=-1)
    model = _distiller(cache, warmup_steps=4, **BLIND_RD)
    batch = _batch(train_index, model, cache)
    with torch.no_grad():
        out = model.student.eval()(batch)
        full = model.distill_terms(out, batch.cache, batch.gt_boxes, batch.gt_labels)
        assert all(float(v) > 0 for v in full.values()), full
        for step, factor in ((0, 0.0), (1, 0.25), (2, 0.5), (4, 1.0), (9, 1.0)):
            model.step = step
            ramped = model.distill_terms(out, batch.cache, batch.gt_boxes, batch.gt_labels)
            for name, value in full.items():
                assert float(ramped[name]) == pytest.approx(factor * float(value), rel=1e-6, abs=1e-12), (step, name)


def test_warmup_step_survives_a_resume(tmp_path: Path, synth_root: Path, cache: Path) -> None:
    """The logged terms of step 2 are the same whether the run went on or was resumed from step 1: the hook gives the
    distiller the trainer's restored step, and the first step trains without distillation."""
    import shutil

    raw = tiny_student("bevformer")
    raw["distill"] = {**ALL_TERMS, "terms": ["cd", "mse"], "warmup_steps": 2}
    raw["train"].update(max_steps=2, checkpoint_every=1, keep_checkpoints=True)
    out = tmp_path / "run"
    cfg = from_dict(StudentRunConfig, raw)
    fit(cfg, dataroot=str(synth_root), version="v1.0-synth", out=out, cache=str(cache), device="cpu")

    def terms() -> list[dict[str, float]]:
        return [json.loads(line)["terms"] for line in (out / "metrics.jsonl").read_text().splitlines()]

    first = terms()
    assert first[0]["loss_cd"] == 0.0 and first[0]["loss_mse"] == 0.0       # factor 0 at the first step
    assert first[1]["loss_cd"] > 0 and first[1]["loss_mse"] > 0             # factor 1/2 at the second
    shutil.copyfile(out / "checkpoints" / "step_000001.pt", out / "checkpoints" / "last.pt")
    fit(cfg, dataroot=str(synth_root), version="v1.0-synth", out=out, cache=str(cache), device="cpu", resume=True)
    again = terms()
    assert len(again) == 2 and again[1] == pytest.approx(first[1], rel=1e-5)


def test_feature_terms_take_the_foreground_weights(train_index, cache: Path) -> None:
    from pipelines.grid import resample
    from stxd_cache.schema import bev_tokens
    from stxd_train.distill import correlation_loss, feature_mse, temporal_loss

    terms = {"terms": ["cd", "td", "mse"], "alpha_cd": 1.0}
    plain = _distiller(cache, fg_mask="none", **terms)
    batch = _batch(train_index, plain, cache)
    with torch.no_grad():
        out = plain.student.eval()(batch)
        reference = plain.distill_terms(out, batch.cache, batch.gt_boxes)
        assert plain.cell_weights(batch.cache, batch.gt_boxes) is None
        for mask in ("gt", "teacher"):
            model = _distiller(cache, fg_mask=mask, fg_background_weight=0.1, **terms)
            model.load_state_dict(plain.state_dict())
            weights = model.cell_weights(batch.cache, batch.gt_boxes)                    # (B, 8, 8)
            assert weights.shape == (2, 8, 8) and weights.min() == pytest.approx(0.1) and weights.max() <= 1.0
            got = model.distill_terms(out, batch.cache, batch.gt_boxes)
            adapted = model.adapter(out.bev)
            teacher = resample(batch.cache.bev, model.teacher_grid, model.student.grid)
            f, g = (x.permute(0, 2, 3, 1).flatten(0, 2) for x in (teacher, adapted))
            assert float(got["loss_cd"]) == pytest.approx(float(correlation_loss(f, g, 0.005, weights.flatten())))
            assert float(got["loss_mse"]) == pytest.approx(float(feature_mse(teacher, adapted, weights)))
            token_weights = torch.nn.functional.avg_pool2d(weights[:, None], 2).flatten(1)   # 8×8 cells → 4×4 tokens
            expected_td = temporal_loss(batch.cache.tokens, batch.cache.past_tokens[:, :2],
                                        bev_tokens(adapted, 4), batch.cache.past_valid[:, :2], tau=0.1,
                                        weights=token_weights)
            assert float(got["loss_td"]) == pytest.approx(float(expected_td))
            assert all(float(got[k]) != pytest.approx(float(reference[k])) for k in reference), mask
        # GT cells: every GT centre cell has weight 1.
        model = _distiller(cache, fg_mask="gt", **terms)
        weights = model.cell_weights(batch.cache, batch.gt_boxes)
        assert weights.max() == 1.0 and weights.min() == pytest.approx(0.1)
        for b, boxes in enumerate(batch.gt_boxes):
            cells = torch.floor(model.student.grid.world_to_cell(boxes[:, :2]) + 0.5).long()
            assert (weights[b, cells[:, 1], cells[:, 0]] == 1.0).all()
        # A background weight of 1 is the paper's reading.
        flat = _distiller(cache, fg_mask="gt", fg_background_weight=1.0, **terms)
        flat.load_state_dict(plain.state_dict())
        same = flat.distill_terms(out, batch.cache, batch.gt_boxes)
        for name, value in reference.items():
            assert float(same[name]) == pytest.approx(float(value), rel=1e-5), name


def _head_case() -> tuple[Distiller, list[dict[str, torch.Tensor]], torch.Tensor, torch.Tensor]:
    """A distiller over the tiny student, head maps with a hand-set car prediction at cell (col 5, row 2) of the
    8×8 grid (6.4 m cells), and the GT car there."""
    from pipelines.grid import BEVGrid

    torch.manual_seed(0)
    student = build_student(from_dict(StudentConfig, tiny_student("uvtr")["model"]))
    model = Distiller(student=student, cfg=from_dict(DistillConfig, {"terms": ["rd"]}),
                      teacher_grid=BEVGrid.square(25.6, 16), teacher_channels=8, token_grid=4, k_max=2)
    preds = [{name: torch.zeros(1, ch, 8, 8) for name, ch in (("heatmap", len(ids)), ("reg", 2), ("height", 1),
                                                               ("dim", 3), ("rot", 2), ("vel", 2))}
             for ids in student.head.task_classes]
    car = preds[0]
    car["heatmap"][0, 0, 2, 5] = 1.0
    car["reg"][0, :, 2, 5] = torch.tensor([0.3, 0.6])
    car["height"][0, 0, 2, 5] = -0.5
    car["dim"][0, :, 2, 5] = torch.log(torch.tensor([2.0, 4.0, 1.5]))
    car["rot"][0, :, 2, 5] = torch.tensor([0.3 * math.sin(0.7), 0.3 * math.cos(0.7)])   # right yaw, norm 0.3
    car["vel"][0, :, 2, 5] = torch.tensor([3.0, -1.0])
    for p in preds:
        for t in p.values():
            t.requires_grad_(True)
    gt = torch.tensor([[9.0, -8.0, -1.0, 1.8, 4.4, 1.6, 0.7, 2.0, 0.5]])                 # in cell (5, 2)
    return model, preds, gt, torch.tensor([0])


def _record(boxes: torch.Tensor, labels: torch.Tensor, probs: torch.Tensor) -> TeacherBatch:
    """A one-sample teacher record holding `boxes` (M, 9) with score 1 and one padding slot (blank features: RD
    reads only the boxes)."""
    m = len(boxes)
    return TeacherBatch(bev=torch.zeros(1, 8, 4, 4), tokens=torch.zeros(1, 16, 8),
                        past_tokens=torch.zeros(1, 2, 16, 8), past_valid=torch.zeros(1, 2, dtype=torch.bool),
                        boxes=torch.cat([boxes, torch.zeros(1, 9)])[None],
                        labels=torch.cat([labels, torch.tensor([-1])])[None],
                        scores=torch.cat([torch.ones(m), torch.zeros(1)])[None],
                        probs=torch.cat([probs, torch.zeros(1, probs.shape[1])])[None], count=torch.tensor([m]))


def test_rd_in_the_head_space_is_the_head_box_loss() -> None:
    """With the teacher box on its GT box, encoded RD is the head's own `loss_bbox` for that box (code_weights ×
    bbox_weight, offsets in cells, the raw sin and cos); the decoded reading is the paper's formula."""
    from pipelines.boxes import encode_boxes
    from stxd_train.students.common import StudentOutput

    model, preds, gt, gt_labels = _head_case()
    head, grid = model.student.head, model.student.grid
    out = StudentOutput(bev=torch.zeros(1, 8, 8, 8), preds=preds)
    boxes, probs, _ = head.read_at(preds, grid, gt[None], gt_labels[None], torch.ones(1, 1, dtype=torch.bool))
    record = _record(gt, gt_labels, probs[0].detach())                         # KL = 0: only the boxes differ
    rd = model.response_term(out, record, [gt], [gt_labels])
    bbox = head.loss(preds, head.build_targets([gt], [gt_labels], grid))["loss_bbox"]
    assert rd.item() == pytest.approx(bbox.item(), rel=1e-5) and rd.item() > 0.5
    rd.backward()
    assert preds[0]["rot"].grad[0, :, 2, 5].abs().sum() > 0                    # the yaw's norm is taught
    assert preds[0]["vel"].grad[0, :, 2, 5].abs().tolist() == pytest.approx([0.25 * 0.2] * 2)

    # The paper's reading: decoded boxes re-encoded (the atan2 round trip hides the sin/cos norm), unit weights.
    paper = Distiller(student=model.student, cfg=from_dict(DistillConfig, {"terms": ["rd"], "rd_space": "decoded"}),
                      teacher_grid=model.teacher_grid, teacher_channels=8, token_grid=4, k_max=2)
    decoded = paper.response_term(out, record, [gt], [gt_labels])
    expected = (encode_boxes(boxes[0, 0]) - encode_boxes(gt[0])).abs().sum()
    assert decoded.item() == pytest.approx(expected.item(), rel=1e-5)
    assert (encode_boxes(boxes[0, 0]) - encode_boxes(gt[0]))[6:8].abs().max() < 1e-5


def test_rd_quality_is_class_aware_and_drops_flipped_boxes() -> None:
    from stxd_train.students.common import StudentOutput

    model, preds, gt, gt_labels = _head_case()
    out = StudentOutput(bev=torch.zeros(1, 8, 8, 8), preds=preds)
    flipped = gt.clone()
    flipped[0, 6] += math.pi
    probs = torch.full((1, 10), 0.5)
    same = model.response_term(out, _record(gt, gt_labels, probs), [gt], [gt_labels])
    assert same.item() > 0
    # A truck on the car, and the car turned by 180° (BEV IoU 1): quality 0, so RD is 0.
    for boxes, labels in ((gt, torch.tensor([1])), (flipped, gt_labels)):
        assert model.response_term(out, _record(boxes, labels, probs), [gt], [gt_labels]).item() == 0.0
    blind = Distiller(student=model.student, cfg=from_dict(DistillConfig, {"terms": ["rd"], **BLIND_RD}),
                      teacher_grid=model.teacher_grid, teacher_channels=8, token_grid=4, k_max=2)
    assert blind.response_term(out, _record(flipped, gt_labels, probs), [gt], [gt_labels]).item() > same.item()
    with pytest.raises(ValueError, match="needs teacher_labels and gt_labels"):
        model.response_term(out, _record(gt, gt_labels, probs), [gt], None)


def test_rd_learns_from_a_teacher_that_matches_the_gt(train_index, cache: Path) -> None:
    """With the default matching, RD falls when one batch is fitted against a record whose boxes are the GT."""
    model = _distiller(cache, terms=["rd"])
    batch = _batch(train_index, model, cache)
    m = batch.cache.boxes.shape[1]
    boxes, labels = torch.zeros(2, m, 9), torch.full((2, m), -1)
    for b, (gt, gt_labels) in enumerate(zip(batch.gt_boxes, batch.gt_labels, strict=True)):
        boxes[b, :len(gt)], labels[b, :len(gt)] = gt, gt_labels
    record = dataclasses.replace(batch.cache, iou=None, boxes=boxes, labels=labels, scores=(labels >= 0).float() * 0.9,
                                 probs=torch.nn.functional.one_hot(labels.clamp(min=0), 10).float() * 0.9,
                                 count=torch.tensor([len(g) for g in batch.gt_boxes]))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = []
    for _ in range(25):
        out = model.student(batch)
        loss = model.distill_terms(out, record, batch.gt_boxes, batch.gt_labels)["loss_rd"]
        history.append(float(loss.detach()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert history[0] > 0 and min(history[-5:]) < 0.8 * history[0], [round(h, 4) for h in history]


def test_rd_options_agree_between_cached_and_online_records(train_index, cache: Path, teacher_ckpt: Path) -> None:
    """The class-blind RD (which keeps boxes of the tiny teacher) and the teacher-heatmap weights give the same terms
    from the cache as from the live teacher."""

    from stxd_train.fit import build_online_teacher
    from tiny import CACHE

    model = _distiller(cache, terms=["rd", "mse", "cd"], fg_mask="teacher", **BLIND_RD)
    online = build_online_teacher(str(teacher_ckpt), dataclasses.replace(CACHE, precision="fp16"), 2,
                                  torch.device("cpu"))
    dataset = CameraDataset(train_index, image_size=(64, 32), grid=model.student.grid, queue=1,
                            cache=open_training_cache(cache, grid=model.student.grid), lidar=online.frames,
                            gt_match=model.cfg.gt_match)
    batch = collate([dataset[2], dataset[3]])
    with torch.no_grad():
        out = model.student.eval()(batch)
        cached = model.distill_terms(out, batch.cache, batch.gt_boxes, batch.gt_labels)
        live = online.records(batch.points)
        recomputed = model.distill_terms(out, live, batch.gt_boxes, batch.gt_labels)
        torch.testing.assert_close(model.cell_weights(live, batch.gt_boxes),
                                   model.cell_weights(batch.cache, batch.gt_boxes), rtol=0, atol=2e-3)
    assert cached["loss_rd"] > 0
    for name, value in cached.items():
        assert float(recomputed[name]) == pytest.approx(float(value), rel=2e-3), name
