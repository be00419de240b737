"""The report's figures, drawn with matplotlib: the step-time breakdown (stacked bars), the
speedup per variant, the top kernels/operators and the per-layer gradient norms
(horizontal bars), and throughput against batch size (a line of points).

Each builder returns a Plot: a matplotlib Figure (built directly, never through pyplot)
plus the marks to label, keyed by the gid set on their artist. `svg_markup` writes the
figure as inline SVG for report.html and `rgb_array` rasterizes it for TensorBoard.

The SVG is post-processed with xml.etree, as matplotlib documents for interactive SVG:
every marked artist's group gets its class ("bar", "errbar", "ref", "pt", "pt hl", "miss")
and a <title> tooltip; ids are prefixed with the plot's kind so several plots share a page;
matplotlib's metadata, global <style> and clip paths are dropped and coordinates rounded.
Text stays text (svg.fonttype "none"), so the SVG is small, searchable and deterministic
(a fixed hash salt, no date). matplotlib's settings apply only inside a style context that
restores them, so nothing leaks into the caller's rcParams.
"""
from __future__ import annotations

import contextlib
import io
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple, Optional

from autoopt.output.data import BREAKDOWN_COLORS, BREAKDOWN_KEYS, BREAKDOWN_LABELS
from autoopt.output.format import fmt_ms, fmt_num, fmt_tput, printable, short

WIDTH_IN = 7.5  # 540 px at the SVG's 72 units per inch
TOP_IN, AXIS_IN = 0.35, 0.5  # room for the title above, and the ticks and axis label below
FONT_PT = 9
PNG_DPI = 100
INK, MUTED, GRID = "#1d2330", "#5b6475", "#e6e9ef"
LINE_COLOR, HIGHLIGHT, MISS = "#4c78a8", "#2e7d32", "#c62828"
FONT_FAMILY = "system-ui, -apple-system, 'Segoe UI', Roboto, 'DejaVu Sans', Helvetica, Arial, sans-serif"

# matplotlib settings while a figure is built or saved (over matplotlib's defaults, so a
# user's matplotlibrc changes nothing): text as text, a fixed hash salt for the marker ids,
# and the look of the page
_RC = {
    "svg.fonttype": "none",
    "svg.hashsalt": "autoopt",
    "font.family": "sans-serif",
    "font.size": FONT_PT,
    "axes.titlesize": 10,
    "axes.titleweight": "bold",
    "axes.titlelocation": "left",
    "axes.edgecolor": "#b8bfcc",
    "axes.labelcolor": INK,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "xtick.color": MUTED,
    "ytick.color": MUTED,
    "text.color": INK,
    "legend.frameon": False,
}


class Bar(NamedTuple):
    """One bar of an hbar plot: its label, length, the text at its end, its tooltip and
    colour."""
    label: str
    value: float
    text: str
    tip: str
    color: str


@dataclass
class Plot:
    """A figure, its title and its marks: gid -> (CSS class, tooltip text; '' for none)."""
    fig: object
    title: str
    marks: dict[str, tuple[str, str]] = field(default_factory=dict)

    def mark(self, artist, gid: str, cls: str, tip: str = "") -> None:
        artist.set_gid(gid)
        self.marks[gid] = (cls, printable(tip))


@contextlib.contextmanager
def _style() -> Iterator[None]:
    import matplotlib
    import matplotlib.style

    with matplotlib.style.context(["default", _RC]):
        yield


def _text_in(s: str, size: float = FONT_PT) -> float:
    """The width of a line of text in inches, estimated (DejaVu Sans averages 0.6 em)."""
    return len(s) * 0.6 * size / 72


