"""Build typed dataclass configs from plain dicts, rejecting anything unknown or mistyped.

Every error names the full dotted key, so `sft.lora.r: expected an integer, got 'eight'`
points at the exact line a user has to fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from pipeline.errors import ConfigError


def _suggest(key: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{hint}; valid keys: {', '.join(sorted(choices))}"


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if origin in (list, dict):
        return getattr(origin, "__name__", str(origin))
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against type `tp` and return it, converted where lossless (int -> float)."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping of keys, got {value!r}")
        return from_dict(tp, value, key)
    if origin is Literal:
        if value not in get_args(tp):
            choices = [str(a) for a in get_args(tp)]
            close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(key, f"got {value!r}{hint}; allowed: {', '.join(repr(a) for a in get_args(tp))}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own error is the most precise
            return coerce(value, options[0], key)
        for arg in options:
            try:
                return coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(key, f"expected {_describe(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {value!r}")
        (item_tp,) = get_args(tp) or (Any,)
        return [coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        _, val_tp = get_args(tp) or (str, Any)
        return {str(k): coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {key}")


def from_dict(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """Instantiate dataclass `cls` from `data`; unknown keys and bad values raise ConfigError."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(full, "unknown key" + _suggest(str(key), list(fields)))
        kwargs[key] = coerce(value, hints[key], full)
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{prefix}.{missing[0]}" if prefix else missing[0], "required key is missing")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(prefix)
    return obj


def to_dict(obj: Any) -> Any:
    """Plain-dict form of a config, for YAML, hashing and manifests."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def doc(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with a default and help text (mutable defaults get a factory)."""
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        factory = (lambda d=default: dataclasses.replace(d)) if dataclasses.is_dataclass(default) else (
            lambda d=default: type(d)(d)
        )
        return dataclasses.field(default_factory=factory, metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def check(condition: bool, key: str, message: str) -> None:
    """Raise ConfigError(key, message) unless `condition` holds."""
    if not condition:
        raise ConfigError(key, message)


SEED_MAX = 2**32 - 1  # numpy's and torch's seeding accept 0 .. 2^32 - 1


def check_seed(value: int, key: str) -> None:
    check(0 <= value <= SEED_MAX, key, f"must be in [0, {SEED_MAX}] (got {value})")
