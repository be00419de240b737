"""The rule engine: rule files in `rules/AO###-slug.md`, conditions over documented facts.

A rule file is TOML front matter between `+++` lines, then the Markdown documentation that
`autoopt explain` prints (five sections, like ruff's rules):

    +++
    code = "AO101"
    name = "enable-bf16-autocast"
    title = "..."
    when = ["device.type == 'cuda'", "metrics.fp32_matmul_fraction >= 0.3"]   # all must hold
    unless = ["workload.autocast == true"]     # optional: any that holds silences the rule
    transform = "amp"                          # optional: advice-only rules have none
    params = { dtype = "bfloat16" }
    safety = "unsafe"                          # safe | unsafe | manual
    message = "{metrics.fp32_matmul_fraction:.0%} of matmul time runs in fp32"
    gain = { shares = ["metrics.kernel_fraction", "metrics.matmul_fraction"], removable = 0.75 }
    +++
    ## What it does
    ## Why is this bad?
    ## Example
    ## Use instead
    ## Fix safety

Conditions are `field op literal`, read by a small tokenizer (no eval): ops == != < <= > >=,
literals are numbers, single- or double-quoted strings, true/false. Fields must be names in
`autoopt.facts.FACTS` and the literal must fit the fact's type; this is checked when rules
load, and a bad rule file raises `autoopt.errors.UserError` naming the file, the condition
and the fix. At evaluation time a fact that is missing or None makes its condition false:
a `when` condition on an unknown fact keeps the rule silent, an `unless` condition on an
unknown fact does not silence it.

Two rules that propose the same transform with overlapping parameters (alternatives such
as bf16 vs fp16 autocast) must be mutually exclusive through their conditions; the loader
proves it per pair and rejects the library otherwise.
"""
from __future__ import annotations

import difflib
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from autoopt.catalog import CATALOG, rule_transform_names
from autoopt.diagnosis import predicted_gain as gain_mod
from autoopt.diagnosis.conditions import Condition, ConditionError, parse_condition, satisfiable
from autoopt.errors import UserError
from autoopt.facts import FACTS
from autoopt.types import SAFETY_LEVELS, Finding

FAMILIES: dict[str, str] = {
    "0": "training health",
    "1": "precision",
    "2": "memory layout",
    "3": "compilation and launch overhead",
    "4": "batch size and memory",
    "5": "input pipeline",
    "6": "host-device synchronisation",
    "7": "optimizer",
    "8": "distributed",
    "9": "environment",
}

# The transforms a rule may propose (autoopt.catalog, the one list of transforms).
TRANSFORMS: tuple[str, ...] = rule_transform_names()

# Transforms that change training semantics: their rules must say safety = "manual".
SEMANTIC_TRANSFORMS = frozenset(n for n in TRANSFORMS if CATALOG[n].changes_training)

# Optional lists of source locations ("path:line op") that the trace analysis may add to the
# facts next to the registry's scalar facts. A rule names one with `locations = "..."`; when
# the facts carry it, the finding's evidence and message point at those lines.
LOCATION_FACTS: dict[str, str] = {
    "metrics.sync_sites": "source lines of host-device synchronisations in the step (from stacks)",
    "metrics.data_dependent_sites": "source lines of nonzero / masked_select / unique calls (from stacks)",
}

SECTIONS: tuple[str, ...] = (
    "## What it does",
    "## Why is this bad?",
    "## Example",
    "## Use instead",
    "## Fix safety",
)

REQUIRED_KEYS = ("code", "name", "title", "when", "safety")
ALLOWED_KEYS = frozenset(
    REQUIRED_KEYS + ("transform", "params", "unless", "message", "gain", "family", "locations")
)

_FILE_RE = re.compile(r"^(AO\d{3})-([a-z0-9]+(?:-[a-z0-9]+)*)\.md$")
_CODE_RE = re.compile(r"^AO(?!000)\d{3}$")
_NAME_RE = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")


# --------------------------------------------------------------------------- rules


