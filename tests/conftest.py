"""Shared fixtures: one tiny synthetic nuScenes root per test session, loaded with the real devkit."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.config import load_config
from pipelines.synth import SynthConfig, generate

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "data" / "synth_tiny.yaml"


@pytest.fixture(scope="session")
def synth_cfg() -> SynthConfig:
    return load_config(SynthConfig, TINY_CONFIG)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory, synth_cfg: SynthConfig) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(synth_cfg, root, workers=2)
    return root


@pytest.fixture(scope="session")
def nusc(synth_root: Path, synth_cfg: SynthConfig):
    from nuscenes.nuscenes import NuScenes

    return NuScenes(version=synth_cfg.version, dataroot=str(synth_root), verbose=False)


@pytest.fixture(scope="session")
def val_index(nusc):
    from pipelines.nuscenes import SampleIndex

    return SampleIndex.from_nuscenes(nusc, ["synth_val"], k_prev=3)


@pytest.fixture(scope="session")
def train_index(nusc):
    from pipelines.nuscenes import SampleIndex

    return SampleIndex.from_nuscenes(nusc, ["synth_train"], k_prev=3)


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny import tiny_teacher_checkpoint

    return tiny_teacher_checkpoint(tmp_path_factory.mktemp("teacher") / "teacher.pt")


@pytest.fixture(scope="session")
def cache(synth_root: Path, teacher_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete tiny teacher cache over both tiny splits."""
    from stxd_cache.extract import extract
    from tiny import extract_job

    out = tmp_path_factory.mktemp("cache") / "cache.zarr"
    extract(extract_job(synth_root, teacher_ckpt, out))
    return out


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The fault suite's own summary line: how many fault cases (one per test and parameter) were tried, and how
    many held (the tool failed cleanly or recovered, as the test demands)."""
    outcomes: dict[str, int] = {}
    for outcome in ("passed", "failed", "error", "skipped"):
        for report in terminalreporter.stats.get(outcome, []):
            if getattr(report, "when", "call") in ("call", "setup") and "tests/faults/" in report.nodeid.replace(
                    "\\", "/"):
                if outcome == "passed" and report.when != "call":
                    continue
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
    tried = sum(outcomes.values())
    if tried:
        broken = outcomes.get("failed", 0) + outcomes.get("error", 0)
        terminalreporter.write_line(f"fault suite: {tried} fault cases tried, {outcomes.get('passed', 0)} held, "
                                    f"{broken} did not, {outcomes.get('skipped', 0)} skipped")
