"""`stxd-cache audit`: the per-box audit on hand-made boxes with known answers, the summary and calibration
numbers, and one run of the command on the tiny cache and root."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipelines.errors import ConfigError
from stxd_cache.audit import audit_boxes, calibration, concatenate, heading_error, match_by_centre, summarise
from stxd_cache.cli import main

CLASSES = ("car", "truck", "pedestrian")
# (G, 9) [x, y, z, w, l, h, yaw, vx, vy]: a car heading 0.3 rad at 2 m/s, a truck, a pedestrian.
GT = np.array([[10.0, 0.0, 0.0, 2.0, 4.5, 1.6, 0.3, 2.0, 0.0],
               [-10.0, 5.0, 0.0, 2.5, 8.0, 3.0, -1.0, 0.0, 1.0],
               [0.0, -12.0, 0.0, 0.7, 0.7, 1.8, 2.0, 0.5, 0.5]])
GT_LABELS = np.array([0, 1, 2])


def test_a_box_turned_by_half_a_turn_is_flipped() -> None:
    boxes = GT.copy()
    boxes[:, 6] += math.pi
    audit = audit_boxes(boxes, np.array([0.9, 0.8, 0.7]), GT_LABELS, GT, GT_LABELS)
    assert audit.matched.all() and audit.overlap_labels.tolist() == [0, 1, 2]
    np.testing.assert_allclose(audit.heading_error, math.pi, atol=1e-9)
    np.testing.assert_allclose(audit.velocity_error, 0.0, atol=1e-12)
    summary = summarise(audit, CLASSES)
    for entry in (*summary["classes"].values(), summary["overall"]):
        assert entry["heading"]["flipped_share"] == 1.0
        assert entry["heading"]["median"] == pytest.approx(math.pi)
        assert entry["heading"]["p90"] == pytest.approx(math.pi)
        assert entry["same_class_share"] == 1.0 and entry["precision"] == 1.0 and entry["recall"] == 1.0


def test_heading_error_wraps_modulo_two_pi() -> None:
    np.testing.assert_allclose(heading_error(np.array([0.1, 3.1, -3.1, 0.0, 5.0]),
                                             np.array([-0.1, -3.1, 3.1, 2 * math.pi, 5.0 - 0.5])),
                               [0.2, 2 * math.pi - 6.2, 2 * math.pi - 6.2, 0.0, 0.5], atol=1e-12)


def test_a_box_of_the_wrong_class_overlaps_but_never_matches() -> None:
    boxes = GT[:1].copy()
    audit = audit_boxes(boxes, np.array([0.6]), np.array([1]), GT, GT_LABELS)    # a truck on the car
    assert audit.overlap_labels.tolist() == [0] and not audit.matched.any()
    assert np.isnan(audit.heading_error).all() and np.isnan(audit.velocity_error).all()
    summary = summarise(audit, CLASSES)
    truck = summary["classes"]["truck"]
    assert truck["boxes"] == 1 and truck["overlapping"] == 1 and truck["same_class_share"] == 0.0
    assert truck["confusion"] == {"car": 1} and truck["precision"] == 0.0 and truck["gt_boxes"] == 1
    assert truck["heading"] == {"count": 0, "median": None, "p90": None, "flipped_share": None}
    assert summary["classes"]["car"]["boxes"] == 0 and summary["classes"]["car"]["same_class_share"] is None
    assert summary["classes"]["car"]["recall"] == 0.0


def test_heading_and_velocity_errors_of_matched_boxes() -> None:
    """Centre within 2 m, a known heading and velocity offset; a far box overlaps nothing; an unknown GT velocity
    gives no velocity error."""
    boxes = np.array([[11.5, 0.0, 0.0, 2.0, 4.5, 1.6, 0.3 + 0.25, 2.0, 1.5],   # car: 1.5 m off, 0.25 rad, 1.5 m/s
                      [30.0, 30.0, 0.0, 2.0, 4.5, 1.6, 0.0, 0.0, 0.0],          # car far from every GT
                      [0.0, -12.0, 0.0, 0.7, 0.7, 1.8, 2.0 - 2.0, 0.5, 0.5]])   # pedestrian, 2 rad off
    audit = audit_boxes(boxes, np.array([0.9, 0.5, 0.4]), np.array([0, 0, 2]), GT, GT_LABELS,
                        np.array([True, True, False]))
    assert audit.matched.tolist() == [True, False, True]
    assert audit.overlap_labels.tolist() == [0, -1, 2]
    np.testing.assert_allclose(audit.heading_error, [0.25, np.nan, 2.0], atol=1e-9)
    np.testing.assert_allclose(audit.velocity_error, [1.5, np.nan, np.nan], atol=1e-9)
    summary = summarise(audit, CLASSES)
    car = summary["classes"]["car"]
    assert car["boxes"] == 2 and car["overlapping"] == 1 and car["same_class_share"] == 1.0
    assert car["matched"] == 1 and car["precision"] == 0.5 and car["recall"] == 1.0
    assert car["velocity"] == {"count": 1, "median": pytest.approx(1.5)}
    assert summary["classes"]["pedestrian"]["velocity"] == {"count": 0, "median": None}
    overall = summary["overall"]
    assert overall["heading"]["median"] == pytest.approx(1.125)          # of 0.25 and 2.0
    assert overall["heading"]["p90"] == pytest.approx(0.25 + 0.9 * 1.75)
    assert overall["heading"]["flipped_share"] == 1 / 2 and overall["gt_boxes"] == 3


def test_centre_matching_is_greedy_by_score_and_one_to_one() -> None:
    gt = np.array([[0.0, 0.0], [3.0, 0.0]])
    boxes = np.array([[0.5, 0.0], [0.2, 0.0], [1.9, 0.0]])
    # The best-scoring box (1) takes GT 0; box 0 then has no free GT within 2 m; box 2 takes GT 1 (1.1 m).
    match = match_by_centre(boxes, np.array([0.5, 0.9, 0.3]), np.zeros(3, int), gt, np.zeros(2, int))
    assert match.tolist() == [-1, 0, 1]
    far = match_by_centre(np.array([[2.0, 0.0]]), np.array([0.9]), np.array([0]), gt[:1], np.array([0]))
    assert far.tolist() == [-1]   # exactly 2 m is not within


def test_calibration_bins_on_known_scores() -> None:
    result = calibration(np.array([0.05, 0.15, 0.15, 0.95, 0.3, 1.0]),
                         np.array([False, True, False, True, True, True]), bin_width=0.1)
    bins = {b["lo"]: b for b in result["bins"]}
    assert len(result["bins"]) == 10 and result["bins"][-1]["hi"] == 1.0
    assert bins[0.1]["boxes"] == 2 and bins[0.1]["precision"] == 0.5 and bins[0.1]["mean_score"] == 0.15
    assert bins[0.3]["boxes"] == 1          # 0.3 lies in [0.3, 0.4), not in [0.2, 0.3)
    assert bins[0.9]["boxes"] == 2 and bins[0.9]["mean_score"] == pytest.approx(0.975)   # 1.0 in the last bin
    assert bins[0.5] == {"lo": 0.5, "hi": 0.6, "boxes": 0, "mean_score": None, "precision": None}
    expected = (1 * 0.05 + 2 * 0.35 + 1 * 0.7 + 2 * 0.025) / 6
    assert result["ece"] == pytest.approx(expected)
    assert calibration(np.zeros(0), np.zeros(0, bool))["ece"] is None
    with pytest.raises(ConfigError, match=r"bin width 0\.3 "):
        calibration(np.array([0.5]), np.array([True]), bin_width=0.3)


def test_summary_counts_add_up_over_samples() -> None:
    first = audit_boxes(GT, np.array([0.9, 0.8, 0.7]), GT_LABELS, GT, GT_LABELS)
    second = audit_boxes(GT[:1], np.array([0.4]), np.array([2]), np.zeros((0, 9)), np.zeros(0, int))
    summary = summarise(concatenate([first, second]), CLASSES)
    assert sum(e["boxes"] for e in summary["classes"].values()) == summary["overall"]["boxes"] == 4
    assert sum(e["gt_boxes"] for e in summary["classes"].values()) == summary["overall"]["gt_boxes"] == 3
    assert summary["overall"]["matched"] == 3 and summary["overall"]["overlapping"] == 3
    assert summary["classes"]["pedestrian"]["precision"] == 0.5
    assert sum(b["boxes"] for b in summary["overall"]["calibration"]["bins"]) == 4


def test_cli_audit_on_the_tiny_cache(cache: Path, synth_root: Path, tmp_path: Path) -> None:
    from pipelines.nuscenes import SampleIndex
    from stxd_cache.store import open_cache

    out = tmp_path / "audit.json"
    result = CliRunner().invoke(main, ["audit", str(cache), "--dataroot", str(synth_root), "--split", "synth_val",
                                       "--min-score", "0.2", "--json", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    reader = open_cache(cache)
    index = SampleIndex.load(synth_root, "v1.0-synth", ["synth_val"], k_prev=0, max_sweeps=0)
    above = 0
    for sample in index:
        record = reader.read(reader.index_of(sample.token))
        above += int((record.scores[:record.count] >= 0.2).sum())
    assert above > 0
    assert report["samples"] == len(index) and report["splits"] == ["synth_val"] and report["min_score"] == 0.2
    assert list(report["classes"]) == list(reader.meta.classes)
    overall = report["overall"]
    assert overall["boxes"] == above == sum(e["boxes"] for e in report["classes"].values())
    assert overall["gt_boxes"] == sum(len(s.gt.labels) for s in index)
    assert sum(b["boxes"] for b in overall["calibration"]["bins"]) == above
    assert all(b["lo"] >= 0.2 - 1e-9 for b in overall["calibration"]["bins"] if b["boxes"])
    for entry in (*report["classes"].values(), overall):
        assert 0 <= entry["matched"] <= min(entry["boxes"], entry["gt_boxes"])
        assert 0 <= entry["overlapping"] <= entry["boxes"]
        for key in ("same_class_share", "precision", "recall"):
            assert entry[key] is None or 0.0 <= entry[key] <= 1.0
        heading = entry["heading"]
        assert heading["count"] == entry["matched"]
        if heading["count"]:
            assert 0.0 <= heading["median"] <= heading["p90"] <= math.pi + 1e-9
            assert 0.0 <= heading["flipped_share"] <= 1.0
        assert entry["velocity"]["count"] <= entry["matched"]
        ece = entry["calibration"]["ece"]
        assert (ece is None) == (entry["boxes"] == 0) and (ece is None or 0.0 <= ece <= 1.0)
    table = result.output.splitlines()
    assert "modulo π" in result.output
    rows = [line for line in table if line.startswith("| ") and line.split(" | ")[0][2:] in (*reader.meta.classes,
                                                                                             "all")]
    assert len(rows) == len(reader.meta.classes) + 1
    assert rows[-1].startswith(f"| all | {above} | {overall['gt_boxes']} |")
