"""Integrity of what a cache serves: content with valid checksums but in the wrong place (swapped rows, another
teacher's shards, edited values or metadata) is caught by `verify` and by the reader; training refuses a cache
whose index arrays (`prev_index`, `sample_token`, `box_count`) disagree with the dataset; and no command writes to
an output path that would destroy what it reads or where it runs. The session cache is never modified: every case
damages a copy."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from pipelines.cli import main as data_main
from pipelines.nuscenes import SampleIndex
from pipelines.paths import OutputPathError, check_output_path
from stxd_cache.cli import main as cache_main
from stxd_cache.errors import CacheCorruptError
from stxd_cache.extract import extract
from stxd_cache.schema import ATTRS_KEY, UNIT_ARRAYS
from stxd_cache.store import open_cache
from stxd_cache.verify import verify
from stxd_train.cli import main as train_main
from stxd_train.data import join_cache
from stxd_train.fit import open_training_cache
from tiny import SPLITS, cache_config_file, cli_error, extract_args, extract_job, tiny_student

VERSION = "v1.0-synth"


def _copy(cache: Path, tmp_path: Path, name: str = "copy.zarr") -> Path:
    copy = tmp_path / name
    shutil.copytree(cache, copy)
    return copy


def _arrays(path: Path) -> dict[str, zarr.Array]:
    group = zarr.open_group(str(path), mode="r+")
    return {name: group[name] for name in (*UNIT_ARRAYS, "done") if name in group}


def _student_yaml(tmp_path: Path) -> Path:
    import yaml

    raw = tiny_student("bevformer")
    raw["train"]["max_steps"] = 1
    raw["distill"] = {"terms": ["cd", "td", "rd"], "k": 2}
    path = tmp_path / "student.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _fit_error(synth_root: Path, cache: Path, tmp_path: Path) -> str:
    """The error of a distilled `stxd-train fit` against `cache`; no run folder may look finished."""
    run = tmp_path / "run"
    message = cli_error(train_main, "fit", "--config", _student_yaml(tmp_path), "--dataroot", synth_root,
                        "--version", VERSION, "--out", run, "--device", "cpu", "--cache", cache)
    assert not (run / "student.pt").exists()
    return message


@pytest.fixture(scope="module")
def train_samples(synth_root: Path) -> list:
    return list(SampleIndex.load(synth_root, VERSION, ["synth_train"], k_prev=4))


# ---------------------------------------------------------------------------- content bound to sample and teacher


def _swap_rows(path: Path) -> list[int]:
    for array in _arrays(path).values():
        first, second = np.asarray(array[0:1]), np.asarray(array[1:2])
        array[0:1], array[1:2] = second, first
    return [0, 1]


def _scale_row(factor: float):
    def damage(path: Path) -> list[int]:
        arrays = _arrays(path)
        for name in ("bev", "tokens"):   # together, so that tokens still equal the pooled BEV
            arrays[name][2:3] = (np.asarray(arrays[name][2:3]).astype(np.float32) * factor).astype(np.float16)
        return [2]
    return damage


@pytest.mark.parametrize("damage", [_swap_rows, _scale_row(0.0), _scale_row(100.0)],
                         ids=["every-array-swapped", "bev-and-tokens-zeroed", "bev-and-tokens-x100"])
def test_content_moved_or_edited_with_valid_checksums_is_caught(damage, cache: Path, tmp_path: Path,
                                                               synth_root: Path) -> None:
    copy = _copy(cache, tmp_path)
    rows = damage(copy)
    reader = open_cache(copy)
    report = verify(copy)
    assert not report.ok
    assert report.bad_samples == [reader.tokens[r] for r in rows]
    # x100 also moves the pooled BEV off the stored fp16 tokens by a rounding step, which verify reports too
    assert any("do not match the row's digest" in p for p in report.problems), report.problems
    assert all(p.startswith(("row 0 ", "row 1 ", "row 2 ")) for p in report.problems), report.problems
    with pytest.raises(CacheCorruptError, match=f"row {rows[0]} \\({reader.tokens[rows[0]]}\\) does not match"):
        reader.read(rows[0])
    if damage is _swap_rows:   # training stops at the first record it reads, naming the sample
        message = _fit_error(synth_root, copy, tmp_path)
        assert "does not match the row's digest" in message and "stxd-cache verify" in message


def test_shards_copied_from_another_teachers_cache_are_caught(cache: Path, synth_root: Path, tmp_path: Path) -> None:
    from tiny import tiny_teacher_checkpoint

    other = tmp_path / "other.zarr"
    extract(extract_job(synth_root, tiny_teacher_checkpoint(tmp_path / "other.pt", seed=1), other))
    copy = _copy(cache, tmp_path)
    for name in (*UNIT_ARRAYS, "done"):   # every object of unit 0, as a file copy
        source = other / name / "c" / "0"
        if source.exists():
            target = copy / name / "c" / "0"
            shutil.rmtree(target) if target.is_dir() else target.unlink()
            shutil.copytree(source, target) if source.is_dir() else shutil.copyfile(source, target)
    report = verify(copy)
    reader = open_cache(copy)
    assert report.bad_samples == reader.tokens[:4]   # the 4 rows of unit 0, and no other
    with pytest.raises(CacheCorruptError, match="another teacher's cache"):
        reader.read(0)
    reader.read(4)


def test_hand_edited_metadata_that_keeps_the_shapes_is_caught(cache: Path, tmp_path: Path) -> None:
    copy = _copy(cache, tmp_path)
    meta_file = copy / "zarr.json"
    doc = json.loads(meta_file.read_text())
    doc["attributes"][ATTRS_KEY]["grid"]["x_range"] = [-20.0, 31.2]   # same cell count, another grid
    meta_file.write_text(json.dumps(doc))
    for run in (open_cache, verify):
        with pytest.raises(CacheCorruptError, match="does not match the fingerprint its rows were written with"):
            run(copy)
    message = cli_error(cache_main, "verify", copy)
    assert message.startswith(f"cache {copy}: the metadata") and "re-extract the cache" in message


# ------------------------------------------------------------------------- training refuses what verify rejects


def _edit_prev(row: int, links: list[int], *more: tuple[int, list[int]]):
    def damage(path: Path) -> None:
        array = zarr.open_group(str(path), mode="r+")["prev_index"]
        for r, new in ((row, links), *more):
            array[r] = np.asarray(new, np.int32)
    return damage


def _swap_tokens(path: Path) -> None:
    array = zarr.open_group(str(path), mode="r+")["sample_token"]
    tokens = np.asarray(array[:])
    tokens[[2, 3]] = tokens[[3, 2]]
    array[:] = tokens


def _duplicate_token(path: Path) -> None:
    array = zarr.open_group(str(path), mode="r+")["sample_token"]
    tokens = np.asarray(array[:])
    tokens[5] = tokens[4]
    array[:] = tokens


def _box_count(path: Path) -> None:
    zarr.open_group(str(path), mode="r+")["box_count"][1] = 10_000


CASES = {
    "prev-out-of-range": (_edit_prev(3, [99, -1]), "links [99, -1] are not all -1 or earlier rows"),
    "prev-self": (_edit_prev(3, [3, -1]), "links [3, -1] are not all -1 or earlier rows"),
    "prev-future": (_edit_prev(3, [5, -1]), "links [5, -1] are not all -1 or earlier rows"),
    # the second scene made to continue the first: chains that agree, links that leave the scene
    "prev-cross-scene": (_edit_prev(4, [3, 2], (5, [4, 3])), "disagree with the dataset"),
    "tokens-swapped": (_swap_tokens, "disagree with the dataset"),
    "token-duplicated": (_duplicate_token, "is held by rows 4 and 5"),
    "box-count-over-M": (_box_count, "`box_count` of rows 1"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_training_refuses_a_cache_that_verify_rejects(case: str, cache: Path, tmp_path: Path, synth_root: Path,
                                                      train_samples: list) -> None:
    damage, expected = CASES[case]
    copy = _copy(cache, tmp_path)
    if case == "prev-cross-scene":   # row 4 starts the second scene: links to the first one's last rows
        assert open_cache(cache)._prev[3:5].tolist() == [[2, 1], [-1, -1]]
    damage(copy)
    scenes = None
    if case in ("prev-cross-scene", "tokens-swapped"):   # only the dataset can tell these apart
        by_token = {s.token: s for s in SampleIndex.load(synth_root, VERSION, list(SPLITS))}
        scenes = [by_token[t].scene_token for t in open_cache(cache).tokens]
    assert not verify(copy, scenes=scenes).ok
    with pytest.raises(CacheCorruptError, match=re.escape(expected)):
        join_cache(open_training_cache(copy, grid=open_cache(cache).meta.grid), train_samples)
    message = _fit_error(synth_root, copy, tmp_path)
    assert expected in message and str(copy) in message


def test_verify_with_the_dataroot_names_a_link_past_the_end(cache: Path, tmp_path: Path, synth_root: Path) -> None:
    copy = _copy(cache, tmp_path)
    _edit_prev(3, [99, -1])(copy)
    result = CliRunner().invoke(cache_main, ["verify", str(copy), "--dataroot", str(synth_root)])
    assert result.exit_code == 1, result.output
    token = open_cache(copy).tokens[3]
    assert f"prev_index row 3 ({token}): links [99, -1] are not all -1 or earlier rows" in result.stderr


# --------------------------------------------------------------------------------------------- output paths


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory holding a file that no command may touch."""
    cwd = tmp_path / "work"
    cwd.mkdir()
    (cwd / "keep.txt").write_text("mine")
    monkeypatch.chdir(cwd)
    return cwd


