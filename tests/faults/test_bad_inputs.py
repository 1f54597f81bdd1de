"""A hand-written corpus of bad inputs fed through the real CLIs (`stxd-data`, `stxd-cache`, `stxd-train`).

Each case checks the exit code, a one-paragraph error that names the file, field or sample, the absence of a
traceback (and its presence under `--debug`, for one case), and that no cache or run is left looking complete.
The dataset root and the cache are copies: the session fixtures are never modified.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from pipelines.classes import CATEGORY_TO_CLASS
from pipelines.cli import main as data_main
from pipelines.config import flatten, from_dict, to_dict
from pipelines.nuscenes import SampleIndex, SampleInfo
from stxd_cache.cli import main as cache_main
from stxd_cache.store import is_complete
from stxd_cache.teacher.checkpoint import load_teacher
from stxd_cache.teacher.config import TeacherConfig
from stxd_cache.teacher.model import build_teacher
from stxd_train.cli import main as train_main
from stxd_train.fit import StudentRunConfig
from tiny import BIN, CACHE, REPO, SPLITS, TINY_TEACHER, cache_config_file, cli_error, extract_args, tiny_student

VERSION = "v1.0-synth"


# ----------------------------------------------------------------------------------------------------- helpers


def check_problems(root: Path) -> str:
    """`stxd-data check` on a broken root: exit 1 and the listed problems, unwrapped."""
    result = CliRunner().invoke(data_main, ["check", "--dataroot", str(root), "--version", VERSION])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "problem(s):" in result.stderr
    return " ".join(result.stderr.split())


def copy_root(synth_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "root"
    shutil.copytree(synth_root, root)
    return root


def read_table(root: Path, name: str) -> list[dict[str, Any]]:
    return json.loads((root / VERSION / f"{name}.json").read_text())


def write_table(root: Path, name: str, records: list[dict[str, Any]]) -> None:
    (root / VERSION / f"{name}.json").write_text(json.dumps(records))


def student_yaml(tmp_path: Path, distill: bool = True, **model: object) -> Path:
    raw = tiny_student("bevformer", **model)
    raw["train"]["max_steps"] = 1
    if distill:
        raw["distill"] = {"terms": ["cd", "td", "rd"], "k": 2}
    path = tmp_path / "student.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def fit_args(config: Path, root: Path, out: Path, *extra: object) -> list[object]:
    return ["fit", "--config", config, "--dataroot", root, "--version", VERSION, "--out", out, "--device", "cpu",
            *extra]


def assert_not_complete(store: Path) -> None:
    """Nothing at `store`, or a cache whose `complete` flag is false."""
    assert not is_complete(store)


@pytest.fixture(scope="module")
def first_sample(nusc: Any) -> SampleInfo:
    """The sample of the first row an extraction over the tiny splits writes."""
    return SampleIndex.from_nuscenes(nusc, SPLITS, k_prev=0, max_sweeps=0)[0]


def lidar_record(root: Path, first_sample: SampleInfo) -> dict[str, Any]:
    """The sample_data record of the first sample's keyframe LiDAR."""
    name = Path(first_sample.lidar.path).name
    return next(sd for sd in read_table(root, "sample_data") if sd["filename"].endswith(name))


# -------------------------------------------------------------------------------------------------- LiDAR files


@pytest.mark.parametrize(("damage", "found"), [
    (lambda data: data[:-7], "bytes, not a multiple of 20"),
    (lambda data: data + b"\0\0\0", "bytes, not a multiple of 20"),
    (lambda data: b"", "is empty (0 bytes)"),
], ids=["truncated", "oversized", "empty"])
def test_lidar_file_of_the_wrong_size(damage: Any, found: str, tmp_path: Path, synth_root: Path, teacher_ckpt: Path,
                                      first_sample: SampleInfo) -> None:
    root = copy_root(synth_root, tmp_path)
    record = lidar_record(root, first_sample)
    path = root / record["filename"]
    path.write_bytes(damage(path.read_bytes()))
    size = path.stat().st_size
    assert f"sample_data {record['token']}: {path} has {size} bytes, expected a non-zero multiple of 20" \
        in check_problems(root)
    store = tmp_path / "cache.zarr"
    message = cli_error(cache_main, *extract_args(root, teacher_ckpt, store, cache_config_file(tmp_path)))
    assert f"LiDAR file {path} " in message and found in message
    assert "expected a non-zero multiple of 20 bytes (5 float32 per point)" in message
    assert_not_complete(store)


