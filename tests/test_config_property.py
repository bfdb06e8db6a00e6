"""Property-based tests of the config schema (Hypothesis): every field's declared type and rule.

- A random *invalid* value for a random field raises the platform's `ConfigError`, whose `key` names
  exactly that dotted field (and nothing else is raised: no TypeError, no traceback from deep inside).
- A random *valid* change of a few fields round-trips through YAML unchanged.
Strategies are derived from the schema itself (type hints, `Literal` choices, the `Rule` bounds declared
with each field), so a new field is covered without touching this file.
"""

from __future__ import annotations

import dataclasses
import math
import string
import types
import typing

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dmvae_study.config import ExperimentConfig
from dmvae_study.presets import preset
from dmvae_study.configlib import ConfigError, Rule, Section, dump_yaml, load_yaml

FIELDS = [(sec.name, f) for sec in dataclasses.fields(ExperimentConfig)
          for f in dataclasses.fields(typing.get_type_hints(ExperimentConfig)[sec.name])]
HINTS = {name: typing.get_type_hints(typing.get_type_hints(ExperimentConfig)[name]) for name, _ in FIELDS}
TEXT = st.text(alphabet=string.ascii_letters + string.digits + "_-./", min_size=1, max_size=12)


def _optional(tp):
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return tp, False


def _number(tp, rule: Rule | None, valid: bool):
    lo = rule.lo if rule is not None and rule.lo is not None else None
    hi = rule.hi if rule is not None and rule.hi is not None else None
    if tp is int:
        if valid:
            a = None if lo is None else int(math.floor(lo)) + (1 if rule.lo_open or lo != int(lo) else 0)
            b = None if hi is None else int(math.ceil(hi)) - (1 if rule.hi_open or hi != int(hi) else 0)
            return st.integers(min_value=a if a is not None else -10**6, max_value=b if b is not None else 10**6)
        bad = [st.floats(allow_nan=False, allow_infinity=False).filter(lambda v: v != int(v)),
               TEXT.filter(lambda s: not _is_number(s))]
        if lo is not None:
            bad.append(st.integers(max_value=int(lo) - (0 if rule.lo_open else 1), min_value=-10**9))
        if hi is not None:
            bad.append(st.integers(min_value=int(hi) + (0 if rule.hi_open else 1), max_value=10**9))
        return st.one_of(bad)
    if valid:
        return st.floats(min_value=lo if lo is not None else -1e6, max_value=hi if hi is not None else 1e6,
                         exclude_min=bool(rule and rule.lo_open), exclude_max=bool(rule and rule.hi_open),
                         allow_nan=False, allow_infinity=False)
    bad = [st.just(float("nan")), st.just(float("inf")), TEXT.filter(lambda s: not _is_number(s))]
    if lo is not None:
        bad.append(st.floats(max_value=lo, exclude_max=not rule.lo_open, min_value=lo - 1e6, allow_nan=False))
    if hi is not None:
        bad.append(st.floats(min_value=hi, exclude_min=not rule.hi_open, max_value=hi + 1e6, allow_nan=False))
    return st.one_of(bad)


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def values(section: str, f: dataclasses.Field, valid: bool):
    """A strategy of valid (or invalid) values for one field, from its type and declared rule."""
    tp, optional = _optional(HINTS[section][f.name])
    rule: Rule | None = f.metadata.get("rule")
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        s = st.sampled_from(choices) if valid else TEXT.filter(lambda v: v not in choices)
    elif rule is not None and rule.choices is not None:
        named = {str(c) for c in rule.choices}  # TEXT can draw a choice itself ("B" of the DiT sizes)
        s = st.sampled_from(rule.choices) if valid else st.one_of(
            st.integers(-10**6, 10**6).filter(lambda v: v not in rule.choices), TEXT.filter(lambda v: v not in named))
    elif tp is bool:
        s = st.booleans() if valid else st.one_of(st.integers(2, 9), TEXT.filter(lambda v: v.lower() not in (
            "true", "false", "yes", "no", "on", "off")))
    elif tp in (int, float):
        s = _number(tp, rule if rule is None or not rule.elementwise else None, valid)
    elif origin is tuple:
        args = typing.get_args(tp)
        inner = args[0]
        elem = _number(inner, dataclasses.replace(rule, elementwise=False) if rule else None, True)
        n = len(args) if args[-1] is not Ellipsis else None
        if valid:
            s = st.lists(elem, min_size=n or 1, max_size=n or 5).map(tuple)
        else:
            bad_elem = _number(inner, dataclasses.replace(rule, elementwise=False) if rule else None, False)
            s = st.lists(bad_elem, min_size=n or 1, max_size=n or 3).map(tuple) if rule else st.just("x")
    elif tp is str:
        s = TEXT if valid else st.one_of(st.integers(), st.lists(st.integers(), max_size=2))
    else:
        raise AssertionError(f"no strategy for {section}.{f.name}: {tp}")
    if optional and valid:
        s = st.one_of(st.none(), s)
    return s


@st.composite
def invalid_setting(draw):
    section, f = draw(st.sampled_from(FIELDS))
    return section, f.name, draw(values(section, f, valid=False))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(invalid_setting())
def test_an_invalid_value_names_its_field(setting):
    section, name, value = setting
    d = preset("smoke").to_dict()
    d[section][name] = list(value) if isinstance(value, tuple) else value
    with pytest.raises(ConfigError) as e:
        ExperimentConfig.from_dict(d)
    assert e.value.key == f"{section}.{name}", (str(e.value), value)
    assert str(e.value).startswith(f"{section}.{name}"), str(e.value)


@st.composite
def valid_changes(draw):
    picks = draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3, unique_by=lambda p: (p[0], p[1].name)))
    return [(s, f.name, draw(values(s, f, valid=True))) for s, f in picks]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(valid_changes())
def test_valid_configs_round_trip_through_yaml(tmp_path_factory, changes):
    d = preset("smoke").to_dict()
    for section, name, value in changes:
        d[section][name] = list(value) if isinstance(value, tuple) else value
    try:
        cfg = ExperimentConfig.from_dict(d)
    except ConfigError as e:  # a cross-field rule (grid, batch vs workers, time range): not a field's own
        assert e.key is not None
        assume(False)
    path = tmp_path_factory.mktemp("yaml") / "c.yaml"
    path.write_text(dump_yaml(cfg))
    again = load_yaml(ExperimentConfig, path)
    assert again == cfg and again.digest() == cfg.digest()


def test_every_field_declares_a_doc_and_numbers_a_rule():
    """Numeric fields carry their range; a new numeric field without one fails here."""
    unruled = []
    for section, f in FIELDS:
        assert f.metadata.get("doc"), f"{section}.{f.name} has no doc"
        tp, _ = _optional(HINTS[section][f.name])
        if tp in (int, float) and f.metadata.get("rule") is None and not issubclass(type(tp), type(Section)):
            unruled.append(f"{section}.{f.name}")
    assert not unruled, f"numeric fields without a declared rule: {unruled}"
