"""The one `from_dict` of every config dataclass: the dataclasses are the schema, values are checked against them.

A recipe value of the wrong type is a user error naming its key, not a `TypeError` deep in the run:
`train.steps=2.5`, `train.steps=ten`, `train.resume=no` (Hydra passes the string "no") are each one line saying
which key wants what. Unknown keys are named with the valid ones. Nested dataclass fields take a mapping.

It lives in `model/` because that is the lowest package every config-holding package (data, train, rl) imports.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping, Optional, Type, TypeVar, Union

from .errors import UserError

T = TypeVar("T")


class SchemaError(UserError, ValueError):
    """A config value does not fit its dataclass field (the message names the key)."""


def plain(values: Any) -> Any:
    """An OmegaConf node (or anything else) as plain Python containers; plain values pass through."""
    if values is None or isinstance(values, (dict, list, tuple, str, int, float, bool)):
        return values
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(values):
            return OmegaConf.to_container(values, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return values


def from_dict(cls: Type[T], values: Any, prefix: str, error: Type[Exception] = SchemaError) -> T:
    """`cls(**values)` after checking every key and value against `cls`'s fields; `prefix` names the recipe group
    (`train`, `rl.trainer`) in messages, "" for a command's own options; `error` is the exception class raised
    (the package's config error)."""
    if isinstance(values, cls):
        return values
    values = plain(values)
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise error(f"{prefix} must be a mapping of {cls.__name__} fields, got {values!r}")
    settable = {f.name: f for f in dataclasses.fields(typing.cast(Any, cls)) if f.init}
    unknown = sorted(set(values) - set(settable))
    moved = {key: getattr(cls, "MOVED_KEYS", {}).get(key) for key in unknown}
    if any(moved.values()):
        where = f"{prefix}." if prefix else ""
        raise error(
            "; ".join(f"{where}{key} is now {where}{new}" for key, new in moved.items() if new)
            + ": rename it in the recipe or override"
        )
    if unknown and not prefix:
        raise error(f"unknown option(s) {unknown}; options: {', '.join(sorted(settable))}")
    if unknown:
        raise error(
            f"unknown {prefix} config key(s) {unknown}; valid keys: {sorted(settable)}. "
            f"Fix the recipe's `{prefix}:` section or the override."
        )
    hints = typing.get_type_hints(cls)
    checked = {
        name: _check(
            _onto_default(settable[name], value), hints.get(name, Any), f"{prefix}.{name}" if prefix else name, error
        )
        for name, value in values.items()
    }
    try:
        return cls(**checked)
    except UserError:
        raise
    except (ValueError, TypeError) as exc:  # a dataclass's own check: one line under `error`, naming where
        raise error(f"{prefix}: {exc}" if prefix else str(exc)) from None


def _onto_default(field: dataclasses.Field, value: Any) -> Any:
    """A mapping for a nested dataclass field, laid over that field's own default (its default_factory's
    instance), as Hydra lays a recipe over `defaults_of`: `judge: {engine: {max_seq_len: 4096}}` keeps the
    judge's engine defaults (max_batch 16), which are not EngineConfig's."""
    if not isinstance(value, Mapping) or field.default_factory is dataclasses.MISSING:
        return value
    default = field.default_factory()
    if not dataclasses.is_dataclass(default) or isinstance(default, type):
        return value
    return {**{f.name: getattr(default, f.name) for f in dataclasses.fields(default) if f.init}, **value}


def moved_key(cls: type, path: list, prefix: str) -> Optional[str]:
    """For a dotted key under `cls` (`["rollout", "max_batch"]`) that names a field moved elsewhere (a class's
    `MOVED_KEYS`), the line that says where it went; None for any other key."""
    name, rest = path[0], path[1:]
    settable = {f.name for f in dataclasses.fields(typing.cast(Any, cls)) if f.init}
    if name not in settable:
        new = getattr(cls, "MOVED_KEYS", {}).get(name)
        return f"{prefix}.{name} is now {prefix}.{new}: rename it in the recipe or override" if new else None
    kind = typing.get_type_hints(cls).get(name)
    options = [a for a in typing.get_args(kind) if a is not type(None)] or [kind]
    nested = [a for a in options if isinstance(a, type) and dataclasses.is_dataclass(a)]
    return moved_key(nested[0], rest, f"{prefix}.{name}") if rest and nested else None


def defaults_of(cls: type) -> dict:
    """`cls`'s settable fields and their defaults as plain YAML values (nested dataclasses as mappings, tuples as
    lists): the node Hydra composes a recipe group onto, so a YAML file holds only what it changes."""
    return _plain_default(cls())


def _plain_default(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain_default(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, (list, tuple)):
        return [_plain_default(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain_default(v) for k, v in value.items()}
    return value


def _describe(kind: Any) -> str:
    return getattr(kind, "__name__", None) or str(kind).replace("typing.", "")


def _check(value: Any, kind: Any, key: str, error: Type[Exception]) -> Any:
    """`value` converted to `kind` where that is lossless (an int for a float field, a list for a tuple), else
    an `error` naming `key`."""
    if kind is Any or isinstance(kind, TypeVar):
        return value
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1 and dataclasses.is_dataclass(options[0]):  # its own message names the nested key
            return from_dict(typing.cast(type, options[0]), value, key, error)
        failures = []
        for option in options:
            try:
                return _check(value, option, key, error)
            except error as e:  # try the next member of the union
                failures.append(str(e))
        wanted = " or ".join(_describe(a) for a in options) + (" or null" if type(None) in args else "")
        raise error(f"{key} must be {wanted}, got {value!r}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise error(f"{key} must be one of {list(args)}, got {value!r}")
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        return from_dict(kind, value, key, error)
    if origin in (list, tuple, set, frozenset) or kind in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise error(f"{key} must be a list, got {value!r}")
        container = origin or kind
        if container is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise error(f"{key} must have {len(args)} items, got {value!r}")
            return tuple(_check(v, a, f"{key}[{i}]", error) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        return container(_check(v, item, f"{key}[{i}]", error) for i, v in enumerate(value))
    if origin is dict or kind is dict:
        if not isinstance(value, Mapping):
            raise error(f"{key} must be a mapping, got {value!r}")
        if args:
            return {k: _check(v, args[1], f"{key}.{k}", error) for k, v in value.items()}
        return dict(value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise error(f"{key} must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise error(f"{key} must be an integer, got {value!r}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise error(f"{key} must be a number, got {value!r}")
    if kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # Hydra parses `run_name=123` as a number
        raise error(f"{key} must be a string, got {value!r}")
    if isinstance(kind, type):
        if isinstance(value, kind):
            return value
        raise error(f"{key} must be a {kind.__name__}, got {value!r}")
    return value