def _non_finite_root(synth_root: Path, tmp_path: Path, first_sample: SampleInfo) -> tuple[Path, Path]:
    """A root whose first keyframe LiDAR holds one NaN x and one -inf intensity, in two different points."""
    root = copy_root(synth_root, tmp_path)
    path = root / lidar_record(root, first_sample)["filename"]
    points = np.fromfile(path, dtype=np.float32).reshape(-1, 5)
    points[10, 0] = np.nan
    points[20, 3] = -np.inf
    points.tofile(path)
    return root, path


def test_non_finite_points_are_refused_naming_file_and_count(tmp_path: Path, synth_root: Path, teacher_ckpt: Path,
                                                             first_sample: SampleInfo) -> None:
    """Corrupt sensor data is an error, not something to drop quietly: extraction stops naming the file and the
    number of non-finite values, and leaves no complete cache."""
    root, path = _non_finite_root(synth_root, tmp_path, first_sample)
    count = len(np.fromfile(path, dtype=np.float32)) // 5
    store = tmp_path / "cache.zarr"
    message = cli_error(cache_main, *extract_args(root, teacher_ckpt, store, cache_config_file(tmp_path)))
    assert (f"LiDAR file {path} holds 2 non-finite values (NaN or ±inf) in 2 of its {count} points (first at "
            "point 10)") in message
    assert "the file is corrupt; re-download or re-generate it" in message
    assert_not_complete(store)


def test_debug_shows_the_traceback_that_the_report_hides(tmp_path: Path, synth_root: Path,
                                                         first_sample: SampleInfo) -> None:
    """The installed console script in a real process, on the same corrupt file: exit 2 and one paragraph without
    a traceback; with `--debug`, the traceback of the same error."""
    root, path = _non_finite_root(synth_root, tmp_path, first_sample)
    args = ["index", "--dataroot", str(root), "--version", VERSION, "--splits", ",".join(SPLITS), "--load"]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    plain = subprocess.run([BIN / "stxd-data", *args], capture_output=True, text=True, env=env, timeout=300)
    assert plain.returncode == 2
    assert "Traceback" not in plain.stderr
    assert "\n\n" not in plain.stderr.strip()
    assert " ".join(plain.stderr.split()).startswith(f"error: LiDAR file {path} holds 2 non-finite values")
    debug = subprocess.run([BIN / "stxd-data", "--debug", *args], capture_output=True, text=True, env=env,
                           timeout=300)
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert re.search(r"pipelines\.errors\.SensorFileError: LiDAR file .*holds 2 non-finite values", debug.stderr)


# ------------------------------------------------------------------------------------------- inconsistent tables


def _detection_annotation(root: Path) -> dict[str, Any]:
    """An annotation of a detection class (so that the index reads its attribute)."""
    categories = {c["token"]: c["name"] for c in read_table(root, "category")}
    classes = {i["token"]: CATEGORY_TO_CLASS.get(categories[i["category_token"]]) for i in read_table(root, "instance")}
    return next(a for a in read_table(root, "sample_annotation")
                if classes[a["instance_token"]] and a["attribute_tokens"])