def _new_plot(height_in: float, title: str, left_in: float, right_in: float, bottom_in: float) -> tuple[Plot, object]:
    """A Plot WIDTH_IN wide with one titled axes inside the given margins (inches); call
    inside _style(). Fixed margins instead of a layout engine: one draw per figure."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH_IN, height_in), dpi=PNG_DPI)
    left_in = min(left_in, 0.45 * WIDTH_IN)
    right_in = min(right_in, 0.25 * WIDTH_IN)
    fig.subplots_adjust(left=left_in / WIDTH_IN, right=1 - right_in / WIDTH_IN, bottom=bottom_in / height_in,
                        top=1 - TOP_IN / height_in)
    ax = fig.add_subplot(1, 1, 1)
    ax.grid(True, axis="x", color=GRID, linewidth=0.8)
    ax.set_axisbelow(True)
    shown = _label(title)
    ax.set_title(shown, parse_math=False)
    return Plot(fig, shown), ax


def _label(s: str, chars: int = 200) -> str:
    """A name as a plot label: one line, printable, at most `chars` characters."""
    return short(printable(s), chars)


def _bar_labels(plot: Plot, ax, labels: list[str], chars: int) -> None:
    """Category labels left of the bars; a label cut short keeps its full text as tooltip."""
    ax.set_yticks([])
    for i, full in enumerate(labels):
        shown = _label(full, chars)
        t = ax.annotate(shown, (0, i), xycoords=("axes fraction", "data"), xytext=(-6, 0),
                        textcoords="offset points", ha="right", va="center", color=INK, parse_math=False)
        if shown != " ".join(str(full).split()):
            plot.mark(t, f"label-{i}", "label", full)


def _bar_margins(labels: list[str], chars: int, values: list[str]) -> tuple[float, float]:
    """(left, right) margins in inches for bar labels and the values at the bars' ends."""
    left = max((_text_in(_label(lbl, chars)) for lbl in labels), default=0.0) + 0.2
    right = max((_text_in(v) for v in values), default=0.0) + 0.2
    return left, right


