"""Writing a report directory: plan.json, patch.diff, report.json, report.md, report.html and
the TensorBoard summaries of every variant — the same code for a single process and a
distributed job. report.json is written first, so the numbers survive whatever a renderer
meets; a part that cannot be written becomes a note in it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

from autoopt.results import Report


def _dump(obj) -> str:
    return json.dumps(obj, indent=2, default=str) + "\n"


def write_report(report: Report, out: Path, *, progress: Optional[Callable[..., None]] = None) -> dict:
    """Write every artifact of `report` into `out` (its tb/ for the TensorBoard summaries);
    returns the report's JSON form as written."""
    from autoopt.output import report as render
    from autoopt.output.tensorboard import write_summaries

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if progress is not None:
        progress("report", f"writing the report to {out}")
    (out / "plan.json").write_text(_dump(report.plan))
    (out / "patch.diff").write_text(report.patch)
    data = report.to_json()
    (out / "report.json").write_text(_dump(data))
    render.write_markdown(data, out / "report.md")
    render.write_html(data, out / "report.html")
    try:
        write_summaries(data, out / "tb")
    except Exception as e:  # noqa: BLE001 - the report stands without the TensorBoard summaries
        report.notes.append(f"TensorBoard summaries not written: {type(e).__name__}: {e}")
        data = report.to_json()
        (out / "report.json").write_text(_dump(data))
    return data