def _dangle(root: Path, case: str, first_sample: SampleInfo) -> tuple[str, str, str]:
    """Break one reference; (the referring record's token, the check problem expected, the dangling token)."""
    if case == "sample_data.sample_token":
        records = read_table(root, "sample_data")
        record = next(r for r in records if r["token"] == lidar_record(root, first_sample)["token"])
        record["sample_token"] = "no-such-sample"
        write_table(root, "sample_data", records)
        return record["token"], "sample_data record(s) have a sample_token that is not a sample token", "no-such-sample"
    if case == "sample_annotation.instance_token":
        records = read_table(root, "sample_annotation")
        records[3]["instance_token"] = "no-such-instance"
        write_table(root, "sample_annotation", records)
        return (records[3]["token"], "sample_annotation record(s) have a instance_token that is not a instance token",
                "no-such-instance")
    if case == "sample_annotation.attribute_tokens":
        token = _detection_annotation(root)["token"]
        records = read_table(root, "sample_annotation")
        record = next(r for r in records if r["token"] == token)
        record["attribute_tokens"] = ["no-such-attribute"]
        write_table(root, "sample_annotation", records)
        return token, "sample_annotation record(s) name unknown attribute tokens", "no-such-attribute"
    records = read_table(root, "sample")
    record = next(r for r in records if r["token"] == first_sample.token)
    record["next"] = "no-such-next"
    write_table(root, "sample", records)
    return record["token"], "sample record(s) have a next that is not a sample token", "no-such-next"


@pytest.mark.parametrize("case", ["sample_data.sample_token", "sample_annotation.instance_token",
                                  "sample_annotation.attribute_tokens", "sample.next"])
def test_dangling_tokens_are_listed_and_refused(case: str, tmp_path: Path, synth_root: Path, teacher_ckpt: Path,
                                                cache: Path, first_sample: SampleInfo) -> None:
    """`check` lists the broken reference with both tokens; `extract` and `fit` stop with an error naming the
    dangling token (the devkit's KeyError at load time, or the index's own lookup) instead of a traceback."""
    root = copy_root(synth_root, tmp_path)
    referrer, problem, missing = _dangle(root, case, first_sample)
    listed = check_problems(root)
    assert problem in listed and f"{referrer} → '{missing}'" in listed
    store = tmp_path / "cache.zarr"
    for message in (cli_error(cache_main, *extract_args(root, teacher_ckpt, store, cache_config_file(tmp_path))),
                    cli_error(train_main, *fit_args(student_yaml(tmp_path), root, tmp_path / "run", "--cache",
                                                    cache))):
        assert f"'{missing}'" in message
        assert f"stxd-data check --dataroot {root} --version {VERSION}" in message
        if case in ("sample_annotation.attribute_tokens", "sample.next"):   # the devkit loads; the index refuses
            assert f"{referrer}" in message and "the tables are inconsistent" in message
        else:   # the devkit's own KeyError, explained with the first dangling reference
            assert message.startswith(f"the devkit cannot load {root / VERSION}: a record refers to the missing token")
            assert problem in message
    assert not store.exists() and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------- files outside the root


@pytest.mark.parametrize(("channel", "kind"), [("LIDAR_TOP", "relative"), ("CAM_FRONT", "absolute")])
def test_filenames_outside_the_root_are_refused(channel: str, kind: str, tmp_path: Path, synth_root: Path,
                                                teacher_ckpt: Path, cache: Path, first_sample: SampleInfo) -> None:
    """A filename that leaves the root is refused even though the file it names exists and is valid."""
    root = copy_root(synth_root, tmp_path)
    paths = {"LIDAR_TOP": first_sample.lidar.path, **{c.channel: c.path for c in first_sample.cameras}}
    source = Path(paths[channel])
    outside = tmp_path / f"outside{''.join(source.suffixes)}"
    shutil.copyfile(source, outside)
    name = "../" + outside.name if kind == "relative" else str(outside)
    records = read_table(root, "sample_data")
    record = next(r for r in records if Path(r["filename"]).name == source.name)
    record["filename"] = name
    write_table(root, "sample_data", records)
    assert f"sample_data {record['token']}: filename '{name}' points outside the root" in check_problems(root)
    store, run = tmp_path / "cache.zarr", tmp_path / "run"
    for message in (cli_error(cache_main, *extract_args(root, teacher_ckpt, store, cache_config_file(tmp_path))),
                    cli_error(train_main, *fit_args(student_yaml(tmp_path), root, run, "--cache", cache))):
        assert (f"sample_data {record['token']} has the filename '{name}', which points outside the dataset root "
                f"{root}") in message
    assert not store.exists() and not run.exists()


