"""YAML file + ``section.key=value`` overrides -> a validated, frozen `Config`; and back to YAML."""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from raypipe.config.schema import Config, check_setting
from raypipe.errors import ConfigError


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming `key`."""
    origin = get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"config key '{key}': bad value {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        check_setting(value in choices, key, f"{value!r} is not one of {list(choices)}")
        return value
    if origin is list:
        check_setting(isinstance(value, list), key, f"expected a list, got {value!r}")
        (item_tp,) = get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        check_setting(isinstance(value, bool), key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        is_int = isinstance(value, int) and not isinstance(value, bool)
        check_setting(is_int, key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        check_setting(ok, key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        check_setting(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        check_setting(isinstance(value, dict), key, f"expected a mapping of settings, got {value!r}")
        return _build(tp, value, key)
    raise ConfigError(f"config key '{key}': unsupported type {_type_name(tp)}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    base = cls()  # unspecified fields keep the class's defaults; nested sections merge into them
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            hint = "; a `sweep:` section is read by `raypipe sweep`" if full == "sweep" else ""
            raise ConfigError(f"unknown config key '{full}'; known keys here: {sorted(hints)}{hint}")
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            value = {**dataclasses.asdict(getattr(base, key)), **value}
        kwargs[key] = _coerce(value, hints[key], full)
    return dataclasses.replace(base, **kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{dotted}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not key=value; write e.g. noise.rate=0.4")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    return tree


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    defaults: list[str] | None = None,
    schema: type[Config] = Config,
) -> Config:
    """Built-in defaults <- `defaults` (key=value, e.g. a job's own) <- YAML file <- key=value
    overrides, validated. `schema` is `Config` for a run, `raypipe.sweep.SweepJobConfig` for a sweep."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            what = "is a folder, not a file" if path.is_dir() else "does not exist"
            raise ConfigError(f"config file '{path}' {what}; pass an existing YAML file to --config")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file '{path}' is not a text (UTF-8) file; pass a YAML file") from None
        except OSError as e:
            raise ConfigError(f"config file '{path}' cannot be read ({e.strerror or e})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections")
        tree = loaded or {}
    tree = _deep_merge(parse_overrides(defaults or []), tree)
    tree = _deep_merge(tree, parse_overrides(overrides or []))
    return config_from_dict(tree, schema)


def config_from_dict(tree: dict[str, Any], schema: type[Config] = Config) -> Config:
    return _build(schema, tree).validate()


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
