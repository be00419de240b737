"""Text from outside autoopt made inert wherever people read it: names from traces (kernels,
operators, devices, sync sites), from models and from file names, on the terminal, in rich
markup, in report.md and in XML/HTML.

A trace is data anybody can write. Printed raw, a kernel named "\\x1b[2J" clears the screen,
"\\x1b]52;c;...\\x07" writes the clipboard, "\\x1b]0;...\\x07" the window title, a carriage
return or backspace overwrites what was printed before it, and a bidi override (U+202E) shows
text in an order other than the bytes'. Every such character is shown as a visible escape
instead ("\\x1b", "\\r", "\\u202e"), so the name stays recognisable and nothing acts on the
terminal. One-line names also have their newline and tab escaped, so a name cannot forge a
line of output or a table row.

A leaf: imports nothing of autoopt (the torch-free trace analysis uses it too), and rich and
markupsafe only inside the functions that need them.
"""
from __future__ import annotations

import re
from typing import Any

# C0 controls, DEL, C1 controls (0x9b is a one-byte CSI on some terminals), the bidi
# embeddings, overrides, isolates and marks, the Unicode line and paragraph separators, and
# lone surrogates (which cannot even be encoded to UTF-8: a write would fail)
_OTHER = "\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff"
_NAME_UNSAFE = re.compile(f"[\x00-\x1f{_OTHER}]")
# in a block of several lines, the newline and the tab are layout, not data
_BLOCK_UNSAFE = re.compile(f"[\x00-\x08\x0b-\x1f{_OTHER}]")
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _visible(m: re.Match) -> str:
    c = m.group(0)
    if c in _SHORT:
        return _SHORT[c]
    o = ord(c)
    return f"\\x{o:02x}" if o <= 0xFF else f"\\u{o:04x}"


def for_terminal(s: Any) -> str:
    """One name for one line of terminal output: every control character (newline and tab
    included), bidi control and lone surrogate shown as a visible escape."""
    return _NAME_UNSAFE.sub(_visible, str(s))


def terminal_text(text: Any) -> str:
    """A whole block of output (several lines) for the terminal: as for_terminal, except that
    newlines and tabs stay layout; a CRLF line end becomes a plain newline."""
    return _BLOCK_UNSAFE.sub(_visible, str(text).replace("\r\n", "\n"))


def for_rich(s: Any) -> str:
    """A name inside a string rich prints with markup on: terminal-safe, and its "[...]"
    escaped so it is shown rather than read as a style tag."""
    from rich.markup import escape

    return escape(for_terminal(s))


# control characters other than tab and newline (most are not allowed in XML, all are
# meaningless on a page), and the bidi controls, which would reorder a label
_XML_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
                          r"\ud800-\udfff\ufffe\uffff]")


def printable(s: Any) -> str:
    """str(s) without control characters (tab and newline aside) nor bidi controls (each
    becomes U+FFFD):
    plot labels and tooltips in an SVG, every value report.html shows. CRLF becomes LF."""
    return _XML_CONTROL.sub("\ufffd", str(s).replace("\r\n", "\n"))


def esc(s: Any) -> str:
    """Text for HTML, quotes included: the same escape the report's templates apply."""
    import markupsafe

    return str(markupsafe.escape(str(s)))


# Markdown punctuation that can start markup mid-line; "<" only where it could open an HTML
# tag or comment, "&" only where it could start an entity, so "a <= b" and "32 -> 128"
# stay readable in the raw file.
_MD_SPECIAL = re.compile(r"([\\`*\[\]|]|<(?=[A-Za-z/!?])|&(?=#?\w+;)|^[>#+=-])")


def for_markdown(s: Any) -> str:
    """Text for a Markdown paragraph or table cell: one line (runs of whitespace, newlines
    included, become one space), terminal-safe (report.md is read with cat too), and Markdown
    and HTML inert: "|", backticks, brackets, emphasis, a leading "#", ">", "-", tags and
    entities are backslash-escaped."""
    s = for_terminal(" ".join(str(s).split()))
    return _MD_SPECIAL.sub(r"\\\1", s)


def markdown_code(s: Any) -> str:
    """An inline code span that survives backticks, table pipes and control characters in
    the text."""
    s = for_terminal(" ".join(str(s).split()))
    longest = max((len(m) for m in re.findall(r"`+", s)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if s.startswith("`") or s.endswith("`") else ""
    return f"{fence}{pad}{s.replace('|', chr(92) + '|')}{pad}{fence}"
