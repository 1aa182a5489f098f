"""Checkpoints as safetensors + JSON, written atomically; nothing is ever unpickled.

A checkpoint is a directory holding `model.safetensors` (tensors) and `meta.json`
(config, step, metrics...). Writers go through a sibling temporary directory that is
fsync'ed and renamed into place, so a reader (or a resumed job after a crash) sees either
the previous complete checkpoint or the new complete one, never a half-written file.

Optimizer state (e.g. AdamW's per-parameter step / exp_avg / exp_avg_sq and its
param_groups) is split into tensors and a JSON description, so it can be stored in the
same two files without pickle.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

TENSORS_FILE = "model.safetensors"
META_FILE = "meta.json"
OPTIMIZER_FORMAT = "torch-optimizer-state/v1"


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new directory entry durable (POSIX; no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` via a temporary file in the same directory and os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_save_figure(fig: Any, path: str | os.PathLike, dpi: int = 110) -> None:
    """Save a matplotlib figure as PNG via a temporary file, then close it: a report's
    plot is either the old one or the whole new one."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write `obj` as indented JSON (raises TypeError naming a non-JSON value)."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def _storable(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """CPU, contiguous, detached tensors; shared storage (tied weights) is copied because
    safetensors refuses aliased tensors."""
    out: dict[str, Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, tensor in tensors.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(f"checkpoint entry {name!r} is a {type(tensor).__name__}, not a tensor")
        t = tensor.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if t.numel() and key in seen:
            t = t.clone()
        seen.add(key)
        out[name] = t
    return out


def save_checkpoint(directory: str | os.PathLike, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Path:
    """Write `directory`/model.safetensors and meta.json atomically; return the directory.

    An existing checkpoint at `directory` is replaced only after the new one is complete
    (the old one is renamed aside, the new one renamed in, then the old one deleted; a
    crash between the two renames leaves the old checkpoint as a `.NAME.old-*` sibling).
    A directory holding anything besides these two files is refused, never deleted.
    """
    directory = Path(directory)
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    if directory.exists():
        if not directory.is_dir():
            raise FileExistsError(f"checkpoint path {directory} exists and is not a directory")
        extra = sorted(p.name for p in directory.iterdir() if p.name not in (TENSORS_FILE, META_FILE))
        if extra:
            raise FileExistsError(
                f"refusing to replace {directory}: it holds files that are not part of a checkpoint: {extra}")
    meta_text = json.dumps(meta, indent=2) + "\n"  # fails before anything is written
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
    old = None
    try:
        save_file(_storable(tensors), str(tmp / TENSORS_FILE))
        (tmp / META_FILE).write_text(meta_text, encoding="utf-8")
        for name in (TENSORS_FILE, META_FILE):
            _fsync_file(tmp / name)
        _fsync_dir(tmp)
        if directory.exists():
            old = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.old-"))
            os.replace(directory, old)  # onto the empty placeholder directory
        os.replace(tmp, directory)
        _fsync_dir(directory.parent)
    except BaseException:
        if old is not None:
            if directory.exists():
                shutil.rmtree(old)  # the old checkpoint never moved: drop the placeholder
            else:
                os.replace(old, directory)  # put the previous checkpoint back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old)
    return directory


def load_checkpoint(directory: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors on CPU, meta) from a checkpoint directory; errors name the offending path."""
    tensors_path, _ = _checkpoint_files(directory)
    try:
        tensors = load_file(str(tensors_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"checkpoint file {tensors_path} is not a readable safetensors file: {err}") from err
    return tensors, load_meta(directory)


def _checkpoint_files(directory: str | os.PathLike) -> tuple[Path, Path]:
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    tensors_path, meta_path = directory / TENSORS_FILE, directory / META_FILE
    for path in (tensors_path, meta_path):
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint file {path} is missing")
    return tensors_path, meta_path


def load_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """Only the JSON part of a checkpoint (cheap: no weights are read)."""
    _, meta_path = _checkpoint_files(directory)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"checkpoint file {meta_path} is not valid JSON: {err}") from err
    if not isinstance(meta, dict):
        raise ValueError(f"checkpoint file {meta_path} must hold a JSON object, got {type(meta).__name__}")
    return meta


def _encode(value: Any, where: str, tensors: dict[str, Tensor]) -> Any:
    """JSON form of an optimizer-state value; tensors go to `tensors` under key `where`,
    tuples are tagged so they come back as tuples (e.g. AdamW's betas)."""
    if isinstance(value, Tensor):
        tensors[where] = value
        return {"__tensor__": where}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, f"{where}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{where}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"optimizer state at {where} has non-string keys")
        return {k: _encode(v, f"{where}.{k}", tensors) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"optimizer state at {where} holds a {type(value).__name__}, which cannot be stored as JSON")


def _decode(value: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            key = value["__tensor__"]
            if key not in tensors:
                raise KeyError(f"optimizer state refers to tensor {key!r}, which is missing")
            return tensors[key]
        if set(value) == {"__tuple__"}:
            return tuple(_decode(v, tensors) for v in value["__tuple__"])
        return {k: _decode(v, tensors) for k, v in value.items()}
    return value


def optimizer_state_to_tensors(state_dict: dict[str, Any], prefix: str = "optimizer") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split `optimizer.state_dict()` into (tensors named `prefix.state.<id>.<name>`, a
    JSON-serialisable description). Merge the tensors into a checkpoint's tensor dict and
    put the description in its meta; `optimizer_state_from_tensors` reverses it."""
    tensors: dict[str, Tensor] = {}
    state = [[int(pid), _encode(values, f"{prefix}.state.{pid}", tensors)]
             for pid, values in state_dict["state"].items()]
    groups = _encode(state_dict["param_groups"], f"{prefix}.param_groups", tensors)
    meta = {"format": OPTIMIZER_FORMAT, "state": state, "param_groups": groups}
    return tensors, meta


def optimizer_state_from_tensors(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """The `state_dict` for `optimizer.load_state_dict`, rebuilt from the two parts."""
    if meta.get("format") != OPTIMIZER_FORMAT:
        raise ValueError(f"unknown optimizer state format {meta.get('format')!r}; expected {OPTIMIZER_FORMAT!r}")
    state = {int(pid): _decode(values, tensors) for pid, values in meta["state"]}
    return {"state": state, "param_groups": _decode(meta["param_groups"], tensors)}
