"""Where a benchmark's results go: its Markdown table on stdout and, with --output, the
same table as STEM.md next to STEM.json (config, rows and whatever else the run records)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from slmrec.checkpoint import atomic_write_json, atomic_write_text


def write_outputs(output: str | None, stem: str, payload: dict[str, Any], table: str) -> None:
    print(table)
    if not output:
        return
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / f"{stem}.json", payload)
    atomic_write_text(out / f"{stem}.md", table)
    print(f"wrote {out / f'{stem}.json'} and {out / f'{stem}.md'}")