@dataclass
class Rule:
    code: str
    name: str
    title: str
    family: str
    conditions: list[Condition]
    transform: Optional[str]
    params: dict[str, Any]
    safety: str
    doc: str
    path: Path
    unless: list[Condition] = field(default_factory=list)
    message: str = ""
    gain: dict[str, Any] = field(default_factory=dict)
    locations: Optional[str] = None

    def fires(self, facts: dict[str, Any]) -> bool:
        return all(c.holds(facts) for c in self.conditions) and not any(c.holds(facts) for c in self.unless)

    def fact_names(self) -> list[str]:
        """Every fact this rule reads: conditions, unless, message placeholders, gain."""
        names: list[str] = []
        for n in (
            [c.field for c in self.conditions]
            + [c.field for c in self.unless]
            + _message_fields(self.message)
            + gain_mod.fact_names(self.gain)
        ):
            if n not in names:
                names.append(n)
        return names

    def to_json(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "name": self.name,
            "title": self.title,
            "transform": self.transform,
            "safety": self.safety,
            "family": self.family,
            "params": self.params,
            "when": [c.text for c in self.conditions],
            "unless": [c.text for c in self.unless],
        }


def _rule_error(path: Path, problem: str, fix: str) -> UserError:
    return UserError(f"Rule file {path}: {problem}. Fix: {fix}.")


def _split_front_matter(path: Path, text: str) -> tuple[str, str]:
    lines = text.splitlines(keepends=True)
    if not lines or lines[0].strip() != "+++":
        raise _rule_error(path, "it does not start with a '+++' line",
                          "open the TOML front matter with '+++' on the first line")
    for i in range(1, len(lines)):
        if lines[i].strip() == "+++":
            return "".join(lines[1:i]), "".join(lines[i + 1 :])
    raise _rule_error(path, "the TOML front matter is not closed",
                      "close it with a '+++' line before the documentation")


def _message_fields(template: str) -> list[str]:
    out = []
    for _, fname, _, _ in string.Formatter().parse(template):
        if fname:
            out.append(fname)
    return out


_SAMPLE = {"number": 0.5, "bool": True, "string": "x"}


def _check_message(path: Path, template: str) -> None:
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise _rule_error(path, f"the message template does not parse ({exc})",
                          "balance the braces; write a literal brace as {{ or }}") from exc
    for _, fname, spec, conv in parts:
        if fname is None:
            continue
        if fname not in FACTS:
            close = difflib.get_close_matches(fname, list(FACTS), n=3, cutoff=0.8)
            hint = (f"did you mean {' or '.join(close)}? " if close else "") + "Use a name from autoopt/facts.py"
            raise _rule_error(path, f"the message placeholder {{{fname}}} is not a documented fact", hint)
        if conv:
            raise _rule_error(path, f"the message placeholder {{{fname}!{conv}}} uses a conversion",
                              "drop the !conversion; use a format spec such as :.0%")
        try:
            format(_SAMPLE[FACTS[fname][0]], spec or "")
        except (ValueError, TypeError) as exc:
            raise _rule_error(
                path,
                f"the format spec {spec!r} of {{{fname}}} does not fit a {FACTS[fname][0]} fact ({exc})",
                "use a spec for that type, e.g. :.0% or :.1f for numbers, none for strings",
            ) from exc


def parse_rule(path: Path, text: Optional[str] = None) -> Rule:
    """Read and validate one rule file (everything that can be checked without the others)."""
    path = Path(path)
    m = _FILE_RE.match(path.name)
    if m is None:
        raise _rule_error(
            path,
            "the file name does not follow AO###-slug.md",
            "name it after the rule's code and name, e.g. AO101-enable-bf16-autocast.md",
        )
    meta, body = _read_meta(path, text)
    code, name, family = _check_identity(path, meta, m)
    transform, params = _check_transform(path, meta)
    conditions = _parse_conditions(path, meta["when"], "when", required=True)
    unless = _parse_conditions(path, meta.get("unless", []), "unless", required=False)
    message = meta.get("message", meta["title"])
    if not isinstance(message, str):
        raise _rule_error(path, "message must be a string", "write message = \"...\"")
    _check_message(path, message)
    gain_spec = meta.get("gain", {})
    try:
        gain_mod.validate(gain_spec)
    except ValueError as exc:
        raise _rule_error(path, f"the gain spec is invalid: {exc}", gain_mod.SPEC_HELP) from exc
    locations = meta.get("locations")
    if locations is not None and locations not in LOCATION_FACTS:
        raise _rule_error(path, f"locations {locations!r} is not a known list of source lines",
                          f"use one of {', '.join(LOCATION_FACTS)}")
    doc = body.strip("\n")
    _check_sections(path, doc)
    return Rule(code=code, name=name, title=meta["title"].strip(), family=family, conditions=conditions,
                transform=transform, params=dict(params), safety=meta["safety"], doc=doc, path=path, unless=unless,
                message=message, gain=dict(gain_spec), locations=locations)


