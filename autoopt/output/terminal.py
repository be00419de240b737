"""The compact variants table `autoopt optimize` prints in the terminal: plain strings, one
row per variant, for a renderer (rich) that escapes them. Names and reasons come from the
run: each is made terminal-safe here (autoopt.safe.for_terminal)."""
from __future__ import annotations

from autoopt.output.data import beside_ms, decision, speedup_interval, variants
from autoopt.output.format import as_dict, error_text, fmt_mb, fmt_ms, fmt_tput, fmt_x, short, spread_text, stat
from autoopt.safe import for_terminal

FINAL_TABLE_HEADER = [
    "variant",
    "status",
    "step ms (median)",
    "p25-p75 ms",
    "beside ms",
    "samples/s",
    "decided by",
    "x baseline",
    "peak MB",
    "max rel err",
    "note",
]


def _with_baseline(report: dict) -> list[dict]:
    """The variants, with the report's baseline first where no variant is named so."""
    vs = variants(report)
    b = as_dict(report.get("baseline"))
    if any(v.get("name") == "baseline" for v in vs) or not b:
        return vs
    return [{"name": "baseline", "status": "kept", "step_time_ms": b.get("step_time_ms"),
             "throughput_per_s": b.get("throughput_per_s"), "peak_memory_mb": b.get("peak_memory_mb"),
             "speedup": 1.0, "reason": "reference configuration"}] + vs


def final_table_rows(report: dict) -> list[list[str]]:
    """Compact rows for the terminal table: the first row is the header
    (FINAL_TABLE_HEADER), then one row per variant. Plain strings free of control
    characters; a renderer that interprets markup (rich) must still escape them."""
    rows = [list(FINAL_TABLE_HEADER)]
    for v in _with_baseline(report):
        st = v.get("step_time_ms")
        iv = speedup_interval(report, v)
        sp = fmt_x(v.get("speedup"))
        d = decision(v)
        if iv and v.get("name") == "final":
            sp = f"{sp} ({iv[0]:.2f}–{iv[1]:.2f})"
        elif d and v.get("name") != "baseline":
            sp = "≈" + sp
        decided = ""
        if d.get("ratio") is not None:
            decided = f"{fmt_x(d.get('ratio'))} {'base' if d.get('anchor') == 'the baseline' else 'best'}"
        rows.append([
            for_terminal(v.get("name", "?")),
            for_terminal(v.get("status", "?")),
            fmt_ms(stat(st, "median")),
            spread_text(st),
            fmt_ms(beside_ms(report, v)),
            fmt_tput(v.get("throughput_per_s")),
            decided,
            sp,
            fmt_mb(v.get("peak_memory_mb")),
            error_text(v),
            short(for_terminal(v.get("reason") or ""), 60),
        ])
    return rows