@pytest.mark.parametrize("channel", ["CAM_FRONT", "LIDAR_TOP"])
def test_files_that_link_outside_the_root_are_reported(channel: str, tmp_path: Path, synth_root: Path,
                                                       first_sample: SampleInfo) -> None:
    """A table's file replaced by a symbolic link to the same, valid file outside the root is reported like a
    filename that leaves the root; a link to a file inside the root is accepted."""
    root = copy_root(synth_root, tmp_path)
    paths = {"LIDAR_TOP": first_sample.lidar.path, **{c.channel: c.path for c in first_sample.cameras}}
    name = Path(paths[channel]).name
    record = next(r for r in read_table(root, "sample_data") if Path(r["filename"]).name == name)
    link = root / record["filename"]
    outside = tmp_path / "elsewhere" / name
    outside.parent.mkdir()
    shutil.move(link, outside)
    link.symlink_to(outside)
    problems = check_problems(root)
    assert "1 problem(s)" in problems
    assert (f"sample_data {record['token']}: file {link} is a symbolic link to {outside.resolve()}, outside the "
            f"dataset root {root}; a table's files must lie inside the root") in problems

    inside = root / "kept" / name
    inside.parent.mkdir()
    shutil.move(outside, inside)
    link.unlink()
    link.symlink_to(inside)
    result = CliRunner().invoke(data_main, ["check", "--dataroot", str(root), "--version", VERSION])
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------------------------------------- wrong types


def _wrong(value: Any) -> str:
    """A `--set` value of another type than `value` (YAML text)."""
    if isinstance(value, bool):
        return "maybe"
    if isinstance(value, int | float):
        return "plenty"
    if isinstance(value, str):
        return "7"
    if isinstance(value, list):
        return "5"
    return "[[1]]"   # a null field: str | None, int | None, ...


def test_every_student_and_cache_field_of_the_wrong_type_is_named(tmp_path: Path, synth_root: Path,
                                                                  teacher_ckpt: Path) -> None:
    """One `--set` per leaf field of the student run config (through `fit`) and of the cache config (through
    `extract`), with a value of the wrong type: each error names the file and the dotted field."""
    student = student_yaml(tmp_path, distill=False)
    leaves = flatten(to_dict(from_dict(StudentRunConfig, yaml.safe_load(student.read_text()))))
    assert len(leaves) > 60
    for key, value in leaves.items():
        message = cli_error(train_main, *fit_args(student, synth_root, tmp_path / "run", "--set",
                                                  f"{key}={_wrong(value)}"))
        assert message.startswith(f"{student}.{key}") and ": found " in message and ", expected " in message, key
    config = cache_config_file(tmp_path)
    for key, value in dataclasses.asdict(CACHE).items():
        message = cli_error(cache_main, *extract_args(synth_root, teacher_ckpt, tmp_path / "c.zarr", config,
                                                      "--set", f"{key}={_wrong(value)}"))
        assert message.startswith(f"{config}.{key}: found "), key
    assert not (tmp_path / "run").exists() and not (tmp_path / "c.zarr").exists()


@pytest.mark.parametrize(("section", "change", "expected"), [
    ("student", {"train": {"max_steps": "6"}}, ".train.max_steps: found '6', expected an integer"),
    ("student", {"model": ["bevformer"]}, ".model: found ['bevformer'], expected a mapping for StudentConfig"),
    ("student", {"train": {"amp": "fp8"}}, ".train.amp: found 'fp8', expected one of 'auto', 'off', 'bf16', 'fp16'"),
    ("student", ["model"], ": found a list at the top level, expected a mapping"),
    ("cache", {"grid_size": 16.5}, ".grid_size: found 16.5, expected an integer"),
    ("cache", {"precision": 8}, ".precision: found 8, expected a string"),
    ("cache", {"rows_per_shard": {"a": 1}}, ".rows_per_shard: found {'a': 1}, expected an integer"),
], ids=["string-for-int", "list-for-section", "unknown-literal", "list-at-top", "float-for-int", "int-for-string",
        "mapping-for-int"])