def _read_meta(path: Path, text: Optional[str]) -> tuple[dict[str, Any], str]:
    """The TOML front matter (required keys present, no unknown ones) and the documentation."""
    if text is None:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"Rule file {path} cannot be read ({exc}). Fix: make it a readable UTF-8 file.",
                            cause=exc) from exc
    front, body = _split_front_matter(path, text)
    try:
        meta = tomllib.loads(front)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"Rule file {path}: the front matter is not valid TOML ({exc}). Fix: correct the TOML "
                        "between the '+++' lines.", cause=exc) from exc
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise _rule_error(path, f"the front matter lacks {', '.join(missing)}",
                          f"add {' and '.join(missing)} (see the Rules section of README.md)")
    unknown = sorted(set(meta) - ALLOWED_KEYS)
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, sorted(ALLOWED_KEYS), n=1)
            hints.append(f"{k!r} (did you mean {close[0]!r}?)" if close else repr(k))
        raise _rule_error(path, f"unknown front matter key {', '.join(hints)}",
                          f"use only {', '.join(sorted(ALLOWED_KEYS))}")
    for key in ("code", "name", "title", "safety"):
        if not isinstance(meta[key], str) or not meta[key].strip():
            raise _rule_error(path, f"{key} must be a non-empty string", f"write {key} = \"...\"")
    return meta, body


def _check_identity(path: Path, meta: dict[str, Any], m: re.Match) -> tuple[str, str, str]:
    """(code, name, family): the code's range, the name's form, the file name, the safety level."""
    code, name = meta["code"], meta["name"]
    if not _CODE_RE.match(code):
        raise _rule_error(path, f"code {code!r} is not AO followed by three digits in AO001..AO999",
                          "use a code like AO101; the first digit is the family (0 training health, 1 precision "
                          "... 9 environment)")
    if not _NAME_RE.match(name):
        raise _rule_error(path, f"name {name!r} is not lowercase words joined by hyphens",
                          "write it like enable-bf16-autocast")
    if m.group(1) != code or m.group(2) != name:
        raise _rule_error(path, f"the file name does not match code {code!r} and name {name!r}",
                          f"rename the file to {code}-{name}.md")
    family = FAMILIES[code[2]]
    if "family" in meta and meta["family"] != family:
        raise _rule_error(path, f"family {meta['family']!r} does not match the code range {code[:3]}xx ({family})",
                          f"set family = \"{family}\" or move the rule to the right code range")
    if meta["safety"] not in SAFETY_LEVELS:
        raise _rule_error(path, f"safety {meta['safety']!r} is not one of {', '.join(SAFETY_LEVELS)}",
                          "pick safe (same results to fp32 tolerance), unsafe (changes numerics) or manual "
                          "(changes training semantics)")
    return code, name, family


