"""From findings to candidates: which proposed transforms the search will try.

Each finding with a transform is put to the user's decision (the `decide` callback: the CLI
asks, or applies --yes / --accept / --reject); a transform declined, already proposed by
another finding, or not applicable to this workload (the transform's `check`) becomes a
`skipped` variant with its reason, so the report shows every finding's fate. `--try`
requests become findings of their own (code `try-<name>`).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from autoopt.errors import UserError
from autoopt.results import Variant
from autoopt.search.trial import Candidate
from autoopt.settings import manual_skip_reason
from autoopt.transforms import get_transform
from autoopt.transforms.base import Transform
from autoopt.types import Capabilities, Finding, Status, Workload

Decide = Callable[[Finding, Optional[Transform]], bool]  # decide(finding, transform) -> accept?


def check_try_names(extra: list) -> None:
    """--try names are checked before any work starts."""
    for name, _params in extra:
        try:
            get_transform(name)
        except KeyError as e:
            raise UserError(f"--try {name}: {e.args[0]}") from None


class CandidateBuilder:
    """Turns findings into candidates, recording what it skips as variants. Keeps the whole
    run's view: a transform is proposed once, and a finding is decided once."""

    def __init__(self, workload: Workload, caps: Capabilities, decide: Decide, variants: list[Variant]):
        self.workload = workload
        self.caps = caps
        self.decide = decide
        self.variants = variants
        self.findings: list[Finding] = []
        self.accepted: dict[str, bool] = {}
        self.proposed: set[str] = set()  # transform names already proposed

    def _skip(self, f: Finding, name: str, params: dict, *, accepted: bool, reason: str) -> None:
        self.variants.append(Variant(name=f.code, codes=[f.code], transforms=[{"name": name, "params": params}],
                                     accepted=accepted, status=Status.SKIPPED, reason=reason,
                                     safety=str(f.safety)))

    def from_findings(self, findings: list[Finding]) -> list[Candidate]:
        """The candidates of findings not seen before (by code)."""
        out = []
        for f in findings:
            if f.code in self.accepted:
                continue
            self.findings.append(f)
            t = get_transform(f.transform) if f.transform else None
            ok = self.decide(f, t)
            self.accepted[f.code] = ok
            if t is None:
                continue
            c = self._candidate(f, t, f.params, ok)
            if c is not None:
                out.append(c)
        return out

    def _candidate(self, f: Finding, t: Transform, params: dict, ok: bool, *,
                   explore: bool = True) -> Optional[Candidate]:
        """The candidate of an accepted finding, or None (recorded as skipped). With `explore`,
        the transform's other parameter sets worth measuring come along (a rule proposes a
        transform; a --try request asks for one parameter set)."""
        if not ok:
            manual = str(t.safety_for(params)) == "manual"
            self._skip(f, t.name, params, accepted=False,
                       reason=manual_skip_reason(f.code, t.name) if manual else "not accepted")
            return None
        if t.name in self.proposed:
            self._skip(f, t.name, params, accepted=True,
                       reason=f"transform {t.name} already proposed by another finding")
            return None
        reason = t.check(self.workload, self.caps, params)
        if reason is not None:
            self._skip(f, t.name, params, accepted=True, reason=reason)
            return None
        self.proposed.add(t.name)
        resolved = t.resolve_params(self.workload, self.caps, params)
        options = t.candidates(self.workload, self.caps, params if explore else resolved)
        return Candidate(f.code, f, t, resolved, options if len(options) > 1 else [])

    def from_try(self, extra: list[tuple[str, dict[str, Any]]], candidates: list[Candidate]) -> list[Candidate]:
        """`candidates` with each --try request added (replacing a finding's candidate for the
        same transform)."""
        out = list(candidates)
        for name, params in extra:
            t = get_transform(name)
            code = f"try-{name}"
            f = Finding(code=code, name=f"user-{name}", title=f"{name} requested with --try", message=(
                f"tried because it was asked for ({t.describe(params)}), not because a rule fired"),
                evidence={}, safety=t.safety_for(params), transform=name, params=dict(params))
            self.findings.append(f)
            self.accepted[code] = True
            out = [c for c in out if c.transform.name != t.name]
            self.proposed.discard(t.name)
            c = self._candidate(f, t, dict(params), True, explore=False)
            if c is not None:
                out.append(c)
        return out