def breakdown_plot(bars: list[tuple[str, dict[str, float]]], title: str) -> Plot:
    """Horizontal stacked bars, one per label, of ms per step by category, with a legend;
    one marked bar per non-zero segment."""
    cats = [k for k in BREAKDOWN_KEYS if any(b.get(k, 0) > 0 for _, b in bars)]
    totals = [sum(b.get(k, 0.0) for k in cats) for _, b in bars]
    texts = [f"{fmt_ms(t)} ms" for t in totals]
    legend_in = 0.22 * ((len(cats) + 3) // 4)
    left, right = _bar_margins([lbl for lbl, _ in bars], 30, texts)
    with _style():
        plot, ax = _new_plot(TOP_IN + 0.55 * len(bars) + AXIS_IN + legend_in, title, left, right, AXIS_IN + legend_in)
        for i, (label, b) in enumerate(bars):
            x = 0.0
            for k in cats:
                v = b.get(k, 0.0)
                if v > 0:
                    rect = ax.barh(i, v, left=x, height=0.62, color=BREAKDOWN_COLORS[k])[0]
                    plot.mark(rect, f"bar-{i}-{k}", "bar", f"{label}: {BREAKDOWN_LABELS[k]} {v:.3f} ms")
                    x += v
            ax.annotate(texts[i], (x, i), xytext=(4, 0), textcoords="offset points", va="center")
        _bar_labels(plot, ax, [lbl for lbl, _ in bars], 30)
        ax.set_ylim(len(bars) - 0.5, -0.5)
        ax.set_xlim(0, max(totals + [1e-9]) * 1.02)
        ax.set_xlabel("ms per step")
        if cats:
            from matplotlib.patches import Patch

            handles = [Patch(color=BREAKDOWN_COLORS[k], label=BREAKDOWN_LABELS[k]) for k in cats]
            plot.fig.legend(handles=handles, loc="lower center", ncol=min(4, len(cats)), fontsize=8,
                            borderaxespad=0.2)
    return plot


def _whisker(plot: Plot, ax, i: int, lo: float, hi: float) -> None:
    (line,) = ax.plot([lo, hi], [i, i], color=INK, linewidth=1.5, marker="|", markersize=9, markeredgewidth=1.5,
                      solid_capstyle="butt")
    plot.mark(line, f"errbar-{i}", "errbar", f"spread {lo:.2f}–{hi:.2f}")


def hbar_plot(bars: list[Bar], title: str, unit: str, ref: Optional[float] = None,
              errors: Optional[list[Optional[tuple[float, float]]]] = None, label_chars: int = 34) -> Plot:
    """Horizontal bars with their value at the end; optional whiskers (low, high) per bar
    and a dashed reference line (1.0× for speedups)."""
    errors = (errors or []) + [None] * len(bars)
    texts = [_label(b.text, 40) for b in bars]
    left, right = _bar_margins([b.label for b in bars], label_chars, texts)
    vmax = max([b.value for b in bars] + [e[1] for e in errors if e] + [ref or 0.0, 0.0]) or 1.0
    with _style():
        plot, ax = _new_plot(max(1.6, TOP_IN + 0.3 * len(bars) + AXIS_IN), title, left, right, AXIS_IN)
        for i, b in enumerate(bars):
            rect = ax.barh(i, max(b.value, 0.0), height=0.7, color=b.color)[0]
            plot.mark(rect, f"bar-{i}", "bar", b.tip)
            e = errors[i]
            if e:
                _whisker(plot, ax, i, e[0], e[1])
            end = max(b.value, 0.0, e[1] if e else 0.0)
            ax.annotate(texts[i], (end, i), xytext=(4, 0), textcoords="offset points", va="center", parse_math=False)
        if ref is not None:
            plot.mark(ax.axvline(ref, color=MISS, linestyle=(0, (5, 4)), linewidth=1.5), "ref", "ref",
                      f"{ref:g}× reference")
        _bar_labels(plot, ax, [b.label for b in bars], label_chars)
        ax.set_ylim(len(bars) - 0.5, -0.5)
        ax.set_xlim(0, vmax * 1.02)
        ax.set_xlabel(_label(unit), parse_math=False)
    return plot


def grad_norm_plot(layers: list[tuple[str, float, int]], title: str) -> Plot:
    """Per-layer gradient norms as horizontal bars on a log axis, one per (layer, norm,
    inf/NaN count), in the model's order; a layer with inf/NaN gradients is drawn red."""
    texts = [f"{n:.3g}" + (f" ({bad} inf/NaN)" if bad else "") for _, n, bad in layers]
    left, right = _bar_margins([name for name, _, _ in layers], 34, texts)
    positive = [n for _, n, _ in layers if n > 0] or [1.0]
    lo, hi = min(positive) / 3, max(positive) * 3
    with _style():
        plot, ax = _new_plot(max(1.6, TOP_IN + 0.3 * len(layers) + AXIS_IN), title, left, right, AXIS_IN)
        ax.set_xscale("log")
        for i, (name, n, bad) in enumerate(layers):
            rect = ax.barh(i, max(n, lo) - lo, left=lo, height=0.7, color=MISS if bad else LINE_COLOR)[0]
            plot.mark(rect, f"bar-{i}", "bar", f"{name}: gradient norm {texts[i]}")
            ax.annotate(texts[i], (max(n, lo), i), xytext=(4, 0), textcoords="offset points", va="center",
                        parse_math=False)
        _bar_labels(plot, ax, [name for name, _, _ in layers], 34)
        ax.set_ylim(len(layers) - 0.5, -0.5)
        ax.set_xlim(lo, hi)
        ax.set_xlabel("largest gradient norm over the verification steps (log scale)")
    return plot


def convergence_plot(baseline: list[list[Optional[float]]], candidate: list[Optional[float]], title: str) -> Plot:
    """The convergence check's loss curves against the optimizer step: the baseline seeds'
    band (their min-max per step, shaded) and the candidate's curve; a loss that is not finite
    (None) ends its curve, marked by a cross at the top of the axis."""
    steps = list(range(1, max(len(c) for c in baseline + [candidate]) + 1))
    finite = [x for c in baseline + [candidate] for x in c if x is not None]
    top = max(finite) if finite else 1.0
    with _style():
        plot, ax = _new_plot(4.2, title, 0.9, 0.3, AXIS_IN)
        ax.grid(True, axis="y", color=GRID, linewidth=0.8)
        cols = list(zip(*[[x for x in c] + [None] * (len(steps) - len(c)) for c in baseline]))
        xs = [s for s, col in zip(steps, cols) if all(v is not None for v in col)]
        lo = [min(col) for col in cols if all(v is not None for v in col)]
        hi = [max(col) for col in cols if all(v is not None for v in col)]
        if xs:
            band = ax.fill_between(xs, lo, hi, color=LINE_COLOR, alpha=0.3, linewidth=0)
            plot.mark(band, "band", "band", f"baseline: min-max over {len(baseline)} seeds")
        ys = [(s, v) for s, v in zip(steps, candidate) if v is not None]
        if ys:
            (line,) = ax.plot([s for s, _ in ys], [v for _, v in ys], color=HIGHLIGHT, linewidth=2)
            plot.mark(line, "candidate", "line", "candidate (the change of training)")
        if len(ys) < len(candidate):
            (m,) = ax.plot([len(ys) + 1], [top], linestyle="none", marker="x", markersize=9, markeredgewidth=2,
                           color=MISS)
            plot.mark(m, "diverged", "miss", f"the candidate's loss is inf/NaN from step {len(ys) + 1}")
        ax.set_xlabel("optimizer step (equal steps; the candidate sees k x the samples per step)", parse_math=False)
        ax.set_ylabel("training loss", parse_math=False)
    return plot


def _batch_point(plot: Plot, ax, i: int, point: tuple[float, Optional[float], str], hl: bool,
                 pairwise: bool = False) -> None:
    """One marked point: a cross on the x axis where nothing was measured."""
    x, y, status = point
    if y is None:
        (m,) = ax.plot([x], [0], linestyle="none", marker="x", markersize=9, markeredgewidth=2, color=MISS)
        plot.mark(m, f"miss-{i}", "miss", f"batch {fmt_num(x, 0)}: {status}")
        return
    (m,) = ax.plot([x], [y], linestyle="none", marker="o", markersize=11 if hl else 8,
                   color=HIGHLIGHT if hl else LINE_COLOR, markeredgecolor=INK if hl else LINE_COLOR,
                   markeredgewidth=1.5 if hl else 0)
    value = f"{y:.2f}× the samples/s of the size before it" if pairwise else f"{fmt_tput(y)} samples/s"
    plot.mark(m, f"pt-{i}", "pt hl" if hl else "pt", f"batch {fmt_num(x, 0)}: {value} ({status})")


def _vwhisker(plot: Plot, ax, i: int, x: float, lo: float, hi: float) -> None:
    (line,) = ax.plot([x, x], [lo, hi], color=INK, linewidth=1.5, marker="_", markersize=9, markeredgewidth=1.5,
                      solid_capstyle="butt")
    plot.mark(line, f"errbar-{i}", "errbar", f"95 % interval {lo:.2f}–{hi:.2f}")


def batch_plot(points: list[tuple[float, Optional[float], str]], title: str, xlabel: str, ylabel: str,
               highlight: Optional[float] = None, errors: Optional[list[Optional[tuple[float, float]]]] = None,
               pairwise: bool = False) -> Plot:
    """Points (x, y or None, status) joined by a line, x on a log2 axis when it spans more
    than a factor 4. Points without y (out of memory, over budget) are crosses on the axis;
    the point at `highlight` is drawn larger; `errors` are vertical whiskers (low, high) per
    point; `pairwise`: y is each size's ratio to the size before it (labelled so, not joined:
    the ratios are separate comparisons, with a reference line at 1)."""
    errors = (errors or []) + [None] * len(points)
    xs = [p[0] for p in points]
    ys = [p[1] for p in points if p[1] is not None] + [e[1] for e in errors if e]
    lo, hi = min(ys + [0.0]), max(ys + [0.0])
    left = _text_in(fmt_tput(hi) if hi >= 100 else "0.00") + 0.55
    with _style():
        plot, ax = _new_plot(4.2, title, left, 0.3, AXIS_IN)
        ax.grid(True, axis="y", color=GRID, linewidth=0.8)
        ax.grid(False, axis="x")
        if xs and min(xs) > 0 and max(xs) / min(xs) > 4:
            ax.set_xscale("log", base=2)
        ok = sorted((p for p in points if p[1] is not None), key=lambda p: p[0])
        if pairwise:
            plot.mark(ax.axhline(1.0, color=MISS, linestyle=(0, (5, 4)), linewidth=1.5), "ref", "ref",
                      "1× the size before: no gain")
        elif len(ok) > 1:
            ax.plot([p[0] for p in ok], [p[1] for p in ok], color=LINE_COLOR, linewidth=2)
        for i, p in enumerate(points):
            e = errors[i]
            if e and p[1] is not None:
                _vwhisker(plot, ax, i, p[0], e[0], e[1])
            _batch_point(plot, ax, i, p, highlight is not None and p[0] == highlight, pairwise)
        ticks = sorted(set(xs))
        ax.set_xticks(ticks, labels=[fmt_num(x, 0) for x in ticks])
        ax.minorticks_off()
        ax.set_ylim(lo * 1.08, hi * 1.08 if hi > lo else lo + 1.0)
        ax.set_xlabel(_label(xlabel), parse_math=False)
        ax.set_ylabel(_label(ylabel), parse_math=False)
    return plot


# ---------------------------------------------------------------------------------------
# output

SVG_NS = "http://www.w3.org/2000/svg"
_XLINK_HREF = "{http://www.w3.org/1999/xlink}href"
_LONG_NUM = re.compile(r"-?\d+\.\d{3,}")
_TEXT_TAGS = {f"{{{SVG_NS}}}{t}" for t in ("text", "tspan", "title")}


def _raw_svg(plot: Plot) -> str:
    """matplotlib's SVG of the figure."""
    buf = io.StringIO()
    with _style():
        plot.fig.savefig(buf, format="svg", metadata={"Date": None})
    return buf.getvalue()


def _drop_globals(root: ET.Element) -> None:
    """Remove matplotlib's <metadata>, its <style> (a `*` rule that would reach the whole
    page once inlined; its line joins and caps become inherited attributes) and its clip
    paths: every artist lies within its axes' limits, and a clip-path is a url() reference,
    which the page has none of."""
    for el in root.iter():
        el.attrib.pop("clip-path", None)
    for child in list(root):
        if child.tag == f"{{{SVG_NS}}}metadata":
            root.remove(child)
        elif child.tag == f"{{{SVG_NS}}}defs":
            for drop in child.findall(f"{{{SVG_NS}}}style") + child.findall(f"{{{SVG_NS}}}clipPath"):
                child.remove(drop)
            if not len(child):
                root.remove(child)
    root.set("stroke-linejoin", "round")
    root.set("stroke-linecap", "butt")


def _relabel(plot: Plot, kind: str, el: ET.Element, refs: set[str]) -> None:
    """Classes and tooltips on marked groups; referenced ids prefixed with the plot's kind,
    the other ids (matplotlib's "axes_1", "text_3", ...) dropped."""
    href = el.attrib.pop(_XLINK_HREF, None)
    if href:
        el.set("href", "#" + kind + "-" + href.lstrip("#"))
    gid = el.attrib.pop("id", None)
    if gid in plot.marks:
        cls, tip = plot.marks[gid]
        el.set("class", cls)
        if tip:
            title = ET.Element("title")
            title.text = tip
            el.insert(0, title)
    elif gid in refs:
        el.set("id", f"{kind}-{gid}")


def _short_num(m: re.Match) -> str:
    return f"{float(m.group()):.2f}".rstrip("0").rstrip(".")


def _compact(el: ET.Element) -> None:
    """Drop layout whitespace, the per-text font list (the root sets the family), rotations
    by 0, and digits beyond 1/100 px in coordinates."""
    if el.tag not in _TEXT_TAGS and el.text is not None and not el.text.strip():
        el.text = None
    el.tail = None
    el.tag = el.tag.rpartition("}")[2]  # the root's xmlns covers every element
    if el.get("transform", "").startswith(("rotate(-0 ", "rotate(0 ")):
        del el.attrib["transform"]
    for k in ("d", "x", "y", "transform"):
        if k in el.attrib:
            el.set(k, _LONG_NUM.sub(_short_num, " ".join(el.get(k).split())))
    style = el.get("style")
    if style and "font-family" in style:
        el.set("style", "; ".join(p.strip() for p in style.split(";") if not p.strip().startswith("font-family")))


def _flatten(el: ET.Element) -> None:
    """Replace matplotlib's bare <g> wrappers (no id, class or style left) by their children."""
    children = []
    for child in el:
        _flatten(child)
        if child.tag == "g" and not child.attrib:
            children.extend(child)
        else:
            children.append(child)
    el[:] = children


def svg_markup(plot: Plot, kind: str, label: str) -> str:
    """The plot as one inline <svg class="plot" data-plot=KIND> element, labelled for
    screen readers (aria-label and <title>), sized in CSS pixels."""
    root = ET.fromstring(_raw_svg(plot))
    _drop_globals(root)
    elements = list(root.iter())
    refs = {v.lstrip("#") for el in elements for k, v in el.attrib.items() if k == _XLINK_HREF}
    for el in elements:
        _relabel(plot, kind, el, refs)
        _compact(el)
    _flatten(root)
    _, _, w, h = (float(v) for v in root.get("viewBox", "0 0 540 300").split())
    label = printable(label)
    root.attrib.pop("version", None)
    root.set("width", f"{w:g}")
    root.set("height", f"{h:g}")
    root.set("class", "plot")
    root.set("data-plot", kind)
    root.set("role", "img")
    root.set("aria-label", label)
    root.set("font-family", FONT_FAMILY)
    root.set("xmlns", SVG_NS)
    title = ET.Element("title")
    title.text = label
    root.insert(0, title)
    return ET.tostring(root, encoding="unicode")


def rgb_array(plot: Plot):
    """The plot as an RGB uint8 array (H, W, 3) at PNG_DPI."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(plot.fig)
    with _style():
        canvas.draw()
    return np.ascontiguousarray(np.asarray(canvas.buffer_rgba())[..., :3])
