"""The speedup with training unchanged: the headline number of every report.

A transform whose safety is `manual` (a larger batch, gradient accumulation) changes what
training computes; its gain is not the same kind of gain as a faster kernel. The final
configuration's speedup mixes the two when one was accepted, so the report also states the
speedup of the kept transforms minus the semantic ones (`final.fixed_batch_speedup`):

- nothing semantic kept: the final speedup itself, re-measured beside the baseline;
- only semantic changes kept: 1.0 (training unchanged is the baseline);
- otherwise the search's measurement of the configuration before the semantic change (the
  batch search starts from it): its speedup over the baseline with the 95 % interval of the
  ratio that decided it; not measured (None) when the search holds no such variant.
"""
from __future__ import annotations

from typing import Optional

from autoopt.results import FinalResult, Variant
from autoopt.search.trial import Candidate


def semantic(c: Candidate) -> bool:
    return str(c.transform.safety_for(c.params)) == "manual"


def semantic_text(chosen: list[Candidate], base_batch: Optional[int]) -> str:
    """'batch size 16 -> 128' (and the other semantic changes), or ''."""
    parts = []
    for c in chosen:
        if not semantic(c):
            continue
        p = c.params
        if c.transform.name == "batch_size":
            parts.append(f"batch size {p.get('previous') or base_batch} -> {p.get('batch_size')}")
        elif c.transform.name == "grad_accumulation" and p.get("steps"):
            parts.append(f"gradient accumulation over {p['steps']} micro-batches")
        else:
            parts.append(c.transform.name)
    return " and ".join(parts)


def _measured(variants: list[Variant], codes: list[str]) -> Optional[Variant]:
    """The search's fastest measured variant of exactly these codes."""
    same = [v for v in variants if v.codes == codes and v.name not in ("final", "baseline")
            and v.measurement is not None and v.speedup is not None]
    return max(same, key=lambda v: v.speedup) if same else None


def set_fixed_batch(final: FinalResult, chosen: list[Candidate], variants: list[Variant],
                    base_batch: Optional[int]) -> FinalResult:
    """Fill final's fixed_batch_* and semantic_changes from the kept candidates and the search."""
    keep = [c for c in chosen if not semantic(c)]
    if len(keep) == len(chosen):
        how = ("nothing was kept: training unchanged is the baseline" if not chosen else
               "the final configuration itself (training unchanged), re-measured beside the baseline")
        return final.set_fixed_batch(final.speedup, final.speedup_low, final.speedup_high, how)
    final.semantic_changes = semantic_text(chosen, base_batch)
    if not keep:
        return final.set_fixed_batch(1.0, 1.0, 1.0, "only changes of training were kept: with training "
                                                   "unchanged, the baseline itself")
    v = _measured(variants, [c.code for c in keep])
    if v is None:
        return final.set_fixed_batch(None, None, None, "not measured: the search holds no measurement of "
                                                       f"{'+'.join(c.code for c in keep)} without the change "
                                                       "of training")
    d = v.decision
    if d is None:
        return final.set_fixed_batch(v.speedup, None, None, f"from the search: {v.name}")
    low, high = d.interval
    scale = v.speedup / d.ratio if d.ratio else 1.0
    where = ("measured beside the baseline" if d.anchor == "the baseline" else
             f"the product of the side-by-side ratios that led there, the last beside {d.anchor}")
    return final.set_fixed_batch(v.speedup, low * scale, high * scale,
                                 f"from the search: {v.name} without the change of training, {where} "
                                 f"({d.how})")
