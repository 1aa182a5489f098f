"""Output directories that appear whole or not at all.

A stage writes into a hidden temporary sibling of its output and renames it into place
only when everything is written (and checked), so a reader, or a pipeline deciding
whether a stage is done, never takes a half-written directory for a finished one. A
killed run leaves only the hidden sibling, which input discovery skips.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def staged_output(output: str | Path) -> Iterator[Path]:
    """Yield the directory to write; on success it replaces `output` (an older `output`
    goes only once the new one is in place), on failure it is removed."""
    out = Path(output).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
