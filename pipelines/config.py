"""Flat YAML configs loaded into frozen dataclasses, with strict keys and `--set a.b=c` overrides.

Every config class is a frozen dataclass whose fields carry their own docstring-style help in
`metadata["help"]`. `load_config` is the single place where YAML becomes objects: unknown keys are
rejected with the list of valid ones, and values are checked against the field types.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from pipelines.errors import ConfigError

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting lists to tuples and ints to floats."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Literal:
        if not any(value == arg and type(value) is type(arg) for arg in args):
            raise ConfigError(f"{where}: found {value!r}, expected one of {', '.join(repr(a) for a in args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: found {value!r}, expected {_type_name(tp)}")
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: found {value!r}, expected a mapping for {tp.__name__}")
        return from_dict(tp, value, where=where)
    if origin is tuple:
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise ConfigError(f"{where}: found {value!r}, expected a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: found {len(value)} values {list(value)!r}, expected {len(args)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: found {value!r}, expected a mapping")
        return {_coerce(k, args[0], where): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: found {value!r}, expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: found {value!r}, expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: found {value!r}, expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: found {value!r}, expected a string")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: found {value!r}, expected {_type_name(tp)}")
    return value


def require(where: str, checks: Iterable[tuple[bool, str, Any, str]]) -> None:
    """Raise a ConfigError for the first failed check `(ok, field, value found, what is expected)`.

    The one validation idiom of the config dataclasses' `__post_init__`: the message names `where`
    (e.g. "synth config"), the field, the value found and the value expected.
    """
    for ok, name, value, expected in checks:
        if not ok:
            raise ConfigError(f"{where} field `{name}`: found {value!r}, expected {expected}")


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as {"a.b.c": leaf}; a non-mapping `d` is the single entry {prefix: d}."""
    if not isinstance(d, Mapping):
        return {prefix: d}
    out: dict[str, Any] = {}
    for key, value in d.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def from_dict(cls: type[T], data: Mapping[str, Any], *, where: str = "config") -> T:
    """Build the dataclass `cls` from `data`, rejecting unknown keys and wrong types."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys are "
                          f"{', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(value, hints[name], f"{where}.{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def describe(obj: Any, prefix: str = "") -> list[str]:
    """A config dataclass as one `dotted.field: value  # help` line per leaf field (nested configs expanded), the
    values as YAML writes them inline, so that each line can be given back as `--set dotted.field=value`."""
    import yaml

    lines = []
    for f in dataclasses.fields(obj):
        value, name = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            lines += describe(value, f"{name}.")
            continue
        text = yaml.safe_dump(to_dict_value(value), default_flow_style=True, width=10**6).strip()
        text = text.removesuffix("\n...").removesuffix("...").strip()
        help_text = f.metadata.get("help")
        lines.append(f"{name}: {text}" + (f"  # {help_text}" if help_text else ""))
    return lines


def to_dict_value(value: Any) -> Any:
    """A config value as plain YAML data: dataclasses as dicts, tuples as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, tuple | list):
        return [to_dict_value(x) for x in value]
    if isinstance(value, dict):
        return {k: to_dict_value(x) for k, x in value.items()}
    return value


def to_dict(obj: Any) -> dict[str, Any]:
    """A YAML-friendly dict of a config dataclass (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(obj))


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b=value` into its key path and YAML-parsed value."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set scenes=4")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        # Python tags (`!!python/...`) land here too: safe loading refuses them without running anything.
        found = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise ConfigError(f"--set {text!r}: the value {raw!r} is not a plain YAML value ({found}); only plain values "
                          "are accepted (numbers, true/false, strings, [lists], {mappings}): quote it to pass it as "
                          "a string, or fix it") from None
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of `data` with every `a.b=value` override applied."""
    out: dict[str, Any] = yaml.safe_load(yaml.safe_dump(data)) or {}
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file (see configs/)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: found a {type(data).__name__} at the top level, expected a mapping")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = (),
                base: Mapping[str, Any] | None = None) -> T:
    """Load `cls` from an optional YAML file, then `base` values, then `--set` overrides, in that order."""
    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    data.update(base or {})
    data = apply_overrides(data, overrides)
    return from_dict(cls, data, where=str(path) if path is not None else cls.__name__)
