"""The cache I/O benchmark runs end to end on the tiny cache and reports consistent numbers (its speed is measured
by `make bench`, not here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