def _out_cases(root: Path, cwd: Path) -> dict[str, tuple[str, str]]:
    """Refused `--out` values and the words of their errors."""
    (cwd / "dangling").symlink_to(cwd / "nowhere")
    return {
        "empty": ("", "is empty (an unset shell variable?)"),
        "dot": (".", "is the working directory"),
        "cwd": (str(cwd), "is the working directory"),
        "above-cwd": (str(cwd.parent), "is a folder above the working directory"),
        "root": ("/", "folder above the working directory"),
        "dataroot": (str(root), "is --dataroot"),
        "above-dataroot": (str(root.parent), "holds --dataroot"),
        "no-parent": (str(cwd / "missing" / "out"), f"its parent folder {cwd / 'missing'} does not exist"),
        "dangling-link": ("dangling", "is a symbolic link to"),
    }


def test_check_output_path_refuses_every_unsafe_path(tmp_path: Path, workdir: Path) -> None:
    root = tmp_path / "data" / "root"
    root.mkdir(parents=True)
    for name, (out, words) in _out_cases(root, workdir).items():
        with pytest.raises(OutputPathError, match=None) as info:
            check_output_path(out, inputs={"--dataroot": root})
        assert words in str(info.value), (name, str(info.value))
    assert check_output_path("cache.zarr", inputs={"--dataroot": root}) == Path("cache.zarr")
    assert check_output_path(root / "cache.zarr", inputs={"--dataroot": root}) == root / "cache.zarr"


