"""The cache I/O benchmark and the step profile run end to end on the tiny cache and report consistent numbers (their
speeds are measured by `make bench` and by hand, not here)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tiny import VERSION, cache_config_file, tiny_student

REPO = Path(__file__).resolve().parents[1]


def test_cache_io_benchmark_reports_every_layout(cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "io.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "cache_io.py"), "--cache", str(cache),
                             "--samples", "8", "--rounds", "1", "--workers", "1", "--work-dir", str(tmp_path),
                             "--json", str(out)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    results = json.loads(out.read_text())
    layouts = results["layouts"]
    assert len(layouts) == 5 and results["samples"] == 8
    assert all(v["ratio"] > 0 and v["write_samples_s"] > 0 and v["read_samples_s"] > 0 for v in layouts.values())
    fp16, int8 = layouts["fp16, shard 8, zstd 3"], layouts["int8, shard 8, zstd 3"]
    assert fp16["ratio"] > 1 and int8["disk_bytes"] < fp16["disk_bytes"]
    assert 0 < results["int8_error"]["mean"] <= results["int8_error"]["max"] < 0.02
    assert set(results["loader_samples_s"]) == {"0", "1"}
    assert results["full_nuscenes"]["total_TB"] > 0
    assert "| fp16, chunk (1 row), zstd 1 |" in result.stdout
    assert not list(tmp_path.glob("stxd-bench-io-*")), "the benchmark's stores are removed"


def test_step_profile_accounts_for_the_whole_step(synth_root: Path, cache: Path, teacher_ckpt: Path,
                                                   tmp_path: Path) -> None:
    config = tmp_path / "student.yaml"
    config.write_text(yaml.safe_dump(tiny_student("bevformer")))
    args = ["--dataroot", synth_root, "--version", VERSION, "--cache", cache, "--teacher", teacher_ckpt,
            "--config", config, "--cache-config", cache_config_file(tmp_path), "--steps", 2, "--rows", 5,
            "--channels-last"]
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "step_profile.py"), *map(str, args)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    operators = re.findall(r"^\| ([^|]+?) \| (\d+) \| ([\d.]+) \| ([\d.]+)% \|$", result.stdout, re.MULTILINE)
    assert len(operators) == 5 and all(int(calls) > 0 for _, calls, _, _ in operators)
    assert [float(ms) for *_, ms, _ in operators] == sorted((float(ms) for *_, ms, _ in operators), reverse=True)
    kinds = dict(re.findall(r"^\| ((?:convolution|grid sampling|matrix|everything)[^|]*?) \| [\d.]+ \| ([\d.]+)% \|$",
                            result.stdout, re.MULTILINE))
    assert "convolution (forward + backward)" in kinds and "everything else" in kinds
    assert sum(float(share) for share in kinds.values()) == pytest.approx(100.0, abs=0.3)
    ratio = re.search(r"channels_last / contiguous = \*\*([\d.]+)\*\*", result.stdout)
    assert ratio is not None and float(ratio.group(1)) > 0
