"""Writing the kept transforms into the user's model file: each transform's patch face edits
the source through one SourceEditor (autoopt.patching.editor), in the canonical transform
order, and the result is a unified diff that `patch -p1` applies beside the file.

A transform that cannot patch (PatchError) or whose edit would not compile is skipped with
its reason, as a value (`PatchResult.skipped`); the others still apply. The patched file is
then loaded and checked (autoopt.transforms.patch_check) before a diff is returned: when the
check fails there is no diff, and `PatchResult.check_failure` says why.

The diff names the file as the user gave it (`name`: a symlink's own name, not its target's).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from autoopt.patching.editor import PatchError, SourceEditor, unified_diff
from autoopt.transforms import ordered
from autoopt.transforms.base import Transform
from autoopt.types import Workload


@dataclass
class PatchResult:
    diff: str
    new_source: str
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (transform name, reason)
    applied: list[str] = field(default_factory=list)
    check_failure: Optional[str] = None  # why the patched file failed its check (then diff is "")

    def to_json(self) -> dict:
        return {"applied": self.applied, "skipped": [{"name": n, "reason": r} for n, r in self.skipped],
                "check_failure": self.check_failure}

    def check_json(self) -> dict:
        """report.json's "patch_check": whether a patch was checked, passed, and why not."""
        return {"checked": bool(self.diff or self.check_failure), "ok": self.check_failure is None,
                "reason": self.check_failure}


def build_patch(path, transforms: list[tuple[Transform, dict]], workload: Optional[Workload],
                name: Optional[str] = None, check: bool = True) -> PatchResult:
    """Patch the model file at `path` with each (transform, resolved params), in the
    canonical transform order. A transform that cannot patch (PatchError) or whose edit
    would not compile is skipped with its reason; the others still apply. `name`: the file
    name the diff uses (default path's). With `check`, the patched file is loaded and
    checked first (patch_check); a failure returns no diff, with the reason."""
    path = Path(path)
    original = path.read_text(encoding="utf-8")
    filename = name or path.name
    try:
        editor = SourceEditor(original, filename)
    except PatchError as exc:
        return PatchResult("", original, [(t.name, exc.reason) for t, _ in transforms], [])
    skipped: list[tuple[str, str]] = []
    applied: list[str] = []
    for t, params in ordered(transforms):
        saved = (editor.module, list(editor._added_after_imports), list(editor._added_functions))
        try:
            t.patch(editor, dict(params), workload)
            compile(editor.code, filename, "exec")
        except PatchError as exc:
            editor.module, editor._added_after_imports, editor._added_functions = saved
            skipped.append((t.name, exc.reason))
            continue
        except SyntaxError as exc:
            editor.module, editor._added_after_imports, editor._added_functions = saved
            skipped.append((t.name, f"the edit would not compile ({exc.msg}, line {exc.lineno})"))
            continue
        applied.append(t.name)
    new = editor.code
    if check and new != original:
        from autoopt.transforms.patch_check import check_patched

        problem = check_patched(path, new, workload.spec if workload is not None else None, shown=filename)
        if problem:
            return PatchResult("", original, skipped, [], check_failure=problem)
    return PatchResult(unified_diff(original, new, filename), new, skipped, applied)
