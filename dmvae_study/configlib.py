"""Typed, validated configuration dataclasses (litgpt / EDM2 style), with no dependency on a stage.

Every config section is a frozen-by-convention dataclass deriving from `Section`:
- each field is typed and documented with a one-line `doc` in its metadata;
- `__post_init__` checks every field's type and then the section's own `validate()`;
- `from_dict` rejects unknown keys and wrong types with a message naming the dotted key;
- `apply_overrides(cfg, ["dmd.dm_weight=20"])` gives a new validated config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T", bound="Section")


class ConfigError(ValueError):
    """A config key is unknown, has a wrong type, or an invalid value. The message names the key."""


def field(default: Any = dataclasses.MISSING, *, doc: str, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field carrying its one-line documentation (shown by `describe`)."""
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata={"doc": doc})
    return dataclasses.field(default=default, metadata={"doc": doc})


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_type_ok(v, a) for v, a in zip(value, args))
        inner = args[0] if args else Any
        return all(_type_ok(v, inner) for v in value)
    if origin is dict:
        kt, vt = typing.get_args(tp) or (Any, Any)
        return isinstance(value, dict) and all(_type_ok(k, kt) and _type_ok(v, vt) for k, v in value.items())
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _coerce(value: Any, tp: Any) -> Any:
    """Normalise YAML/JSON values: lists to tuples where the field is a tuple, ints to floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for a in typing.get_args(tp):
            if a is not type(None) and _type_ok(value, a):
                return _coerce(value, a)
        return value
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


@dataclasses.dataclass
class Section:
    """Base of every config section: type-checked on construction, strict loading from dicts."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _coerce(getattr(self, f.name), hints[f.name])
            object.__setattr__(self, f.name, value)
            if not _type_ok(value, hints[f.name]):
                raise ConfigError(
                    f"{type(self).__name__}.{f.name}: expected {_type_name(hints[f.name])}, "
                    f"got {type(value).__name__} {value!r}")
        self.validate()

    def validate(self) -> None:
        """Section-specific value checks; raise ConfigError naming the field."""

    def check(self, ok: bool, name: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{type(self).__name__}.{name}: {msg} (got {getattr(self, name)!r})")

    # ---- dict / YAML round trip -------------------------------------------------------------
    @classmethod
    def from_dict(cls: type[T], d: dict[str, Any], path: str = "") -> T:
        if not isinstance(d, dict):
            raise ConfigError(f"{path or cls.__name__}: expected a mapping, got {type(d).__name__}")
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            where = f"{path}." if path else ""
            raise ConfigError(f"unknown config key {where}{unknown[0]!s}; valid keys of "
                              f"{path or cls.__name__}: {', '.join(sorted(names))}")
        kwargs = {}
        for k, v in d.items():
            tp = hints[k]
            key = f"{path}.{k}" if path else k
            if isinstance(tp, type) and issubclass(tp, Section):
                kwargs[k] = tp.from_dict(v, key)
            else:
                v = _coerce(v, tp)
                if not _type_ok(v, tp):
                    raise ConfigError(f"config key {key}: expected {_type_name(tp)}, got "
                                      f"{type(v).__name__} {v!r}")
                kwargs[k] = v
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}" if path else str(e)) from None

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, Section) else (list(v) if isinstance(v, tuple) else v)
        return out

    def replace(self: T, **changes: Any) -> T:
        return dataclasses.replace(self, **changes)

    def digest(self, n: int = 12) -> str:
        """Content hash of the resolved section: the artifact key of what it produces."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:n]

    @classmethod
    def describe(cls) -> str:
        """One line per field: name, type, default, doc (for `--help-config`)."""
        hints = typing.get_type_hints(cls)
        lines = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else "(section)"
            lines.append(f"{f.name:28s} {_type_name(hints[f.name]):22s} {default!s:14s} {f.metadata.get('doc', '')}")
        return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`"dmd.dm_weight=20"` -> (["dmd", "dm_weight"], 20); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def set_dotted(d: dict[str, Any], keys: list[str], value: Any) -> None:
    node = d
    for i, k in enumerate(keys[:-1]):
        if k not in node or not isinstance(node[k], dict):
            raise ConfigError(f"unknown config key {'.'.join(keys[: i + 1])}; valid keys here: "
                              f"{', '.join(sorted(n for n, v in node.items() if isinstance(v, dict)) or sorted(node))}")
        node = node[k]
    if keys[-1] not in node:
        raise ConfigError(f"unknown config key {'.'.join(keys)}; valid keys here: {', '.join(sorted(node))}")
    node[keys[-1]] = value


def apply_overrides(cfg: T, overrides: list[str] | dict[str, Any]) -> T:
    """New config with dotted overrides applied (`["dmd.dm_weight=20"]` or `{"dmd.dm_weight": 20}`)."""
    d = cfg.to_dict()
    items = overrides.items() if isinstance(overrides, dict) else (
        (".".join(k), v) for k, v in map(parse_override, overrides))
    for key, value in items:
        set_dotted(d, key.split("."), value)
    return type(cfg).from_dict(d)


def load_yaml(cls: type[T], path: str | Path) -> T:
    with open(path) as fh:
        return cls.from_dict(yaml.safe_load(fh) or {})


def dump_yaml(cfg: Section) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
