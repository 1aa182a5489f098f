"""Typed configs: defaults < YAML < flags, nested groups, clear errors."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import pytest

from slmrec.config import field, from_dict, parse_config, save_config, to_dict


@dataclass(kw_only=True)
class Inner:
    name: str = field("scratch", help="which one")
    layers: Optional[int] = field(None, help="depth")


@dataclass(kw_only=True)
class Job:
    data: str = field(help="input")
    lr: float = field(1e-3, help="learning rate")
    mode: Literal["a", "b"] = field("a", help="mode")
    flag: bool = field(False, help="a switch")
    sizes: tuple[int, ...] = field((1, 2), help="sizes")
    backbone: Inner = field(default_factory=lambda: Inner(layers=8), help="group")


def test_flags_and_group_defaults():
    cfg = parse_config(Job, "d", ["--data", "x", "--lr", "2", "--flag", "--sizes", "3", "4", "--backbone", "big"])
    assert cfg == Job(data="x", lr=2.0, flag=True, sizes=(3, 4), backbone=Inner(name="big", layers=8))
    # The parent's default for the group (8 layers) is kept unless overridden.
    assert parse_config(Job, "d", ["--data", "x", "--layers", "2"]).backbone == Inner(layers=2)


def test_yaml_then_flags_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: y\nlr: 1\nmode: b\nbackbone:\n  layers: 3\n")
    cfg = parse_config(Job, "d", ["--config", str(path), "--lr", "5"])
    assert (cfg.data, cfg.lr, cfg.mode, cfg.backbone.layers, cfg.backbone.name) == ("y", 5.0, "b", 3, "scratch")
    assert isinstance(cfg.lr, float)


def test_round_trip_through_yaml(tmp_path):
    cfg = Job(data="z", sizes=(5,), backbone=Inner(name="q", layers=1))
    save_config(cfg, tmp_path / "c.yaml")
    assert parse_config(Job, "d", ["--config", str(tmp_path / "c.yaml")]) == cfg
    assert from_dict(Job, to_dict(cfg)) == cfg


@pytest.mark.parametrize("argv, message", [
    ([], "missing required setting.*--data"),
    (["--data", "x", "--mode", "c"], "invalid choice"),
    (["--data", "x", "--lr", "fast"], "invalid float"),
])
def test_bad_flags_name_the_problem(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_config(Job, "d", argv)
    assert __import__("re").search(message, capsys.readouterr().err)


def test_unknown_yaml_key_is_named(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("data: y\nlearning_rate: 1\n")
    with pytest.raises(SystemExit):
        parse_config(Job, "d", ["--config", str(path)])
    assert "unknown setting(s) ['learning_rate']" in capsys.readouterr().err


def test_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit):
        parse_config(Job, "d", ["--help"])
    out = capsys.readouterr().out
    for flag in ("--data", "--lr", "--mode", "--flag", "--sizes", "--backbone", "--layers", "--config"):
        assert flag in out
    assert "(default: 8)" in out  # the group default set by the parent


def test_abbreviated_flags_are_refused(capsys):
    with pytest.raises(SystemExit):
        parse_config(Job, "d", ["--dat", "x"])
    assert "unrecognized arguments: --dat" in capsys.readouterr().err


def test_repeated_list_flag_extends():
    assert parse_config(Job, "d", ["--data", "x", "--sizes", "3", "--sizes", "4", "5"]).sizes == (3, 4, 5)
