"""`stxd-train diagnose`: d_eff of covariance and correlation spectra on features with known spectra, the cell
sampling, the per-class orientation section read from metrics.json, and one run on the tiny cache with a 2-step
distilled student."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy.linalg import hadamard

from pipelines.config import from_dict
from pipelines.errors import ConfigError
from stxd_train.cli import main
from stxd_train.diagnose import _CellSampler, correlation_dimension, diagnose, orientation_markdown
from stxd_train.distill import effective_dimension
from stxd_train.fit import StudentRunConfig, fit
from tiny import cli_error, tiny_student


def _orthogonal(k: int, rows: int = 16) -> torch.Tensor:
    """(rows, k) columns with mean 0, variance 1 and zero covariance: columns 1..k of a Hadamard matrix."""
    return torch.from_numpy(hadamard(rows)[:, 1:k + 1].astype(np.float64))


@pytest.mark.parametrize("k", [1, 3, 8])
def test_k_independent_equal_variance_channels_give_k(k: int) -> None:
    x = _orthogonal(k) * 3.0 + 5.0
    assert effective_dimension(x) == pytest.approx(k, rel=1e-12)
    assert correlation_dimension(x) == (pytest.approx(k, rel=1e-12), 0)


def test_scaling_one_channel_changes_cov_but_not_corr() -> None:
    k = 4
    x = _orthogonal(k)
    scaled = x * torch.tensor([100.0, 1.0, 1.0, 1.0])
    # Covariance eigenvalues 100², 1, 1, 1: (10000 + 3)² / (10000² + 3).
    assert effective_dimension(scaled) == pytest.approx(10003.0**2 / (1e8 + 3), rel=1e-12)
    assert effective_dimension(scaled) < 1.001
    assert correlation_dimension(scaled)[0] == pytest.approx(k, rel=1e-12)


def test_correlation_dimension_ignores_per_channel_affine_maps() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=gen) @ torch.randn(6, 6, generator=gen)
    scale = torch.rand(6, generator=gen) * 50 + 0.01
    shift = torch.randn(6, generator=gen) * 10
    assert correlation_dimension(x * scale + shift)[0] == pytest.approx(correlation_dimension(x)[0], rel=1e-9)
    assert effective_dimension(x * scale + shift) != pytest.approx(effective_dimension(x), rel=1e-3)
    assert 1.0 <= correlation_dimension(x)[0] <= 6.0


def test_duplicated_and_constant_channels() -> None:
    x = _orthogonal(4)
    # A copy of channel 0 at another scale, and a dead channel: correlation eigenvalues 2, 1, 1, 1, 0 → 5² / 7.
    with_copy = torch.cat([x, x[:, :1] * 7.0, torch.full((16, 1), 0.25)], dim=1)
    d, constant = correlation_dimension(with_copy)
    assert d == pytest.approx(25.0 / 7.0, rel=1e-12) and constant == 1
    assert correlation_dimension(torch.zeros(10, 3)) == (0.0, 3)
    with pytest.raises(ValueError, match="shape"):
        correlation_dimension(torch.zeros(10))
    with pytest.raises(ValueError, match="2 rows"):
        correlation_dimension(torch.zeros(1, 3))


def test_cell_sampler_keeps_the_same_cells_per_sample_and_across_feature_sets() -> None:
    everything = _CellSampler(samples=4, max_rows=256, seed=0)
    assert everything.cells(64).tolist() == list(range(64))
    sampler = _CellSampler(samples=4, max_rows=90, seed=0)
    raw, adapted = [], []
    for s in range(4):
        cells = sampler.cells(64)
        assert len(cells) == 23 and len(set(cells.tolist())) == 23          # ceil(90 / 4) distinct cells
        features = np.arange(64, dtype=np.float32)[:, None] + 100 * s + np.zeros((1, 3), np.float32)
        raw.append(features[cells])
        adapted.append(2 * features[cells])
    raw_x, adapted_x = sampler.finish(raw, adapted)
    assert raw_x.shape == (90, 3) and adapted_x.shape == (90, 3)
    torch.testing.assert_close(adapted_x, 2 * raw_x)
    assert len(set(raw_x[:, 0].tolist())) == 90


METRICS = {
    "split": "synth_val", "NDS": 0.3, "mAP": 0.2, "mATE": 0.5, "mASE": 0.3, "mAOE": 0.61, "mAVE": 0.9, "mAAE": 0.4,
    "per_class_AP": {"car": 0.4, "barrier": 0.1, "traffic_cone": 0.2},
    "per_class": {"car": {"AP": 0.4, "trans_err": 0.4, "orient_err": 0.125},
                  "barrier": {"AP": 0.1, "trans_err": 0.6, "orient_err": 1.1},
                  "traffic_cone": {"AP": 0.2, "trans_err": 0.3, "orient_err": None}},
}


def _fake_run(folder: Path, **changes: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps({**METRICS, **changes}))
    return folder


def test_orientation_section_reads_per_class_aoe(tmp_path: Path) -> None:
    first = _fake_run(tmp_path / "a")
    second = _fake_run(tmp_path / "b", mAOE=0.5, per_class={"car": {"orient_err": 3.0}, "bus": {"orient_err": 0.2}})
    lines = orientation_markdown([first, second]).splitlines()
    assert "barrier modulo π" in lines[0]
    assert lines[2] == f"| class | {first} (synth_val) | {second} (synth_val) |"
    assert lines[4:] == ["| car | 0.125 | 3.000 |", "| barrier | 1.100 | – |", "| traffic_cone | – | – |",
                         "| bus | – | 0.200 |", "| mAOE | 0.610 | 0.500 |"]


def test_orientation_section_refuses_unscored_and_old_runs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"metrics.json is missing: score the run first"):
        orientation_markdown([tmp_path / "none"])
    old = _fake_run(tmp_path / "old")
    metrics = json.loads((old / "metrics.json").read_text())
    del metrics["per_class"]
    (old / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(ConfigError, match=r"no per-class TP errors .*`stxd-train eval --run"):
        orientation_markdown([old])
    # The CLI reads the metrics before measuring anything: the error comes first, no cache is opened.
    message = cli_error(main, "diagnose", "--cache", tmp_path / "no-cache.zarr", "--split", "synth_val", "--run",
                        old, "--orientation")
    assert "no per-class TP errors" in message
    usage = CliRunner().invoke(main, ["diagnose", "--cache", str(tmp_path), "--split", "s", "--orientation"])
    assert usage.exit_code == 2 and "pass at least one --run" in usage.output


def test_cli_on_the_tiny_cache_with_a_distilled_run(tmp_path: Path, synth_root: Path, cache: Path) -> None:
    """Teacher, raw and adapted BEV rows of a 2-step CD run; rescaling one adapter output channel (to which CD is
    blind) changes the adapted covariance d_eff but neither its correlation d_eff nor the raw BEV's."""
    from stxd_cache.store import open_cache

    raw = tiny_student("bevformer")
    raw["distill"] = {"terms": ["cd"], "alpha_cd": 0.1}
    raw["train"]["max_steps"] = 2
    run = tmp_path / "run"
    fit(from_dict(StudentRunConfig, raw), dataroot=str(synth_root), version="v1.0-synth", out=run, cache=str(cache),
        device="cpu")
    _fake_run(run)
    result = CliRunner().invoke(main, ["diagnose", "--cache", str(cache), "--split", "synth_val", "--run", str(run),
                                       "--orientation", "--device", "cpu"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "| features | d_eff (cov) | d_eff (corr) | channels | cells |"
    rows = [line.split(" | ") for line in lines[2:5]]
    channels = open_cache(cache).meta.channels
    assert rows[0][0].startswith("| teacher (tiny, cache)") and rows[0][4] == "1024 |"     # 4 samples × 16 × 16
    assert rows[1][0] == f"| {run} (bevformer, distill: cd, BEV)" and rows[1][4] == "256 |"   # 4 × 8 × 8
    assert rows[2][0] == f"| {run} (bevformer, distill: cd, adapted BEV)" and rows[2][3].startswith(str(channels))
    assert "| car | 0.125 |" in lines and "| mAOE | 0.610 |" in lines

    table = diagnose(cache, runs=[run], split="synth_val", device="cpu")
    _, bev, adapted = table
    assert bev["channels"] == raw["model"]["embed_dims"] and adapted["channels"] == channels
    for row in table:
        assert 1.0 <= row["d_eff"] <= row["channels"]
        assert 1.0 <= row["d_eff_corr"] <= row["channels"] - row["constant_channels"]
    assert [r["rows"] for r in table] == [1024, 256, 256]   # the raw and adapted rows use the same cells

    rescaled = tmp_path / "rescaled"
    rescaled.mkdir()
    (rescaled / "config.yaml").write_text((run / "config.yaml").read_text())
    saved = torch.load(run / "student.pt", weights_only=True)
    last = max(int(k.split(".")[0]) for k in saved["adapter"])
    gain = torch.ones(channels)
    gain[0] = 30.0
    saved["adapter"][f"{last}.weight"] = saved["adapter"][f"{last}.weight"] * gain[:, None, None, None]
    saved["adapter"][f"{last}.bias"] = saved["adapter"][f"{last}.bias"] * gain + 1.0
    torch.save(saved, rescaled / "student.pt")
    _, bev2, adapted2 = diagnose(cache, runs=[rescaled], split="synth_val", device="cpu")
    assert bev2["d_eff"] == pytest.approx(bev["d_eff"], rel=1e-6)
    assert adapted2["d_eff_corr"] == pytest.approx(adapted["d_eff_corr"], rel=1e-4)
    assert abs(adapted2["d_eff"] - adapted["d_eff"]) > 0.1 * adapted["d_eff"]
