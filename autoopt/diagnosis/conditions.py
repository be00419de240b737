"""Rule conditions: `field op literal` over the documented facts (autoopt.facts), read by a
small tokenizer (no eval) and type-checked when a rule loads. Ops == != < <= > >=; literals
are numbers, single- or double-quoted strings, true/false. A fact that is missing or None
makes a condition false.

`satisfiable` decides whether one value of a fact can meet several conditions at once: the
rule loader uses it to prove that two rules proposing the same transform cannot fire
together."""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from typing import Any

from autoopt.facts import FACTS

OPS: tuple[str, ...] = ("==", "!=", "<=", ">=", "<", ">")
_NEGATE = {"==": "!=", "!=": "==", "<": ">=", ">=": "<", ">": "<=", "<=": ">"}



@dataclass(frozen=True)
class Condition:
    """One `field op literal` condition, already type-checked against the fact registry."""

    field: str
    op: str
    value: Any
    text: str

    def holds(self, facts: dict[str, Any]) -> bool:
        """True when the fact is known and the comparison holds. A missing or None fact, or
        a value of the wrong type (a producer bug), makes the condition false."""
        actual = facts.get(self.field)
        if actual is None:
            return False
        return _compare(actual, self.op, self.value, FACTS[self.field][0])

    def negated(self) -> "Condition":
        return Condition(self.field, _NEGATE[self.op], self.value, f"not ({self.text})")

    def __str__(self) -> str:
        return f"{self.field} {self.op} {literal_text(self.value)}"


def literal_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    return repr(value)


def _compare(actual: Any, op: str, literal: Any, kind: str) -> bool:
    if kind == "bool":
        if not isinstance(actual, bool):
            return False
    elif kind == "number":
        if isinstance(actual, bool) or not isinstance(actual, (int, float)):
            return False
        if isinstance(actual, float) and math.isnan(actual):
            return False
    elif kind == "string":
        if not isinstance(actual, str):
            return False
    if op == "==":
        return actual == literal
    if op == "!=":
        return actual != literal
    if op == "<":
        return actual < literal
    if op == "<=":
        return actual <= literal
    if op == ">":
        return actual > literal
    if op == ">=":
        return actual >= literal
    raise AssertionError(op)  # pragma: no cover - ops are validated when parsed


class ConditionError(ValueError):
    """A condition that does not parse or type-check; `fix` says how to correct it."""

    def __init__(self, problem: str, fix: str):
        super().__init__(problem)
        self.problem = problem
        self.fix = fix


_TOKEN_RE = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<op>==|!=|<=|>=|<|>)
  | (?P<number>[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
  | (?P<string>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
    """,
    re.VERBOSE,
)


def tokenize(text: str) -> list[tuple[str, str]]:
    """Split a condition into (kind, text) tokens: op, number, name, string."""
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            ch = text[pos]
            if ch in "'\"":
                raise ConditionError(
                    f"the string starting at column {pos + 1} is not closed",
                    f"close it with a matching {ch}",
                )
            if ch == "=":
                raise ConditionError(
                    f"'=' at column {pos + 1} is not an operator",
                    "compare with one of == != < <= > >=",
                )
            raise ConditionError(
                f"unexpected character {ch!r} at column {pos + 1}",
                "write `field op literal`, e.g. \"metrics.idle_fraction >= 0.3\"",
            )
        kind = m.lastgroup
        assert kind is not None
        if kind != "ws":
            tokens.append((kind, m.group()))
        pos = m.end()
    return tokens


def _unquote(tok: str) -> str:
    body = tok[1:-1]
    return re.sub(r"\\(.)", r"\1", body)


def parse_condition(text: str) -> Condition:
    """Parse and type-check one condition; raises ConditionError with a fix."""
    if not isinstance(text, str):
        raise ConditionError(
            f"a condition must be a string, not {type(text).__name__}",
            "quote the whole condition, e.g. \"device.type == 'cuda'\"",
        )
    tokens = tokenize(text)
    shape = " ".join(kind for kind, _ in tokens)
    if not tokens:
        raise ConditionError("the condition is empty", "write `field op literal` or remove the entry")
    if tokens[0][0] != "name" or tokens[0][1] in ("true", "false"):
        raise ConditionError(
            f"it starts with {tokens[0][1]!r}, not a fact name",
            "put the fact first: `field op literal`, e.g. \"metrics.idle_fraction >= 0.3\"",
        )
    fld = tokens[0][1]
    if fld not in FACTS:
        close = difflib.get_close_matches(fld, list(FACTS), n=3, cutoff=0.8)
        hint = ((f"did you mean {' or '.join(close)}? " if close else "")
                + "See autoopt/facts.py for the documented names")
        raise ConditionError(f"{fld!r} is not a documented fact", hint)
    if len(tokens) < 2 or tokens[1][0] != "op":
        raise ConditionError(
            f"no comparison operator after {fld!r}" + (f" (found {tokens[1][1]!r})" if len(tokens) > 1 else ""),
            "use one of == != < <= > >=",
        )
    op = tokens[1][1]
    if len(tokens) < 3:
        raise ConditionError(f"nothing to compare {fld!r} "
                             f"with", "add a literal: a number, a quoted string, true or false")
    if len(tokens) > 3:
        raise ConditionError(
            f"extra tokens after the literal ({shape})",
            "write exactly one `field op literal` per list entry; list several conditions as separate strings",
        )
    kind, tok = tokens[2]
    if kind == "number":
        value: Any = float(tok) if any(c in tok for c in ".eE") else int(tok)
    elif kind == "string":
        value = _unquote(tok)
    elif kind == "name" and tok in ("true", "false"):
        value = tok == "true"
    elif kind == "name":
        raise ConditionError(
            f"{tok!r} is not a literal (comparing two facts is not supported)",
            f"quote it if it is a string: '{tok}', or compare with a number, true or false",
        )
    else:
        raise ConditionError(f"{tok!r} cannot be a literal", "use a number, a quoted string, true or false")

    fact_type = FACTS[fld][0]
    literal_type = "bool" if isinstance(value, bool) else "string" if isinstance(value, str) else "number"
    if literal_type != fact_type:
        example = {"bool": "true or false", "number": "a number such as "
                                                      "0.3", "string": "a quoted string such as 'cuda'"}
        raise ConditionError(
            f"{fld} is a {fact_type} fact but the literal {tok} is a {literal_type}",
            f"compare {fld} with {example[fact_type]}",
        )
    if fact_type in ("bool", "string") and op not in ("==", "!="):
        raise ConditionError(
            f"{op} does not order {fact_type} values",
            f"compare {fld} with == or !=",
        )
    return Condition(fld, op, value, text.strip())


def satisfiable(kind: str, conds: list[Condition]) -> bool:
    """Whether one value of a fact of this kind satisfies all conditions."""
    if kind == "bool":
        candidates: list[Any] = [True, False]
    elif kind == "string":
        candidates = [c.value for c in conds] + ["\x00 none of the literals"]
    else:
        lits = sorted({float(c.value) for c in conds})
        candidates = list(lits)
        if lits:
            candidates += [lits[0] - 1.0, lits[-1] + 1.0]
            candidates += [(a + b) / 2 for a, b in zip(lits, lits[1:])]
        else:
            candidates = [0.0]
    return any(all(_compare(v, c.op, c.value, kind) for c in conds) for v in candidates)