def test_config_files_with_wrong_types(section: str, change: Any, expected: str, tmp_path: Path, synth_root: Path,
                                       teacher_ckpt: Path) -> None:
    """Hand-written YAML files: a valid config with one section changed (or not a mapping at all). The file and
    the field are named, before any data is read."""
    raw: Any = tiny_student("bevformer") if section == "student" else dataclasses.asdict(CACHE)
    if isinstance(change, dict):
        for name, part in change.items():
            raw[name] = {**raw[name], **part} if isinstance(part, dict) and isinstance(raw[name], dict) else part
    else:
        raw = change
    config = tmp_path / f"{section}.yaml"
    config.write_text(yaml.safe_dump(raw))
    if section == "student":
        message = cli_error(train_main, *fit_args(config, synth_root, tmp_path / "run"))
    else:
        message = cli_error(cache_main, *extract_args(synth_root, teacher_ckpt, tmp_path / "c.zarr", config))
    assert message.startswith((f"{config}.", f"{config}:", f"config file {config}:"))
    assert expected in message
    assert not (tmp_path / "run").exists() and not (tmp_path / "c.zarr").exists()


def test_malformed_overrides_are_named(tmp_path: Path, synth_root: Path) -> None:
    student = student_yaml(tmp_path, distill=False)
    message = cli_error(train_main, *fit_args(student, synth_root, tmp_path / "run", "--set", "train.max_steps"))
    assert "--set 'train.max_steps': expected KEY=VALUE" in message
    message = cli_error(train_main, *fit_args(student, synth_root, tmp_path / "run", "--set", "data.image_size.w=5"))
    assert "--set 'data.image_size.w=5': 'image_size' is a value, not a section" in message


def test_python_tags_in_overrides_are_refused_and_never_run(tmp_path: Path, synth_root: Path) -> None:
    marker = tmp_path / "ran"
    value = f'!!python/object/apply:os.system ["touch {marker}"]'
    override = f"train.seed={value}"
    run = tmp_path / "run"
    message = cli_error(train_main, *fit_args(student_yaml(tmp_path, distill=False), synth_root, run, "--set",
                                              override))
    assert message == (f"--set {override!r}: the value {value!r} is not a plain YAML value (could not determine a "
                       "constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'); only plain values "
                       "are accepted (numbers, true/false, strings, [lists], {mappings}): quote it to pass it as a "
                       "string, or fix it")
    assert not marker.exists() and not run.exists()


# --------------------------------------------------------------------------------------------------- checkpoints


