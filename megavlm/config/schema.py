"""Strict conversion between plain dicts (YAML) and the typed config dataclasses.

Every error names the dotted key and, when known, the file it came from, so a typo in a recipe
fails before any process group or model is built.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin


class ConfigError(ValueError):
    """A recipe or override that does not match the config schema."""


def _where(key: str, source: str | None) -> str:
    return f"'{key}'" + (f" in {source}" if source else "")


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str, source: str | None) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key, source)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"bad value {value!r} for {_where(key, source)}: " + "; ".join(errors))
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"bad value {value!r} for {_where(key, source)}: expected {_type_name(tp)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"bad value {value!r} for {_where(key, source)}: expected a list")
        (item_tp, *_rest) = get_args(tp) or (Any,)
        items = [_convert(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"bad value {value!r} for {_where(key, source)}: expected a mapping")
        _, val_tp = get_args(tp) or (Any, Any)
        return {k: _convert(v, val_tp, f"{key}.{k}", source) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"bad value {value!r} for {_where(key, source)}: expected a mapping")
        return from_dict(tp, value, source=source, prefix=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"bad value {value!r} for {_where(key, source)}: expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"bad value {value!r} for {_where(key, source)}: expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"bad value {value!r} for {_where(key, source)}: expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"bad value {value!r} for {_where(key, source)}: expected a string")
    raise ConfigError(f"unsupported field type {tp} for {_where(key, source)}")


def from_dict(cls: type, data: dict, source: str | None = None, prefix: str = ""):
    """Build dataclass ``cls`` from ``data``; unknown keys and bad values raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping for {_where(prefix or cls.__name__, source)}, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            close = difflib.get_close_matches(str(name), list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key {_where(key, source)}{hint}; "
                              f"allowed: {', '.join(sorted(fields))}")
        kwargs[name] = _convert(value, hints[name], key, source)
    try:
        obj = cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{err}" + (f" (in {source})" if source and source not in str(err) else "")) from None
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"{_where(prefix or cls.__name__, source)}: {err}") from None
    return obj


def to_dict(obj) -> dict:
    """The plain-dict (YAML-ready) form of a config dataclass."""
    return dataclasses.asdict(obj)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into a key path and a YAML-parsed value."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    return key.split("."), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key=value`` overrides to a nested dict (keys are validated later by from_dict)."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return data


def check(condition: bool, key: str, message: str) -> None:
    """Validation helper for __post_init__: raise ConfigError naming ``key``."""
    if not condition:
        raise ConfigError(f"bad value for '{key}': {message}")


def with_overrides(obj, overrides: list[str], source: str = "overrides"):
    """A copy of config dataclass ``obj`` with ``key=value`` overrides applied and validated."""
    return from_dict(type(obj), apply_overrides(to_dict(obj), list(overrides)), source=source)
