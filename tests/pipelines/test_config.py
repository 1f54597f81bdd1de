"""Strict config loading: unknown keys and wrong types are named; --set overrides nested fields."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipelines.config import apply_overrides, from_dict, load_config, to_dict
from pipelines.errors import ConfigError
from pipelines.synth import SynthConfig


@dataclass(frozen=True, kw_only=True)
class Inner:
    width: int = 4
    ratio: float = 0.5


@dataclass(frozen=True, kw_only=True)
class Outer:
    name: str = "x"
    size: tuple[int, int] = (1, 2)
    inner: Inner = field(default_factory=Inner)
    tags: tuple[str, ...] = ()
    limit: float | None = None


def test_overrides_and_types(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: a\nsize: [3, 4]\ninner: {width: 8}\n")
    cfg = load_config(Outer, path, ["inner.ratio=2", "tags=[p, q]", "limit=3"])
    assert cfg == Outer(name="a", size=(3, 4), inner=Inner(width=8, ratio=2.0), tags=("p", "q"), limit=3.0)
    assert to_dict(cfg)["size"] == [3, 4]
    assert apply_overrides({"a": {"b": 1}}, ["a.c=2"]) == {"a": {"b": 1, "c": 2}}


@pytest.mark.parametrize(("overrides", "message"), [
    (["colour=red"], "unknown key(s) colour; valid keys are inner, limit, name, size, tags"),
    (["inner.depth=3"], "config.inner: unknown key(s) depth; valid keys are ratio, width"),
    (["size=[1, 2, 3]"], "config.size: found 3 values"),
    (["inner.width=wide"], "config.inner.width: found 'wide', expected an integer"),
    (["name=true"], "config.name: found True, expected a string"),
    (["noequals"], "expected KEY=VALUE"),
])
def test_bad_values_are_named(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_dict(Outer, apply_overrides({}, overrides))
    assert message in str(err.value)


def test_missing_file_and_synth_validation(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(SynthConfig, tmp_path / "none.yaml")
    with pytest.raises(ConfigError, match="`sweeps`: found 40"):
        SynthConfig(sweeps=40)
    repo = Path(__file__).resolve().parents[2]
    for name in ("synth.yaml", "synth_tiny.yaml"):
        load_config(SynthConfig, repo / "configs" / "data" / name)


def test_every_config_checks_with_require() -> None:
    """The config dataclasses that used to check by hand name the field, the value and what is expected."""
    from stxd_cache.schema import CacheLayout
    from stxd_cache.teacher.config import AugmentConfig
    from stxd_train.configs import TeacherDataConfig

    cases = [
        (lambda: TeacherDataConfig(batch_size=0), "teacher data field `batch_size`: found 0, expected >= 1"),
        (lambda: TeacherDataConfig(train_splits=()), "teacher data field `train_splits`: found (), expected at least"),
        (lambda: AugmentConfig(rotation=-1.0), "teacher augment field `rotation`: found -1.0, expected >= 0"),
        (lambda: AugmentConfig(scale=(1.1, 1.0)), "teacher augment field `scale`: found (1.1, 1.0), expected 0 <"),
        (lambda: CacheLayout(rows_per_shard=0), "cache layout field `rows_per_shard`: found 0, expected >= 1"),
        (lambda: CacheLayout(zstd_level=10), "cache layout field `zstd_level`: found 10, expected 1..9"),
    ]
    for make, message in cases:
        with pytest.raises(ConfigError) as err:
            make()
        assert message in str(err.value)


def test_every_config_field_has_its_help() -> None:
    """Config fields are documented one way, in `metadata={"help": ...}`, which `stxd-train config` prints; records
    (cache rows, batches) keep attribute docstrings. A config section counts as a field of its parent."""
    import dataclasses
    import typing

    from stxd_cache.extract import ExtractConfig
    from stxd_train.configs import StudentRunConfig, TeacherRunConfig
    from stxd_train.sweep import SweepConfig

    missing, seen = [], set()

    def walk(cls: type, where: str) -> None:
        if cls in seen:
            return
        seen.add(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kind = hints[f.name]
            nested = [a for a in (kind, *typing.get_args(kind)) if dataclasses.is_dataclass(a)]
            if nested:
                for a in nested:
                    walk(a, f"{where}.{f.name}")
            elif not f.metadata.get("help"):
                missing.append(f"{where}.{f.name}")

    for root in (StudentRunConfig, TeacherRunConfig, ExtractConfig, SynthConfig, SweepConfig):
        walk(root, root.__name__)
    assert len(seen) >= 20 and not missing, missing