def _mmdet3d_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s weights as an mmdet3d 1.x CenterPoint `state_dict`: `pts_*` prefixes, sparse kernels in the mmcv
    (kD, kH, kW, in, out) layout, box-size rows in (l, w, h) order."""
    prefixes = {"middle_encoder": "pts_middle_encoder", "backbone": "pts_backbone", "neck": "pts_neck",
                "head": "pts_bbox_head"}
    state = {}
    for key, tensor in model.state_dict().items():
        top, rest = key.split(".", 1)
        if tensor.ndim == 5:
            tensor = tensor.permute(1, 2, 3, 4, 0)
        if re.fullmatch(r"head\.task_heads\.\d+\.dim\.1\.(weight|bias)", key):
            tensor = tensor[[1, 0, 2]]
        state[f"{prefixes[top]}.{rest}"] = tensor.clone()
    return state


def test_mmdet3d_checkpoint_with_one_tensor_of_the_wrong_shape(tmp_path: Path, synth_root: Path) -> None:
    torch.manual_seed(0)
    model = build_teacher(from_dict(TeacherConfig, TINY_TEACHER), "cpu")
    teacher_yaml = tmp_path / "teacher.yaml"
    teacher_yaml.write_text(yaml.safe_dump(TINY_TEACHER))
    state = _mmdet3d_state(model)
    good = tmp_path / "good.pth"
    torch.save({"state_dict": state, "meta": {"mmdet3d_version": "1.0.0rc4"}}, good)
    loaded = load_teacher(good, config_path=teacher_yaml)   # the file is right apart from the tensor changed below
    assert loaded.source_format == "mmdet3d"
    assert torch.equal(loaded.model.state_dict()["backbone.blocks.1.0.weight"], model.backbone.blocks[1][0].weight)

    key = "pts_backbone.blocks.1.0.weight"
    right = tuple(state[key].shape)
    wrong = (right[0], right[1] * 2, *right[2:])
    state[key] = torch.zeros(wrong)
    bad = tmp_path / "bad.pth"
    torch.save({"state_dict": state, "meta": {"mmdet3d_version": "1.0.0rc4"}}, bad)
    store = tmp_path / "cache.zarr"
    args = extract_args(synth_root, bad, store, cache_config_file(tmp_path), "--teacher-config", teacher_yaml)
    message = cli_error(cache_main, *args)
    assert f"teacher checkpoint {bad} (mmdet3d) does not fit the teacher architecture" in message
    assert f"mis-shaped keys: backbone.blocks.1.0.weight: checkpoint {wrong} vs model {right}" in message
    assert "missing keys" not in message and "unexpected keys" not in message
    assert not store.exists()


class _Payload:
    """Pickles as a call of `exec` that creates `marker`: what a malicious checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def test_pickled_code_in_a_checkpoint_never_runs_without_trust(tmp_path: Path, synth_root: Path, teacher_ckpt: Path,
                                                               cache: Path) -> None:
    """Every command that reads a checkpoint refuses one whose unpickling would run code, and runs none of it:
    `stxd-cache extract --teacher`, `stxd-train fit --teacher-online`, `fit --resume`, `eval` and a backbone
    `weights` file. The payload is live: `--trust-checkpoint` does run it."""
    marker = tmp_path / "payload_ran"
    native = torch.load(teacher_ckpt, weights_only=True)
    teacher = tmp_path / "teacher_payload.pt"
    torch.save({**native, "payload": _Payload(marker)}, teacher)
    refused = "holds objects that safe loading refuses (Unsupported global: GLOBAL exec was not an allowed global"

    store = tmp_path / "cache.zarr"
    message = cli_error(cache_main, *extract_args(synth_root, teacher, store, cache_config_file(tmp_path)))
    assert message.startswith(f"teacher checkpoint {teacher} {refused}")
    assert "none of its code ran" in message and "pass --trust-checkpoint to unpickle it" in message
    assert not store.exists() and not marker.exists()

    online = tmp_path / "online"
    message = cli_error(train_main, *fit_args(student_yaml(tmp_path), synth_root, online, "--teacher-online", teacher))
    assert message.startswith(f"teacher checkpoint {teacher} {refused}") and "--trust-checkpoint" in message
    assert not online.exists() and not marker.exists()

    # A finished student run whose checkpoint and student file are replaced by the payload.
    config, run = student_yaml(tmp_path, distill=False), tmp_path / "run"
    result = CliRunner().invoke(train_main, [str(a) for a in fit_args(config, synth_root, run)])
    assert result.exit_code == 0, result.output
    for path in (run / "checkpoints" / "last.pt", run / "student.pt"):
        torch.save({"format": 1, "payload": _Payload(marker)}, path)
    message = cli_error(train_main, *fit_args(config, synth_root, run, "--resume"))
    assert message.startswith(f"checkpoint {run / 'checkpoints' / 'last.pt'} {refused}")
    assert "was altered or not written by it" in message
    message = cli_error(train_main, "eval", "--run", run, "--device", "cpu")
    assert message.startswith(f"student file {run / 'student.pt'} cannot be read with safe loading (Unsupported "
                              "global: GLOBAL exec was not an allowed global")
    assert not marker.exists()

    weights = tmp_path / "resnet18.pth"
    torch.save({"state_dict": {}, "payload": _Payload(marker)}, weights)
    message = cli_error(train_main, *fit_args(student_yaml(tmp_path, distill=False), synth_root, tmp_path / "r2",
                                              "--set", f"model.backbone.weights={weights}"))
    assert message.startswith(f"pretrained weights {weights}: torch.load(weights_only=True) cannot read it "
                              "(Unsupported global: GLOBAL exec was not an allowed global")
    assert not marker.exists()

    assert load_teacher(teacher, trust=True).source_format == "native"
    assert marker.exists()   # the same file, trusted, runs its payload: the refusals above were the only guard


