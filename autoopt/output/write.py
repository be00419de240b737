"""Writing a report directory: plan.json, patch.diff, report.json, report.md, report.html and
the TensorBoard summaries of every variant — the same code for a single process and a
distributed job. report.json is written first, so the numbers survive whatever a renderer
meets; a part that cannot be written becomes a note in it. Every file is written whole or
not at all (a temporary file renamed over it): a run stopped mid-write leaves the previous
file or the new one, never half of one."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

from autoopt.results import Report

# what a report directory holds: a directory with any of these holds a report
REPORT_FILES = ("report.json", "report.md", "report.html", "plan.json", "patch.diff")
REPORT_DIRS = ("tb",)


def report_leftovers(out: Path) -> list[str]:
    """The names of a report's files and folders already in `out` (empty: no report there)."""
    out = Path(out)
    return [n for n in REPORT_FILES if (out / n).exists() or (out / n).is_symlink()] + \
        [n + "/" for n in REPORT_DIRS if (out / n).exists() or (out / n).is_symlink()]


def clear_report(out: Path) -> None:
    """Remove a previous report's files and tb/ from `out` (--force), so runs never mix; the
    directory's other files stay."""
    out = Path(out)
    for n in REPORT_FILES + REPORT_DIRS:
        p = out / n
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def _dump(obj) -> str:
    return json.dumps(obj, indent=2, default=str) + "\n"


def write_atomic(path: Path, text: str) -> Path:
    """Write `text` to `path` through a temporary file in the same folder and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8", errors="replace")  # a lone surrogate must not fail it
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_json(path: Path, obj) -> Path:
    """`obj` as indented JSON at `path`, written atomically."""
    return write_atomic(path, _dump(obj))


def write_report(report: Report, out: Path, *, progress: Optional[Callable[..., None]] = None) -> dict:
    """Write every artifact of `report` into `out` (its tb/ for the TensorBoard summaries);
    returns the report's JSON form as written."""
    from autoopt.output import report as render
    from autoopt.output.tensorboard import write_summaries

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if progress is not None:
        progress("report", f"writing the report to {out}")
    write_json(out / "plan.json", report.plan)
    write_atomic(out / "patch.diff", report.patch)
    data = report.to_json()
    write_json(out / "report.json", data)
    write_atomic(out / "report.md", render.render_markdown(data))
    write_atomic(out / "report.html", render.render_html(data))
    try:
        write_summaries(data, out / "tb")
    except Exception as e:  # noqa: BLE001 - the report stands without the TensorBoard summaries
        report.notes.append(f"TensorBoard summaries not written: {type(e).__name__}: {e}")
        data = report.to_json()
        write_json(out / "report.json", data)
    return data
