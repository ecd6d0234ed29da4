"""Loading a configuration: defaults, then a YAML preset, then dotted ``section.field=value``
overrides, each value type-checked against the dataclass field, every problem at once."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from catvton.config.sections import Config, ConfigError, validate




def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """Whether ``value`` fits annotation ``tp``; returns the (lightly coerced) value."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _type_ok(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):  # YAML 1.1 reads "5e-5" (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if tp is str:
        return isinstance(value, str), value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            return False, value
        out = []
        for item in value:
            ok, v = _type_ok(item, item_tp)
            if not ok:
                return False, value
            out.append(v)
        return True, out
    raise TypeError(f"config annotation {tp!r} is not supported")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def apply_mapping(obj: Any, values: dict[str, Any], where: str, problems: list[str]) -> None:
    """Set the fields of dataclass ``obj`` (nested sections too) from ``values``, type-checked;
    every problem (unknown key with a "did you mean", wrong type) is appended to ``problems``.
    Any typed dataclass works (the serving settings use it too)."""
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in values.items():
        path = f"{where}{key}"
        if key not in names:
            near = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {where}{near[0]}?)" if near else f" (known: {', '.join(names)})"
            problems.append(f"unknown key {path}{hint}")
            continue
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                problems.append(f"{path} is a section: give it a mapping, not {value!r}")
            else:
                apply_mapping(current, value, f"{path}.", problems)
            continue
        ok, coerced = _type_ok(value, hints[key])
        if not ok:
            problems.append(f"{path}={value!r}: expected {_type_name(hints[key])}")
        else:
            setattr(obj, key, coerced)


def dotted_to_nested(overrides: list[str], problems: list[str]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            problems.append(f"override {item!r} is not of the form section.field=value")
            continue
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"override {item!r} conflicts with another override")
                break
        else:
            node[parts[-1]] = value
    return nested


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file at ``path``, then ``overrides``; raises :class:`ConfigError`."""
    cfg = Config()
    problems: list[str] = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError([f"config file {path} does not exist (presets are in configs/)"])
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError([f"{path} must hold a mapping of sections"])
        apply_mapping(cfg, loaded, "", problems)
    apply_mapping(cfg, dotted_to_nested(list(overrides or []), problems), "", problems)
    if not problems:
        problems = validate(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """``cfg`` with dotted ``section.field=value`` overrides applied in place (and returned),
    type-checked and validated; raises :class:`ConfigError` with every problem."""
    problems: list[str] = []
    apply_mapping(cfg, dotted_to_nested(list(overrides), problems), "", problems)
    if not problems:
        problems = validate(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def config_from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a :class:`Config` from :meth:`Config.to_dict` (e.g. inside a Ray worker)."""
    cfg = Config()
    problems: list[str] = []
    apply_mapping(cfg, d, "", problems)
    if problems:
        raise ConfigError(problems)
    return cfg


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, default, doc) for every field: the reference used by ``--help`` and docs."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            docs[a.target.id] = " ".join(str(b.value.value).split())  # type: ignore[union-attr]
    rows = []
    inst = cls()
    for f in dataclasses.fields(cls):
        val = getattr(inst, f.name)
        if dataclasses.is_dataclass(val):
            rows += describe(type(val), f"{prefix}{f.name}.")
        else:
            rows.append((f"{prefix}{f.name}", repr(val), docs.get(f.name, "")))
    return rows
