"""Typed, validated configuration dataclasses (litgpt / EDM2 style), with no dependency on a stage.

Every config section is a frozen-by-convention dataclass deriving from `Section`:
- each field is typed, documented with a one-line `doc`, and carries its value `rule` (range, sign,
  choices; `Rule` below) in its metadata, next to the field it constrains;
- `__post_init__` checks every field's type, finiteness and rule, then the section's own
  cross-field `validate()`;
- `from_dict` rejects unknown keys and wrong types with a message naming the dotted key;
- `apply_overrides(cfg, ["dmd.dm_weight=20"])` gives a new validated config.

Every user error is one `ConfigError` whose message names the key, the value, the rule and a valid
example (`dmd.batch_size=-4: must be > 0, e.g. dmd.batch_size=256`), and whose `.key` is the dotted key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml

T = TypeVar("T", bound="Section")


class ConfigError(ValueError):
    """A config key is unknown, has a wrong type, or an invalid value. The message names the key;
    `key` holds it dotted (`dmd.batch_size`) where one key is at fault."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key

    def under(self, prefix: str) -> "ConfigError":
        """The same error one level up: `batch_size=...` inside section `dmd` becomes `dmd.batch_size=...`."""
        if self.key is None:
            return ConfigError(f"{prefix}: {self}", None)
        msg = str(self)
        if msg.startswith(self.key):
            msg = msg.replace(self.key, f"{prefix}.{self.key}", 1)
        return ConfigError(msg.replace(f"e.g. {self.key}=", f"e.g. {prefix}.{self.key}="), f"{prefix}.{self.key}")


@dataclasses.dataclass(frozen=True)
class Rule:
    """A value rule declared with its field: `ok(value)` or the error says `text`. The bounds and choices
    are kept as data too (docs, and the property-based test that generates valid and invalid values)."""

    text: str
    ok: Callable[[Any], bool]
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple | None = None
    elementwise: bool = False

    def __call__(self, value: Any) -> bool:
        return bool(self.ok(value))


def gt(lo: float) -> Rule:
    return Rule(f"must be > {lo}", lambda v: v > lo, lo=lo, lo_open=True)


def ge(lo: float) -> Rule:
    return Rule(f"must be >= {lo}", lambda v: v >= lo, lo=lo)


def between(lo: float, hi: float, *, open_lo: bool = False, open_hi: bool = False) -> Rule:
    left, right = ("(" if open_lo else "["), (")" if open_hi else "]")
    return Rule(f"must lie in {left}{lo}, {hi}{right}",
                lambda v: (v > lo if open_lo else v >= lo) and (v < hi if open_hi else v <= hi),
                lo=lo, hi=hi, lo_open=open_lo, hi_open=open_hi)


def one_of(*choices: Any) -> Rule:
    return Rule(f"must be one of {', '.join(map(str, choices))}", lambda v: v in choices, choices=tuple(choices))


POSITIVE = gt(0)
NONNEG = ge(0)
UNIT = between(0.0, 1.0)
UNIT_OPEN_HI = between(0.0, 1.0, open_hi=True)


def each(rule: Rule) -> Rule:
    """A rule for every element of a tuple field."""
    return dataclasses.replace(rule, text=f"every element {rule.text}", ok=lambda v: all(rule(x) for x in v),
                               elementwise=True)