def _check_transform(path: Path, meta: dict[str, Any]) -> tuple[Optional[str], dict]:
    """The proposed transform (a catalog name, or None for advice) and its params."""
    transform = meta.get("transform") or None
    if transform is not None and transform not in TRANSFORMS:
        close = difflib.get_close_matches(str(transform), TRANSFORMS, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"use one of {', '.join(TRANSFORMS)}"
        raise _rule_error(path, f"transform {transform!r} is unknown",
                          f"{hint} (or leave transform out for an advice-only rule)")
    if transform in SEMANTIC_TRANSFORMS and meta["safety"] != "manual":
        raise _rule_error(path, f"transform {transform!r} changes training semantics but safety is {meta['safety']!r}",
                          "set safety = \"manual\"")
    params = meta.get("params", {})
    if not isinstance(params, dict):
        raise _rule_error(path, "params must be a table", "write params = { key = value }")
    if params and transform is None:
        raise _rule_error(path, "params are given for an advice-only rule", "add a transform or remove params")
    return transform, params


def _parse_conditions(path: Path, raw: Any, key: str, required: bool) -> list[Condition]:
    if not isinstance(raw, list):
        raise _rule_error(path, f"{key} must be a list of strings", f"write {key} = [\"field op literal\", ...]")
    if required and not raw:
        raise _rule_error(path, f"{key} is empty, so the rule would fire on every run", "add at least one condition")
    out = []
    for item in raw:
        try:
            out.append(parse_condition(item))
        except ConditionError as exc:
            raise _rule_error(path, f"{key} condition {item!r}: {exc.problem}", exc.fix) from exc
    return out


def _check_sections(path: Path, doc: str) -> None:
    headings = [ln.strip() for ln in doc.splitlines() if ln.startswith("## ")]
    missing = [s for s in SECTIONS if s not in headings]
    if missing:
        raise _rule_error(path, f"the documentation lacks {', '.join(repr(s) for s in missing)}",
                          f"write the five sections in this order: {'; '.join(SECTIONS)}")
    order = [headings.index(s) for s in SECTIONS]
    if order != sorted(order):
        raise _rule_error(path, "the documentation sections are out of order", f"order them: {'; '.join(SECTIONS)}")
    # every section needs text under it
    positions = []
    lines = doc.splitlines()
    for s in SECTIONS:
        positions.append(next(i for i, ln in enumerate(lines) if ln.strip() == s))
    positions.append(len(lines))
    for s, start, end in zip(SECTIONS, positions, positions[1:]):
        if not any(ln.strip() and not ln.startswith("## ") for ln in lines[start + 1 : end]):
            raise _rule_error(path, f"the section {s!r} is empty", "write what the section asks for")


# --------------------------------------------------------------------------- exclusivity


def mutually_exclusive(a: Rule, b: Rule) -> bool:
    """True when no fact dict can make both rules fire: some fact that a `when` condition of
    either rule requires to be known cannot satisfy both rules' constraints at once (an
    `unless` condition constrains a known fact by its negation)."""
    known = {c.field for c in a.conditions} | {c.field for c in b.conditions}
    for f in known:
        conds = [c for c in a.conditions + b.conditions if c.field == f]
        conds += [c.negated() for c in a.unless + b.unless if c.field == f]
        if not satisfiable(FACTS[f][0], conds):
            return True
    return False


def _check_library(rules: list[Rule]) -> None:
    seen_codes: dict[str, Rule] = {}
    seen_names: dict[str, Rule] = {}
    for r in rules:
        if r.code in seen_codes:
            raise _rule_error(r.path, f"code {r.code} is also used by {seen_codes[r.code].path.name}",
                              "give each rule its own code")
        if r.name in seen_names:
            raise _rule_error(r.path, f"name {r.name!r} is also used by {seen_names[r.name].path.name}",
                              "give each rule its own name")
        seen_codes[r.code] = r
        seen_names[r.name] = r
    for i, a in enumerate(rules):
        for b in rules[i + 1 :]:
            if a.transform is None or a.transform != b.transform:
                continue
            # complementary settings of one transform (disjoint params) may fire together
            if a.params and b.params and not (set(a.params) & set(b.params)):
                continue
            if not mutually_exclusive(a, b):
                raise _rule_error(
                    b.path,
                    f"{b.code} and {a.code} both propose transform {a.transform!r} with overlapping params and can "
                    f"fire together",
                    "make their conditions mutually exclusive (e.g. a `when` condition in one that is an `unless` "
                    "condition in the other)",
                )


# --------------------------------------------------------------------------- loading

_PACKAGE_DIR = Path(__file__).resolve().parent.parent


def rules_dir() -> Path:
    """Where the rule files are: inside the installed package (`autoopt/rules/`, put there by
    the wheel's force-include), else the source checkout's `rules/`."""
    here = _PACKAGE_DIR
    for candidate in (here / "rules", here.parent / "rules"):
        if candidate.is_dir() and any(candidate.glob("AO*.md")):
            return candidate
    raise UserError(
        f"No rule files were found in {here / 'rules'} or {here.parent / 'rules'}. "
        "Fix: reinstall autoopt (the wheel ships them) or run from a source checkout that has rules/."
    )


def load_rules(directory: Optional[Path | str] = None) -> list[Rule]:
    """Every rule in the directory (default: rules_dir()), validated, sorted by code."""
    d = Path(directory) if directory is not None else rules_dir()
    if not d.is_dir():
        raise UserError(f"Rule directory {d} does not exist. Fix: pass a directory that holds AO###-slug.md files.")
    rules = []
    for p in sorted(d.iterdir()):
        if p.suffix != ".md" or not p.name.startswith("AO"):
            continue
        rules.append(parse_rule(p))
    if not rules:
        raise UserError(f"Rule directory {d} holds no AO###-slug.md files. Fix: point at the rules/ directory.")
    rules.sort(key=lambda r: r.code)
    _check_library(rules)
    return rules


def get_rule(code: str, rules: Optional[list[Rule]] = None) -> Rule:
    """The rule with this code (or name), case-insensitive; UserError with close matches."""
    rules = rules if rules is not None else load_rules()
    key = code.strip()
    for r in rules:
        if r.code.lower() == key.lower() or r.name == key.lower():
            return r
    pool = [r.code for r in rules] + [r.name for r in rules]
    probe = key.upper() if key.upper().startswith("AO") else key.lower()
    close = difflib.get_close_matches(probe, pool, n=3, cutoff=0.5)
    if not close and re.match(r"^ao\d", key, re.I):
        close = [r.code for r in rules if r.code.startswith(key.upper()[:3])][:5]
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UserError(f"There is no rule {code!r}.{hint} Fix: run `autoopt rules` to list every rule code.")


# --------------------------------------------------------------------------- evaluation

def _format_message(rule: Rule, facts: dict[str, Any]) -> str:
    out = []
    for literal, fname, spec, _ in string.Formatter().parse(rule.message):
        out.append(literal)
        if fname is None:
            continue
        v = facts.get(fname)
        if v is None:
            out.append("unknown")
            continue
        try:
            out.append(format(v, spec or ""))
        except (ValueError, TypeError):
            out.append(str(v))
    text = "".join(out)
    if rule.locations:
        sites = facts.get(rule.locations)
        if sites:
            sites = [str(s) for s in sites]
            shown = ", ".join(sites[:5]) + (f" and {len(sites) - 5} more" if len(sites) > 5 else "")
            text = f"{text} (at {shown})"
    return text


def _json_value(v: Any) -> Any:
    if isinstance(v, float):
        return round(v, 6)
    return v


def evaluate(rules: list[Rule], facts: dict[str, Any]) -> list[Finding]:
    """A Finding for every rule whose `when` conditions all hold and no `unless` condition
    holds, in code order, with the facts it read as evidence and a predicted gain."""
    findings = []
    for rule in rules:
        if not rule.fires(facts):
            continue
        evidence: dict[str, Any] = {}
        for n in rule.fact_names():
            v = facts.get(n)
            if v is not None:
                evidence[n] = _json_value(v)
        if rule.locations and facts.get(rule.locations):
            evidence[rule.locations] = [str(s) for s in facts[rule.locations]]
        speedup, predicted = gain_mod.predict(rule.gain, facts)
        findings.append(
            Finding(
                code=rule.code,
                name=rule.name,
                title=rule.title,
                message=_format_message(rule, facts),
                evidence=evidence,
                safety=rule.safety,
                transform=rule.transform,
                params=dict(rule.params),
                expected_speedup=speedup,
                predicted_step_time_ms=predicted,
                family=rule.family,
            )
        )
    return findings