@pytest.mark.parametrize("case", ["empty", "dot", "cwd", "dataroot", "above-dataroot", "no-parent", "dangling-link"])
def test_extract_refuses_an_unsafe_out_and_touches_nothing(case: str, synth_root: Path, teacher_ckpt: Path,
                                                           tmp_path: Path, workdir: Path) -> None:
    root = tmp_path / "data" / "root"
    shutil.copytree(synth_root, root)
    out, words = _out_cases(root, workdir)[case]
    before = sorted(p.name for p in workdir.iterdir()), sorted(str(p) for p in root.rglob("*"))
    message = cli_error(cache_main, *extract_args(root, teacher_ckpt, out, cache_config_file(tmp_path)))
    assert words in message, message
    assert (sorted(p.name for p in workdir.iterdir()), sorted(str(p) for p in root.rglob("*"))) == before
    assert (workdir / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("command", ["synth", "teacher", "fit", "sweep", "show"])
def test_every_command_refuses_an_empty_out(command: str, synth_root: Path, cache: Path, tmp_path: Path,
                                            workdir: Path) -> None:
    common = ["--dataroot", synth_root, "--version", VERSION, "--out", ""]
    argv = {
        "synth": (data_main, ["synth", "--config", Path(__file__).parents[2] / "configs/data/synth_tiny.yaml",
                              "--out", ""]),
        "teacher": (train_main, ["teacher", "--config", Path(__file__).parents[2] /
                                 "configs/teacher/centerpoint_synth.yaml", *common]),
        "fit": (train_main, ["fit", "--config", _student_yaml(tmp_path), *common]),
        "sweep": (train_main, ["sweep", "--cache", cache, "--grid", Path(__file__).parents[2] /
                               "configs/sweeps/weights_synth.yaml", "--dataroot", synth_root, "--version", VERSION,
                               "--out", ""]),
        "show": (cache_main, ["show", cache, "--sample", open_cache(cache).tokens[0], "--out", ""]),
    }[command]
    assert "--out is empty" in cli_error(argv[0], *argv[1])
    assert sorted(p.name for p in workdir.iterdir()) == ["keep.txt"]


def test_synth_overwrite_removes_only_a_root_it_wrote(tmp_path: Path, workdir: Path) -> None:
    root = tmp_path / "nuscenes"
    (root / "samples" / "CAM_FRONT").mkdir(parents=True)
    (root / "samples" / "CAM_FRONT" / "real.jpg").write_bytes(b"not ours")
    config = Path(__file__).parents[2] / "configs/data/synth_tiny.yaml"
    message = cli_error(data_main, "synth", "--config", config, "--out", root, "--overwrite", "--workers", "1")
    assert "was not written by `stxd-data synth`" in message and "will not remove them" in message
    assert (root / "samples" / "CAM_FRONT" / "real.jpg").read_bytes() == b"not ours"


def test_a_lock_on_a_store_names_this_host(tmp_path: Path) -> None:
    """The holder recorded in a store being written names its pid and host (what a second writer's error quotes)."""
    from stxd_cache.store import WriterLock

    with WriterLock(tmp_path / "x.zarr") as lock:
        assert lock.holder["pid"] == os.getpid() and lock.holder["host"] == socket.gethostname()
        assert (tmp_path / "x.zarr").is_dir()


def test_info_reports_completeness_from_the_rows(cache: Path, tmp_path: Path) -> None:
    copy = _copy(cache, tmp_path)
    zarr.open_group(str(copy), mode="r+")["done"][8:] = False   # a finalised store that lost its last unit's flags
    result = CliRunner().invoke(cache_main, ["info", str(copy), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert (info["done_count"], info["sample_count"], info["complete"], info["finalized"]) == (8, 12, False, True)
    summary = CliRunner().invoke(cache_main, ["info", str(copy)]).stdout.splitlines()
    assert summary[0] == f"{copy}: INCOMPLETE, 8 of 12 rows written (finalized)"
