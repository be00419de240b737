"""Numbers and text for people, shared by every output (report.md, report.html, the
terminal table, TensorBoard): tolerant readers of report.json values, the fmt_* number
formatters, and (from autoopt.safe) the escapes that keep data inert in HTML and Markdown.

Every function here takes any JSON value and never raises: a missing, non-numeric or
non-finite number shows as "—".
"""
from __future__ import annotations

import math
from typing import Any, Optional

# the escapes live in autoopt.safe, the one module that makes outside text inert; the
# report renderers import them from here under the names they have always had
from autoopt.safe import esc, printable  # noqa: F401
from autoopt.safe import for_markdown as md_text  # noqa: F401
from autoopt.safe import markdown_code as md_code  # noqa: F401

DASH = "—"


def as_dict(x: Any) -> dict:
    """x where it is a dict, else an empty dict."""
    return x if isinstance(x, dict) else {}


def as_list(x: Any) -> list:
    """x where it is a list, else an empty list."""
    return x if isinstance(x, list) else []


def num(x: Any) -> Optional[float]:
    """A finite float, or None for anything else (None, strings, NaN, inf, bools)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def stat(st: Any, key: str) -> Optional[float]:
    """One statistic ("median", "p25", ...) of a step-time dict, or None."""
    return num(as_dict(st).get(key))


def fmt_num(x: Any, decimals: Optional[int] = None) -> str:
    """A number for people: integers with thousands separators, large values in
    scientific notation, others with `decimals` places (or 4 significant digits)."""
    v = num(x)
    if v is None:
        return DASH
    if abs(v) >= 1e6:
        return f"{v:.2e}"
    if v == int(v) and decimals is None or decimals == 0:
        return f"{v:,.0f}"
    return f"{v:.{decimals}f}" if decimals is not None else f"{v:.4g}"


def fmt_ms(x: Any) -> str:
    """Milliseconds: one decimal from 100 ms, two from 1 ms, three below."""
    v = num(x)
    if v is None:
        return DASH
    if v >= 100:
        return f"{v:,.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def fmt_x(x: Any) -> str:
    """A ratio: '1.23×'."""
    v = num(x)
    return DASH if v is None else f"{v:.2f}×"


def fmt_tput(x: Any) -> str:
    """Samples per second: whole numbers from 100 up."""
    v = num(x)
    if v is None:
        return DASH
    return f"{v:,.0f}" if v >= 100 else f"{v:.2f}"


def fmt_mb(x: Any) -> str:
    """Megabytes with one decimal."""
    v = num(x)
    return DASH if v is None else f"{v:,.1f}"


def fmt_err(x: Any) -> str:
    """A relative error: '0' or '3.1e-01'."""
    v = num(x)
    if v is None:
        return DASH
    return "0" if v == 0 else f"{v:.1e}"


def fmt_pct(x: Any) -> str:
    """A fraction as a percentage: 0.0123 -> '1.23 %'."""
    v = num(x)
    return DASH if v is None else f"{100 * v:.2f} %"


def text_or_dash(x: Any) -> str:
    """A value as text, '—' for None."""
    return DASH if x is None else str(x)


def spread_text(st: Any) -> str:
    """'p25–p75' of a step-time dict, or '—'."""
    lo, hi = stat(st, "p25"), stat(st, "p75")
    if lo is None or hi is None:
        return DASH
    return f"{fmt_ms(lo)}–{fmt_ms(hi)}"


def codes_text(codes: Any, sep: str = ", ") -> str:
    """Rule codes joined, '' for none."""
    return sep.join(str(c) for c in as_list(codes))


def transforms_text(transforms: Any) -> str:
    """'amp(dtype=bfloat16) + channels_last' for a list of {"name", "params"}."""
    parts = []
    for t in as_list(transforms):
        if not isinstance(t, dict):
            parts.append(str(t))
            continue
        params = as_dict(t.get("params"))
        p = ", ".join(f"{k}={v}" for k, v in params.items())
        parts.append(f"{t.get('name', '?')}({p})" if p else str(t.get("name", "?")))
    return " + ".join(parts) if parts else "none"


def error_text(v: dict) -> str:
    """A variant's max relative error with its tolerance: '3.1e-01 (tol 1.0e-02)'."""
    err, tol = v.get("max_rel_error"), v.get("tolerance")
    if num(err) is None:
        return DASH
    return f"{fmt_err(err)} (tol {fmt_err(tol)})" if num(tol) is not None else fmt_err(err)


def accepted_text(acc: Any) -> str:
    """A finding's 'accepted' flag: yes, no or '—'."""
    return "yes" if acc else "no" if acc is not None else DASH


def short(s: Any, n: int) -> str:
    """s on one line, cut to n characters with an ellipsis."""
    s = " ".join(str(s).split())
    return s if len(s) <= n else s[: n - 1] + "…"

