"""Typed configs: a dataclass is the single source of a job's settings.

Precedence, lowest first: the dataclass defaults, a YAML file (`--config FILE`), then
command-line flags. Every field becomes a flag named after it (`min_user_interactions`
-> `--min-user-interactions`); its help text is the field's `metadata["help"]`, so
`--help` documents every setting in one place.
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


def _add_flag(parser: argparse.ArgumentParser, f: dataclasses.Field, tp: Any) -> None:
    tp, optional = _unwrap_optional(tp)
    help_text = f.metadata.get("help", "")
    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
    required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    shown = f" (default: {default})" if not required else " (required)"
    kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text + shown}
    origin = typing.get_origin(tp)
    if tp is bool:
        parser.add_argument(flag_name(f.name), action=argparse.BooleanOptionalAction, **kwargs)
        return
    if origin is Literal:
        choices = list(typing.get_args(tp))
        parser.add_argument(flag_name(f.name), type=type(choices[0]), choices=choices, **kwargs)
        return
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (str,)
        item_tp, _ = _unwrap_optional(item_tp)
        parser.add_argument(flag_name(f.name), type=item_tp, nargs="*" if optional else "+", **kwargs)
        return
    if tp in (int, float, str):
        parser.add_argument(flag_name(f.name), type=tp, **kwargs)
        return
    if origin is dict or tp is dict:
        parser.add_argument(flag_name(f.name), type=json.loads, **kwargs)
        return
    raise TypeError(f"config field {f.name!r}: unsupported type {tp!r}")


def build_parser(cls: type, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description, epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None,
                        help="YAML file of settings (field names as keys); flags override it")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        _add_flag(parser, f, hints[f.name])
    return parser


def _coerce(cls: type, values: dict[str, Any], source: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{source}: unknown setting(s) {unknown}; known: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in values.items():
        tp, _ = _unwrap_optional(hints[key])
        if typing.get_origin(tp) is tuple and isinstance(value, list):
            value = tuple(value)
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        out[key] = value
    return out


def load_yaml(cls: type[T], path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise ValueError(f"config file {path}: cannot read ({e.strerror})") from e
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a mapping of settings, got {type(data).__name__}")
    return _coerce(cls, data, f"config file {path}")


def parse_config(cls: type[T], description: str, argv: Sequence[str] | None = None,
                 epilog: str | None = None) -> T:
    """Parse defaults < YAML (--config) < flags into `cls`; exits with a usage message
    naming the missing or invalid setting."""
    parser = build_parser(cls, description, epilog)
    args = vars(parser.parse_args(argv))
    config_path = args.pop("config")
    values: dict[str, Any] = {}
    try:
        if config_path is not None:
            values.update(load_yaml(cls, config_path))
        values.update(_coerce(cls, args, "command line"))
        missing = [flag_name(f.name) for f in dataclasses.fields(cls)
                   if f.name not in values and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ValueError(f"missing required setting(s): {', '.join(missing)}")
        config = cls(**values)
    except (TypeError, ValueError) as e:
        parser.error(str(e))
    return config


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: Any, path: Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
