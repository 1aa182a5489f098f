"""safetensors + JSON checkpoints: round trips, atomic replacement, clear errors, AdamW resume."""
from __future__ import annotations

import json

import pytest
import torch

import slmrec.checkpoint as ckpt
from slmrec.checkpoint import (
    atomic_write_json,
    atomic_write_text,
    load_checkpoint,
    optimizer_state_from_tensors,
    optimizer_state_to_tensors,
    save_checkpoint,
)


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


def test_round_trip_keeps_dtypes_values_and_meta(tmp_path):
    table = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    tensors = {
        "items": table,
        "tied": table,  # same storage: stored as a copy, loads with equal values
        "rows": table[1:3],  # a view into the same storage
        "half": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        "ids": torch.tensor([0, 7], dtype=torch.int64),
        "flags": torch.tensor([True, False]),
        "scalar": torch.tensor(3.0),
    }
    meta = {"layers": 4, "metrics": {"NDCG@10": 0.25}, "name": "student"}
    out = save_checkpoint(tmp_path / "ck", tensors, meta)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "model.safetensors"]
    loaded, loaded_meta = load_checkpoint(out)
    assert loaded_meta == meta
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    assert _siblings(out) == ["ck"]  # no temporary directories left behind


def test_replacing_a_checkpoint(tmp_path):
    path = tmp_path / "ck"
    save_checkpoint(path, {"w": torch.zeros(2)}, {"step": 1})
    save_checkpoint(path, {"w": torch.ones(3)}, {"step": 2})
    tensors, meta = load_checkpoint(path)
    assert meta == {"step": 2} and torch.equal(tensors["w"], torch.ones(3))
    assert _siblings(path) == ["ck"]


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ck"
    save_checkpoint(path, {"w": torch.zeros(2)}, {"step": 1})

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", disk_full)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"w": torch.ones(2)}, {"step": 2})
    tensors, meta = load_checkpoint(path)
    assert meta == {"step": 1} and torch.equal(tensors["w"], torch.zeros(2))
    assert _siblings(path) == ["ck"]


def test_failed_final_rename_puts_the_old_checkpoint_back(tmp_path, monkeypatch):
    path = tmp_path / "ck"
    save_checkpoint(path, {"w": torch.zeros(2)}, {"step": 1})
    real_replace = ckpt.os.replace

    def replace(src, dst):
        if str(src).startswith(str(tmp_path / ".ck.tmp-")):
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        save_checkpoint(path, {"w": torch.ones(2)}, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)[1] == {"step": 1}
    assert _siblings(path) == ["ck"]


def test_bad_meta_writes_nothing(tmp_path):
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path / "ck", {"w": torch.zeros(1)}, {"bad": object()})
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_replace_a_directory_with_other_files(tmp_path):
    path = tmp_path / "results"
    path.mkdir()
    (path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="notes.txt"):
        save_checkpoint(path, {"w": torch.zeros(1)}, {})
    assert (path / "notes.txt").read_text() == "keep me"


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_checkpoint(missing)
    path = save_checkpoint(tmp_path / "ck", {"w": torch.zeros(1)}, {})
    (path / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"meta\.json.*not valid JSON"):
        load_checkpoint(path)
    (path / "meta.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        load_checkpoint(path)
    (path / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match=r"model\.safetensors.*not a readable safetensors"):
        load_checkpoint(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors is missing"):
        load_checkpoint(path)


def _model_and_adamw():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    groups = [{"params": model[0].parameters(), "weight_decay": 0.1},
              {"params": model[1].parameters(), "weight_decay": 0.0, "lr": 3e-3}]
    return model, torch.optim.AdamW(groups, lr=1e-2, betas=(0.8, 0.95))


def _step(model, opt, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(5, 4, generator=g), torch.randn(5, 2, generator=g)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def test_adamw_resumes_exactly(tmp_path):
    model, opt = _model_and_adamw()
    for seed in range(3):
        _step(model, opt, seed)
    opt_tensors, opt_meta = optimizer_state_to_tensors(opt.state_dict())
    # AdamW keeps step, exp_avg, exp_avg_sq for each of the 4 parameters
    assert len(opt_tensors) == 4 * 3
    json.dumps(opt_meta)  # the description is plain JSON
    save_checkpoint(tmp_path / "ck", {**{f"model.{k}": v for k, v in model.state_dict().items()}, **opt_tensors},
                    {"optimizer": opt_meta})

    tensors, meta = load_checkpoint(tmp_path / "ck")
    restored, restored_opt = _model_and_adamw()
    _step(restored, restored_opt, 99)  # diverge first, so the load has to overwrite everything
    restored.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    restored_opt.load_state_dict(optimizer_state_from_tensors(tensors, meta["optimizer"]))
    assert restored_opt.param_groups[0]["betas"] == (0.8, 0.95)

    _step(model, opt, 3)
    _step(restored, restored_opt, 3)
    for a, b in zip(model.parameters(), restored.parameters()):
        assert torch.equal(a, b)


def test_optimizer_state_errors():
    with pytest.raises(ValueError, match="format"):
        optimizer_state_from_tensors({}, {"format": "pickle"})
    _, meta = optimizer_state_to_tensors({"state": {0: {"exp_avg": torch.ones(1)}}, "param_groups": []})
    with pytest.raises(KeyError, match="missing"):
        optimizer_state_from_tensors({}, meta)
    with pytest.raises(TypeError, match="cannot be stored as JSON"):
        optimizer_state_to_tensors({"state": {0: {"x": object()}}, "param_groups": []})


def test_atomic_write_text_and_json(tmp_path):
    path = tmp_path / "sub" / "report.json"
    atomic_write_json(path, {"HR@10": 0.5})
    assert json.loads(path.read_text()) == {"HR@10": 0.5}
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"HR@10": 0.5}  # the old file survives
    atomic_write_text(path.with_name("REPORT.md"), "# Report\n")
    assert path.with_name("REPORT.md").read_text() == "# Report\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["REPORT.md", "report.json"]


def test_atomic_write_failure_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "report.md"
    atomic_write_text(path, "old\n")

    def replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(ckpt.os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        atomic_write_text(path, "new\n")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]