def field(default: Any = dataclasses.MISSING, *, doc: str, rule: Rule | None = None, example: Any = None,
          factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field carrying its one-line documentation (shown by `describe`), its value rule
    and a valid example for error messages (default: the field's default)."""
    meta = {"doc": doc, "rule": rule, "example": example}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_finite(v) for v in value)
    return True


def _example(f: dataclasses.Field, tp: Any) -> Any:
    """A valid value of field `f` for error messages: its declared example, its default, or a choice."""
    ex = f.metadata.get("example")
    if ex is not None:
        return ex
    if typing.get_origin(tp) is typing.Literal:
        return typing.get_args(tp)[0]
    if f.default is not dataclasses.MISSING and f.default is not None:
        return f.default
    return None


def _show(v: Any) -> str:
    if isinstance(v, tuple):
        v = list(v)
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


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
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


@dataclasses.dataclass
class Section:
    """Base of every config section: type-checked on construction, strict loading from dicts."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            tp = hints[f.name]
            value = _coerce(getattr(self, f.name), tp)
            object.__setattr__(self, f.name, value)
            if isinstance(value, Section):
                continue
            if not _type_ok(value, tp):
                raise self.error(f.name, f"expected {_type_name(tp)}")
            if not _finite(value):
                raise self.error(f.name, "must be finite")
            rule = f.metadata.get("rule")
            if rule is not None and value is not None and not rule(value):
                raise self.error(f.name, rule.text)
        self.validate()

    def validate(self) -> None:
        """Section-specific cross-field checks; raise ConfigError naming the field."""

    def error(self, name: str, rule_text: str, example: Any = None) -> ConfigError:
        """The one error style: `key=value: rule, e.g. key=example`."""
        f = next(f for f in dataclasses.fields(self) if f.name == name)
        ex = example if example is not None else _example(f, typing.get_type_hints(type(self))[name])
        tail = f", e.g. {name}={_show(ex)}" if ex is not None else ""
        return ConfigError(f"{name}={_show(getattr(self, name))}: {rule_text}{tail}", key=name)

    def check(self, ok: bool, name: str, msg: str, example: Any = None) -> None:
        if not ok:
            raise self.error(name, msg, example)

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
                              f"{path or cls.__name__}: {', '.join(sorted(names))}", key=f"{where}{unknown[0]}")
        kwargs = {}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for k, v in d.items():
            tp = hints[k]
            key = f"{path}.{k}" if path else k
            if isinstance(tp, type) and issubclass(tp, Section):
                kwargs[k] = tp.from_dict(v, key)
            else:
                v = _coerce(v, tp)
                if not _type_ok(v, tp):
                    ex = _example(fields[k], tp)
                    tail = f", e.g. {key}={_show(ex)}" if ex is not None else ""
                    raise ConfigError(f"{key}={_show(v)}: expected {_type_name(tp)}{tail}", key=key)
                kwargs[k] = v
        try:
            return cls(**kwargs)
        except ConfigError as e:
            if path and not (e.key or "").startswith(path + "."):
                raise e.under(path) from None
            raise

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
        """One line per field: name, type, default, rule, doc (for `--help-config`)."""
        hints = typing.get_type_hints(cls)
        lines = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else "(section)"
            rule = f.metadata.get("rule")
            doc = f.metadata.get("doc", "") + (f" [{rule.text}]" if rule is not None else "")
            lines.append(f"{f.name:28s} {_type_name(hints[f.name]):22s} {default!s:14s} {doc}")
        return "\n".join(lines)


def _yaml_value(raw: str) -> Any:
    """A command-line value as YAML, plus what YAML 1.1 leaves as text but a user means as a number
    (`1e-3`, `5E4`)."""
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        return raw
    if isinstance(value, str):
        try:
            return float(value) if value.strip().lower() not in ("nan", "inf", "-inf", "infinity") else value
        except ValueError:
            return value
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """`"dmd.dm_weight=20"` -> (["dmd", "dm_weight"], 20); the value is parsed as YAML (`1e-3` as a float)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. dmd.dm_weight=20")
    key, raw = text.split("=", 1)
    return key.strip().split("."), _yaml_value(raw)


def set_dotted(d: dict[str, Any], keys: list[str], value: Any) -> None:
    node = d
    for i, k in enumerate(keys[:-1]):
        if k not in node or not isinstance(node[k], dict):
            raise ConfigError(f"unknown config key {'.'.join(keys[: i + 1])}; valid keys here: "
                              f"{', '.join(sorted(n for n, v in node.items() if isinstance(v, dict)) or sorted(node))}",
                              key=".".join(keys[: i + 1]))
        node = node[k]
    if keys[-1] not in node:
        raise ConfigError(f"unknown config key {'.'.join(keys)}; valid keys here: {', '.join(sorted(node))}",
                          key=".".join(keys))
    node[keys[-1]] = value


def parse_overrides(overrides: list[str] | dict[str, Any], strict: bool = False) -> dict[str, Any]:
    """Dotted overrides as `{key: value}`, later ones winning; with `strict` (a user's command line) the same
    key given twice with different values is refused (which one was meant is not ours to guess)."""
    if isinstance(overrides, dict):
        return dict(overrides)
    out: dict[str, Any] = {}
    for text in overrides:
        keys, value = parse_override(text)
        key = ".".join(keys)
        if strict and key in out and out[key] != value:
            raise ConfigError(f"{key} is set twice, to {_show(out[key])} and {_show(value)}; "
                              f"keep one --set {key}=...", key=key)
        out[key] = value
    return out


def apply_overrides(cfg: T, overrides: list[str] | dict[str, Any]) -> T:
    """New config with dotted overrides applied (`["dmd.dm_weight=20"]` or `{"dmd.dm_weight": 20}`)."""
    d = cfg.to_dict()
    for key, value in parse_overrides(overrides).items():
        set_dotted(d, key.split("."), value)
    return type(cfg).from_dict(d)


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file; a syntax error becomes a ConfigError naming the file, line and column."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"config file {path}: cannot be read ({e.strerror})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark, ctx = getattr(e, "problem_mark", None), getattr(e, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        started = (f"; {e.context} at line {ctx.line + 1}, column {ctx.column + 1}"  # type: ignore[attr-defined]
                   if ctx is not None and getattr(e, "context", None) else "")
        raise ConfigError(f"config file {where}: invalid YAML ({problem}{started})") from None


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"dmd": {"dm_weight": 20}}` -> `{"dmd.dm_weight": 20}` (the form `apply_overrides` takes)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def read_overrides(path: str | Path) -> dict[str, Any]:
    """A partial config file (`--config FILE.yaml`: any subset of sections and keys) as dotted overrides."""
    data = read_yaml(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections (data:, dmd:, ...), "
                          f"got {type(data).__name__}")
    return flatten(data)


def load_yaml(cls: type[T], path: str | Path) -> T:
    return cls.from_dict(read_yaml(path) or {})


def dump_yaml(cfg: Section) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