def test_a_student_file_with_missing_and_extra_keys(tmp_path: Path, synth_root: Path) -> None:
    """`eval` of a run whose student.pt lost four tensors and gained one names the file and the first keys; the
    advice, resuming the finished run, writes the file again from the last checkpoint."""
    from stxd_train.fit import load_student

    config, run = student_yaml(tmp_path, distill=False), tmp_path / "run"
    result = CliRunner().invoke(train_main, [str(a) for a in fit_args(config, synth_root, run)])
    assert result.exit_code == 0, result.output
    path = run / "student.pt"
    saved = torch.load(path, weights_only=True)
    weights = dict(saved["state_dict"])
    dropped = sorted(weights)[:4]
    for key in dropped:
        del saved["state_dict"][key]
    saved["state_dict"]["head.extra.weight"] = torch.zeros(3)
    torch.save(saved, path)
    message = cli_error(train_main, "eval", "--run", run, "--device", "cpu")
    assert message == (f"student file {path}: its weights do not fit the bevformer student its config describes "
                       f"(4 missing key(s): {dropped[0]}, {dropped[1]}, {dropped[2]} and 1 more; 1 unexpected key(s): "
                       "head.extra.weight). `stxd-train fit` writes the weights and their config together, so the "
                       "file was altered or replaced: write it again from the run's last checkpoint (the same "
                       "`stxd-train fit` command with --resume) or train the run again")
    assert not (run / "metrics.json").exists()

    result = CliRunner().invoke(train_main, [str(a) for a in fit_args(config, synth_root, run, "--resume")])
    assert result.exit_code == 0, result.output
    restored = load_student(path, torch.device("cpu")).state_dict()
    assert restored.keys() == weights.keys() and all(torch.equal(restored[k], weights[k]) for k in weights)


def test_eval_of_an_altered_teacher_file_does_not_offer_trust(tmp_path: Path, synth_root: Path) -> None:
    """`stxd-train eval` has no --trust-checkpoint: for a teacher run whose teacher.pt now carries pickled code,
    it says the file was altered and how to write it again, and runs none of the code."""
    raw = yaml.safe_load((REPO / "configs" / "teacher" / "centerpoint_synth.yaml").read_text())
    raw["model"] = TINY_TEACHER
    raw["train"].update(max_steps=1, checkpoint_every=1, log_every=1)
    raw["data"].update(num_workers=0)
    config, run = tmp_path / "teacher.yaml", tmp_path / "run"
    config.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(train_main, ["teacher", "--config", str(config), "--dataroot", str(synth_root),
                                             "--version", VERSION, "--out", str(run), "--device", "cpu", "--no-eval"])
    assert result.exit_code == 0, result.output
    marker = tmp_path / "payload_ran"
    path = run / "teacher.pt"
    torch.save({**torch.load(path, weights_only=True), "payload": _Payload(marker)}, path)
    message = cli_error(train_main, "eval", "--run", run, "--device", "cpu")
    assert message.startswith(f"teacher checkpoint {path} holds objects that safe loading refuses (Unsupported "
                              "global: GLOBAL exec was not an allowed global")
    assert message.endswith("it was not unpickled, so none of its code ran. `stxd-train teacher` writes it with "
                            "tensors and plain values only, so the file was altered or replaced: write it again with "
                            "`stxd-train teacher` (the run's own command with --resume rewrites it from the run's "
                            "last checkpoint)")
    assert "--trust-checkpoint" not in message and not marker.exists()
