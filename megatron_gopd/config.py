"""Typed configs: dataclasses filled from YAML files and ``key.sub=value`` command-line overrides.

Every component keeps its own ``@dataclass`` config next to its code, with a docstring under every
field; a job's config is a dataclass composing them. This module turns YAML into those dataclasses
and checks it once, at start-up:

    cfg = load_config(TrainConfig, "examples/configs/tiny.yaml", ["optim.lr=3e-5", "rollout.n=4"])

An unknown key, a value of the wrong type or a failed ``__post_init__`` check raises `ConfigError`
naming the dotted key and where it came from (the file, or the command-line override). Supported
field types: bool, int, float, str, Optional[...], list[...], tuple[..., ...], dict[str, ...],
Literal[...], Any and nested dataclasses.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, TypeVar, Union

import yaml

T = TypeVar("T")

_MISSING = object()


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and its source."""


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; a missing, unreadable or malformed file is a `ConfigError` naming it."""
    import json

    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON (not UTF-8 text: {err.reason})") from err
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror or err})") from err


def load_config(cls: type[T], path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> T:
    """Build a `cls` from a YAML file (optional) and ``a.b=value`` overrides, checked.

    Override values are parsed as YAML (``lr=1e-5`` is a float, ``stop=[1,2]`` a list,
    ``ref=null`` None); a value that must be a string may be written bare.
    """
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        data = read_yaml(path)
    overridden: set[str] = set()
    for override in overrides:
        key, value = parse_override(override)
        set_dotted(data, key, value)
        overridden.add(key)
    return from_dict(cls, data, source=source, overridden=overridden)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from `path`; ConfigError when missing, unparsable or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=1e-5"`` -> ``("optim.lr", 1e-05)``."""
    key, sep, raw = text.partition("=")
    key = key.strip().lstrip("-")
    if not sep or not key:
        raise ConfigError(f"command-line override {text!r} must look like key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data["a"]["b"] = value`` for ``key="a.b"``, creating the intermediate mappings."""
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def from_dict(
    cls: type[T], data: Any, *, source: str = "<dict>", overridden: set[str] = frozenset(), prefix: str = ""
) -> T:
    """Convert a nested mapping into dataclass `cls`, checking every key and type."""
    if not isinstance(data, dict):
        raise _error(
            prefix or "<root>", f"expected a mapping for {cls.__name__}, got {type(data).__name__}", source, overridden
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = (
            f" (did you mean {_join(prefix, close[0])!r}?)"
            if close
            else (f" (known keys: {', '.join(sorted(fields))})")
        )
        raise _error(_join(prefix, key), f"unknown key{hint}", source, overridden)
    kwargs = {
        name: _convert(hints[name], value, _join(prefix, name), source, overridden) for name, value in data.items()
    }
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise _error(prefix or cls.__name__, str(err), source, overridden) from err


def to_dict(cfg: Any) -> Any:
    """A plain (YAML/JSON-serialisable) copy of a config dataclass."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def dump_yaml(cfg: Any, path: str | Path) -> None:
    """Write the resolved config (what a run actually used) next to its outputs."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------------------------


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _error(key: str, message: str, source: str, overridden: set[str]) -> ConfigError:
    from_cli = any(key == k or key.startswith(k + ".") or k.startswith(key + ".") for k in overridden)
    where = "command-line override" if from_cli else source
    return ConfigError(f"config key {key!r} ({where}): {message}")


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _convert(tp: Any, value: Any, key: str, source: str, overridden: set[str]) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    fail = lambda expected: _error(key, f"expected {expected}, got {_describe(value)}", source, overridden)  # noqa: E731

    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(option, value, key, source, overridden)
            except ConfigError as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]
        raise fail(" or ".join(_type_name(a) for a in args))
    if origin is Literal:
        if value not in args:
            raise fail("one of " + ", ".join(repr(a) for a in args))
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source=source, overridden=overridden, prefix=key)
    if origin in (list, Sequence) or tp is list:
        if not isinstance(value, (list, tuple)):
            raise fail(f"a list of {_type_name(args[0]) if args else 'values'}")
        inner = args[0] if args else Any
        return [_convert(inner, v, f"{key}[{i}]", source, overridden) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise fail("a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{key}[{i}]", source, overridden) for i, v in enumerate(value))
        if len(args) != len(value):
            raise fail(f"a list of {len(args)} values")
        return tuple(_convert(a, v, f"{key}[{i}]", source, overridden) for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise fail("a mapping")
        inner = args[1] if args else Any
        return {k: _convert(inner, v, f"{key}.{k}", source, overridden) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise fail("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("an integer")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads `3e-3` as a string; it only knows `3.0e-3` as a float.
            try:
                return float(value)
            except ValueError:
                raise fail("a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail("a number")
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list, bool)) or value is None:
            raise fail("a string")
        # YAML turns bare `1e-5`-like or `yes` strings into other types; a str field takes them back.
        return value if isinstance(value, str) else str(value)
    if isinstance(tp, type):
        if not isinstance(value, tp):
            raise fail(tp.__name__)
        return value
    raise _error(key, f"field type {tp!r} is not supported by the config loader", source, overridden)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
