"""Typed configs: a dataclass is the single source of a job's settings.

Precedence, lowest first: the dataclass defaults, a YAML file (`--config FILE`), then
command-line flags. Every field becomes a flag named after it (`min_user_interactions`
-> `--min-user-interactions`); its help text is the field's `metadata["help"]`, so
`--help` documents every setting in one place.

A field whose type is itself a dataclass is a group (e.g. `backbone: BackboneConfig`):
its fields become flags without a prefix, except a field called `name`, which takes the
group's own flag (`backbone.name` -> `--backbone`). In YAML a group is a nested mapping.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar

import yaml

T = TypeVar("T")


def field(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:
    """A dataclass field that carries its `--help` text. Mutable defaults go in
    `default_factory`."""
    metadata = {"help": help}
    if "default_factory" in kwargs:
        return dataclasses.field(default_factory=kwargs.pop("default_factory"), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _is_group(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _group_defaults(f: dataclasses.Field) -> dict[str, Any]:
    """A group's defaults as set by its parent (e.g. a teacher's 8 layers), if any."""
    default = _default(f)
    return dataclasses.asdict(default) if dataclasses.is_dataclass(default) else {}


def _leaves(cls: type, prefix: tuple[str, ...] = (), group_flag: str | None = None,
            overrides: dict[str, Any] | None = None):
    """(path, field, type, flag, default) for every non-group field, groups flattened."""
    hints = typing.get_type_hints(cls)
    overrides = overrides or {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_group(tp):
            yield from _leaves(tp, prefix + (f.name,), f.name, _group_defaults(f))
        else:
            name = group_flag if (f.name == "name" and group_flag) else f.name
            default = overrides.get(f.name, _default(f))
            yield prefix + (f.name,), f, tp, flag_name(name), default


def _add_flag(parser: argparse.ArgumentParser, path: tuple[str, ...], f: dataclasses.Field, tp: Any,
              flag: str, default: Any) -> None:
    tp, optional = _unwrap_optional(tp)
    help_text = f.metadata.get("help", "")
    shown = " (required)" if _required(f) else f" (default: {default})"
    kwargs: dict[str, Any] = {"dest": ".".join(path), "default": argparse.SUPPRESS, "help": help_text + shown}
    if tp is not bool and typing.get_origin(tp) is not Literal:
        kwargs["metavar"] = flag[2:].upper().replace("-", "_")
    origin = typing.get_origin(tp)
    if tp is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
    elif origin is Literal:
        choices = list(typing.get_args(tp))
        parser.add_argument(flag, type=type(choices[0]), choices=choices, **kwargs)
    elif origin in (list, tuple) or tp in (list, tuple):
        item_tp = (typing.get_args(tp) or (str,))[0]
        # extend: a repeated flag adds to the list (`--model a --model b`).
        parser.add_argument(flag, type=_unwrap_optional(item_tp)[0], nargs="*" if optional else "+",
                            action="extend", **kwargs)
    elif tp in (int, float, str):
        parser.add_argument(flag, type=tp, **kwargs)
    elif origin is dict or tp is dict:
        parser.add_argument(flag, type=json.loads, **kwargs)
    else:
        raise TypeError(f"config field {'.'.join(path)!r}: unsupported type {tp!r}")


def build_parser(cls: type, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    # No abbreviations: a mistyped flag that happens to be a prefix must not pass silently.
    parser = argparse.ArgumentParser(
        description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False)
    parser.add_argument("--config", type=Path, default=None,
                        help="YAML file of settings (field names as keys); flags override it")
    seen: dict[str, str] = {}
    for path, f, tp, flag, default in _leaves(cls):
        if flag in seen:
            raise TypeError(f"{cls.__name__}: flag {flag} is defined by both {seen[flag]} and {'.'.join(path)}")
        seen[flag] = ".".join(path)
        _add_flag(parser, path, f, tp, flag, default)
    return parser


def _coerce_value(tp: Any, value: Any) -> Any:
    tp, _ = _unwrap_optional(tp)
    if typing.get_origin(tp) is tuple and isinstance(value, list):
        return tuple(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _build(cls: type, values: dict[str, Any], source: str) -> Any:
    """Instantiate `cls` from a nested mapping, naming unknown or missing settings."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{source}: unknown setting(s) {unknown}; known: {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        tp = hints[name]
        if _is_group(tp):
            sub = values.get(name, {})
            if dataclasses.is_dataclass(sub):
                sub = dataclasses.asdict(sub)
            if not isinstance(sub, dict):
                raise ValueError(f"{source}: {name!r} must be a mapping of settings, got {type(sub).__name__}")
            kwargs[name] = _build(tp, {**_group_defaults(f), **sub}, source)
        elif name in values:
            kwargs[name] = _coerce_value(tp, values[name])
    missing = [flag for path, f, _, flag, _ in _leaves(cls)
               if len(path) == 1 and _required(f) and path[0] not in kwargs]
    if missing:
        raise ValueError(f"missing required setting(s): {', '.join(missing)}")
    return cls(**kwargs)


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise ValueError(f"config file {path}: cannot read ({e.strerror})") from e
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path}: invalid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a mapping of settings, got {type(data).__name__}")
    return data


def from_dict(cls: type[T], values: dict[str, Any], source: str = "config") -> T:
    """Build a config from a (nested) mapping, e.g. one saved with `to_dict`."""
    return _build(cls, values, source)


def parse_config(cls: type[T], description: str, argv: Sequence[str] | None = None,
                 epilog: str | None = None) -> T:
    """Parse defaults < YAML (--config) < flags into `cls`; exits with a usage message
    naming the missing or invalid setting."""
    parser = build_parser(cls, description, epilog)
    args = vars(parser.parse_args(argv))
    config_path = args.pop("config")
    flags: dict[str, Any] = {}
    for dotted, value in args.items():
        node = flags
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        values = load_yaml(config_path) if config_path is not None else {}
        return _build(cls, _merge(values, flags), f"config file {config_path}" if config_path else "command line")
    except (TypeError, ValueError) as e:
        parser.error(str(e))


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: Any, path: Path) -> None:
    Path(path).write_text(yaml.safe_dump(json.loads(json.dumps(to_dict(config))), sort_keys=False))
