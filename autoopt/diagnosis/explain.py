"""The rule library as text: the table `autoopt rules` prints and the documentation
`autoopt explain CODE` prints."""
from __future__ import annotations

from typing import Any

from autoopt.diagnosis.conditions import literal_text
from autoopt.diagnosis.rules import Rule


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={literal_text(v) if not isinstance(v, str) else v}" for k, v in params.items())


def render_rules_table(rules: list[Rule]) -> str:
    """A plain-text table of every rule: code, name, transform, safety, title."""
    header = ("CODE", "NAME", "TRANSFORM", "SAFETY", "TITLE")
    rows = [(r.code, r.name, r.transform or "(advice)", r.safety, r.title) for r in rules]
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(4)]
    lines = []
    last_family = None
    fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
    lines.append(fmt.format(*header))
    for r, row in zip(rules, rows):
        if r.family != last_family:
            lines.append("")
            lines.append(f"{r.code[:3]}xx {r.family}")
            last_family = r.family
        lines.append(fmt.format(*row))
    families = len({r.family for r in rules})
    lines.append("")
    lines.append(f"{len(rules)} rules in {families} families. `autoopt explain CODE` prints a rule's documentation.")
    return "\n".join(lines)


def render_explain(rule: Rule) -> str:
    """The documentation `autoopt explain CODE` prints: a header, when the rule fires, the
    fix and its safety, then the rule file's Markdown (the five sections)."""
    lines = [f"# {rule.name} ({rule.code})", "", rule.title, "", f"Family: {rule.family} ({rule.code[:3]}xx)"]
    if rule.transform:
        p = f" ({_params_text(rule.params)})" if rule.params else ""
        lines.append(f"Fix: transform `{rule.transform}`{p}, safety {rule.safety}")
    else:
        lines.append(f"Fix: none automatic (advice only), safety {rule.safety}")
    lines.append("Fires when all hold: " + "; ".join(f"`{c}`" for c in rule.conditions))
    if rule.unless:
        lines.append("Silent when any holds: " + "; ".join(f"`{c}`" for c in rule.unless))
    lines.append("")
    lines.append(rule.doc)
    return "\n".join(lines).rstrip() + "\n"
