"""Patching the user's own training script: `patch_script(source, sites, changes)` writes the
kept configuration into `train.py` itself, each edit where a person would write it, with
LibCST so the user's formatting and comments stay as they are everywhere else.

`sites` is what the script's run recorded (autoopt.scripting's driver; lines are 1-based, of
the script file): where the model is called ("forward", with the variable bound to the model),
where the loss is backpropagated ("backward"), where the optimizer steps ("step") and is built
("optimizer"), every DataLoader(...) built ("dataloaders"), the statement that bound the model
("model_def", or None: then the last assignment to the model's variable before the forward, in
the same function or module scope, is used; failing that the variable whose `.parameters()`
the optimizer was given) and a Hugging Face / Lightning call ("framework"). A site recorded in
another file of the user's carries a "file" key and the edits that need it are skipped.

`changes` (a plain dict, from the kept configuration) and where each lands:

- matmul_precision / cudnn_benchmark / num_threads: `torch.set_float32_matmul_precision(...)`,
  `torch.backends.cudnn.benchmark = ...`, `torch.set_num_threads(n)` right after the imports, or
  in place of the script's own setting of the same thing.
- channels_last: `model = model.to(memory_format=torch.channels_last)` right after the statement
  that binds the model, in the same block (after an enclosing `if`/`try` that does not hold the
  training loop).
- compile: `model.compile(mode=..., backend=...)` after that (in place, as the run applied it:
  the model object, its class and its state_dict keys stay the same).
- optimizer_impl: `fused=True` / `foreach=True` in the optimizer's construction call (the
  other flag removed).
- dataloader: the keyword arguments in each recorded `DataLoader(...)` call (workers 0: no
  persistent_workers / prefetch_factor); its `intra_op_threads` is written as num_threads.
- amp: the statements from the forward's statement through the last one that computes the
  loss backpropagated (never the backward itself) in `with torch.autocast(device_type=...,
  dtype=...):`; forward and backward in different blocks of one function: the statement of the
  forward's block holding it is wrapped. fp16 with `scaler`: `scaler = torch.amp.GradScaler(...)`
  after the optimizer (or before the training loop), `scaler.scale(loss).backward()`,
  `scaler.step(opt)` and `scaler.update()`.
- framework_kwargs: the keyword arguments set in the `TrainingArguments(...)` / `Trainer(...)`
  call (an existing keyword's value replaced).

An edit that cannot be placed safely is not made: `ScriptPatch.skipped` holds (change, reason)
with the reason in one line; `applied` the changes written. Each change is all or nothing.
`unified_diff` (autoopt.patching.editor) makes the diff. Imports nothing else of autoopt.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import libcst as cst
from libcst.metadata import MetadataWrapper, PositionProvider

from autoopt.patching.editor import PatchError, SourceEditor, _CallKwargs, _dotted, unified_diff

__all__ = ["ScriptPatch", "patch_script", "unified_diff", "CHANGE_ORDER"]

# the order changes are planned in and listed in `applied`
CHANGE_ORDER = ("amp", "channels_last", "compile", "optimizer_impl", "dataloader", "matmul_precision",
                "cudnn_benchmark", "num_threads", "framework_kwargs")

_OPTIMIZERS = {"SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Adadelta", "Adamax", "NAdam", "RAdam", "ASGD",
               "Rprop", "SparseAdam", "LBFGS", "Adafactor", "Muon"}
_LOADER_KWARGS = ("num_workers", "pin_memory", "persistent_workers", "prefetch_factor")
_DTYPES = {"bfloat16": "torch.bfloat16", "float16": "torch.float16"}
_SITE_WHAT = {"forward": "model's forward call", "backward": "backward call", "step": "optimizer step",
              "optimizer": "optimizer construction", "framework": "framework call"}
_CONDITIONAL = (cst.If, cst.Try, cst.TryStar, cst.Match)
_SCOPES = (cst.FunctionDef, cst.ClassDef)


@dataclass
class ScriptPatch:
    """The patched script (`code`), the changes written (`applied`) and those not, each with
    its reason (`skipped`)."""

    code: str
    applied: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


class _Skip(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------------------- the script's index
@dataclass(eq=False)
class _Stmt:
    node: cst.BaseStatement
    block: Optional[cst.CSTNode]  # the Module / IndentedBlock whose body holds it (None: an elif)
    index: Optional[int]
    parent: Optional["_Stmt"]
    start: int
    end: int

    def chain(self) -> Iterable["_Stmt"]:
        """This statement and its enclosing ones, innermost first."""
        st = self
        while st is not None:
            yield st
            st = st.parent

    @property
    def scope(self) -> Optional["_Stmt"]:
        """The def/class this statement runs in (None: the module)."""
        for st in list(self.chain())[1:]:
            if isinstance(st.node, _SCOPES):
                return st
        return None

    def where(self) -> str:
        scope = self.scope
        if scope is None:
            return f"line {self.start}"
        return f"line {self.start}, in {scope.node.name.value}()"


@dataclass(eq=False)
class _CallAt:
    node: cst.Call
    start: int
    end: int
    stmt: Optional[_Stmt]


class _Collector(cst.CSTVisitor):
    """Every statement (with its block, index and enclosing statement) and call, with lines."""

    METADATA_DEPENDENCIES = (PositionProvider,)

    def __init__(self):
        super().__init__()
        self.stmts: list[_Stmt] = []
        self.calls: list[_CallAt] = []
        self._stack: list[_Stmt] = []
        self._slot: dict[int, tuple[cst.CSTNode, int]] = {}

    def on_visit(self, node: cst.CSTNode) -> bool:
        if isinstance(node, (cst.Module, cst.IndentedBlock)):
            for i, s in enumerate(node.body):
                self._slot[id(s)] = (node, i)
        elif isinstance(node, cst.BaseStatement):
            pos = self.get_metadata(PositionProvider, node)
            block, idx = self._slot.get(id(node), (None, None))
            st = _Stmt(node, block, idx, self._stack[-1] if self._stack else None, pos.start.line, pos.end.line)
            self.stmts.append(st)
            self._stack.append(st)
        elif isinstance(node, cst.Call):
            pos = self.get_metadata(PositionProvider, node)
            self.calls.append(_CallAt(node, pos.start.line, pos.end.line, self._stack[-1] if self._stack else None))
        return True

    def on_leave(self, original_node: cst.CSTNode) -> None:
        if isinstance(original_node, cst.BaseStatement):
            self._stack.pop()


def _target_names(target: cst.BaseExpression) -> set[str]:
    if isinstance(target, cst.Name):
        return {target.value}
    if isinstance(target, (cst.Tuple, cst.List)):
        out: set[str] = set()
        for el in target.elements:
            out |= _target_names(el.value)
        return out
    if isinstance(target, cst.StarredElement):
        return _target_names(target.value)
    return set()


class _Binder(cst.CSTVisitor):
    """Names bound by assignment inside a statement (not in nested defs, classes or lambdas)."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def visit_FunctionDef(self, node) -> bool:
        return False

    def visit_ClassDef(self, node) -> bool:
        return False

    def visit_Lambda(self, node) -> bool:
        return False

    def visit_Assign(self, node) -> None:
        for t in node.targets:
            self.names |= _target_names(t.target)

    def visit_AnnAssign(self, node) -> None:
        if node.value is not None:
            self.names |= _target_names(node.target)

    def visit_AugAssign(self, node) -> None:
        self.names |= _target_names(node.target)

    def visit_NamedExpr(self, node) -> None:
        self.names |= _target_names(node.target)

    def visit_For(self, node) -> None:
        self.names |= _target_names(node.target)

    def visit_AsName(self, node) -> None:
        self.names |= _target_names(node.name)


def _bound(node: cst.CSTNode) -> set[str]:
    v = _Binder()
    node.visit(v)
    return v.names


def _assigned(stmt: cst.BaseStatement) -> tuple[set[str], list[str]]:
    """(names, attribute targets such as self.model) a simple statement line assigns."""
    names: set[str] = set()
    attrs: list[str] = []
    if not isinstance(stmt, cst.SimpleStatementLine):
        return names, attrs
    for s in stmt.body:
        targets = [t.target for t in s.targets] if isinstance(s, cst.Assign) else (
            [s.target] if isinstance(s, cst.AnnAssign) and s.value is not None else [])
        for t in targets:
            names |= _target_names(t)
            if isinstance(t, cst.Attribute) and _dotted(t):
                attrs.append(_dotted(t))
    return names, attrs


class _Names(cst.CSTVisitor):
    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def visit_Name(self, node) -> None:
        self.names.add(node.value)


def _names(node: cst.CSTNode) -> set[str]:
    v = _Names()
    node.visit(v)
    return v.names


def _callee(call: cst.Call) -> Optional[str]:
    return _dotted(call.func)


def _last(name: Optional[str]) -> Optional[str]:
    return None if name is None else name.rsplit(".", 1)[-1]


def _is_autocast_with(node: cst.CSTNode) -> bool:
    return isinstance(node, cst.With) and any(
        isinstance(i.item, cst.Call) and _last(_callee(i.item)) == "autocast" for i in node.items)


def _stmt(code: str) -> cst.BaseStatement:
    return cst.parse_statement(code)


def _code_of(node: cst.CSTNode) -> str:
    return cst.Module(body=[]).code_for_node(node)


# ---------------------------------------------------------------------------- edits
@dataclass
class _Plan:
    """The edits of one change: call rewrites, statement rewrites, statements inserted before or
    after a statement of a block, a range of a block wrapped in `with`, and module-level
    statements after the imports (`top`, written through SourceEditor)."""

    calls: list[tuple[cst.Call, Callable[[cst.Call], cst.Call]]] = field(default_factory=list)
    lines: list[tuple[cst.SimpleStatementLine, Callable]] = field(default_factory=list)
    after: list[tuple[cst.CSTNode, int, list[cst.BaseStatement]]] = field(default_factory=list)
    before: list[tuple[cst.CSTNode, int, list[cst.BaseStatement]]] = field(default_factory=list)
    wraps: list[tuple[cst.CSTNode, int, int, str]] = field(default_factory=list)
    top: list[str] = field(default_factory=list)
    needs_torch: bool = True


class _Apply(cst.CSTTransformer):
    """All plans' edits in one pass over the original tree (nodes matched by identity, so the
    lines the sites name stay valid)."""

    def __init__(self, plans: list[_Plan]):
        super().__init__()
        self.calls: dict[int, list] = {}
        self.lines: dict[int, list] = {}
        self.after: dict[int, dict[int, list]] = {}
        self.before: dict[int, dict[int, list]] = {}
        self.wraps: dict[int, dict[int, tuple[int, str]]] = {}
        for p in plans:
            for node, fn in p.calls:
                self.calls.setdefault(id(node), []).append(fn)
            for node, fn in p.lines:
                self.lines.setdefault(id(node), []).append(fn)
            for block, idx, stmts in p.after:
                self.after.setdefault(id(block), {}).setdefault(idx, []).extend(stmts)
            for block, idx, stmts in p.before:
                self.before.setdefault(id(block), {}).setdefault(idx, []).extend(stmts)
            for block, i, j, item in p.wraps:
                self.wraps.setdefault(id(block), {})[i] = (j, item)

    def leave_Call(self, original, updated):
        for fn in self.calls.get(id(original), []):
            updated = fn(updated)
        return updated

    def leave_SimpleStatementLine(self, original, updated):
        for fn in self.lines.get(id(original), []):
            updated = fn(updated)
        return updated

    def _body(self, original, body) -> list:
        key = id(original)
        if key not in self.after and key not in self.before and key not in self.wraps:
            return list(body)
        after, before, wraps = self.after.get(key, {}), self.before.get(key, {}), self.wraps.get(key, {})
        out: list = []
        i = 0
        while i < len(body):
            out.extend(before.get(i, []))
            if i in wraps:
                j, item = wraps[i]
                inner: list = []
                for k in range(i, j + 1):
                    if k > i:
                        inner.extend(before.get(k, []))
                    inner.append(body[k])
                    if k < j:
                        inner.extend(after.get(k, []))
                out.append(_with_block(item, inner))
                out.extend(after.get(j, []))
                i = j + 1
                continue
            out.append(body[i])
            out.extend(after.get(i, []))
            i += 1
        return out

    def leave_Module(self, original, updated):
        return updated.with_changes(body=self._body(original, updated.body))

    def leave_IndentedBlock(self, original, updated):
        return updated.with_changes(body=self._body(original, updated.body))


def _with_block(item: str, stmts: list) -> cst.With:
    first = stmts[0]
    inner = [first.with_changes(leading_lines=[]), *stmts[1:]]
    return cst.With(items=[cst.WithItem(item=cst.parse_expression(item))], body=cst.IndentedBlock(body=inner),
                    leading_lines=first.leading_lines)


def _set_kwargs(kwargs: dict[str, str], remove: Iterable[str] = ()) -> Callable[[cst.Call], cst.Call]:
    def edit(call: cst.Call) -> cst.Call:
        name = _last(_callee(call)) or ""
        return _CallKwargs({name}, kwargs, set(remove)).leave_Call(call, call)
    return edit


# ---------------------------------------------------------------------------- the patcher
class _Patcher:
    def __init__(self, source: str, sites: dict, changes: dict, filename: str):
        self.source = source
        self.sites = sites or {}
        self._changes = changes
        self.filename = filename
        self.wrapper = MetadataWrapper(cst.parse_module(source))
        self.module = self.wrapper.module
        col = _Collector()
        self.wrapper.visit(col)
        self.stmts, self.calls = col.stmts, col.calls
        self.used_names = _names(self.module)
        self.quote = _quote_style(self.module)

    def lit(self, value) -> str:
        """`value` as Python source, a string in the script's own quotes."""
        if isinstance(value, str):
            text = repr(value)
            if self.quote == '"' and '"' not in value and "'" not in value and "\\" not in text:
                return f'"{value}"'
            return text
        return repr(value)

    # -- looking up --------------------------------------------------------------------------
    def site(self, key: str) -> dict:
        s = self.sites.get(key)
        what = _SITE_WHAT.get(key, key)
        if not s or s.get("line") is None:
            raise _Skip(f"the run recorded no {what} in {self.filename}")
        self._same_file(s, what)
        return s

    def _same_file(self, s: dict, what: str) -> None:
        other = s.get("file")
        if not other:
            return
        script = self.sites.get("script")
        if script and os.path.realpath(str(other)) == os.path.realpath(str(script)):
            return
        raise _Skip(f"the {what} is at {other}:{s.get('line')}, not in {self.filename}; make that change there")

    def stmt_at(self, line: int, what: str) -> _Stmt:
        """The innermost statement holding this line."""
        best = None
        for st in self.stmts:
            if st.start <= line <= st.end and (best is None or st.end - st.start <= best.end - best.start):
                best = st
        if best is None:
            raise _Skip(f"line {line} of {self.filename} (the {what}) holds no statement")
        return best

    def call_at(self, line: int, pred: Callable[[cst.Call], bool], what: str) -> _CallAt:
        """The innermost call satisfying pred whose lines hold `line` (or, failing that, the
        only such call in the statement holding it)."""
        here = [c for c in self.calls if c.start <= line <= c.end and pred(c.node)]
        starting = [c for c in here if c.start == line]
        if len(starting) == 1:
            return starting[0]
        if here:
            return min(here, key=lambda c: c.end - c.start)
        st = self.stmt_at(line, what)
        inside = [c for c in self.calls if c.stmt is st and pred(c.node)]
        if len(inside) == 1:
            return inside[0]
        found = [_code_of(c.node.func) for c in self.calls if c.start <= line <= c.end]
        seen = f" (it calls {', '.join(f'{f}(...)' for f in found)})" if found else ""
        raise _Skip(f"line {line} of {self.filename} holds no {what} call that autoopt can edit{seen}")

    @staticmethod
    def in_block(st: _Stmt) -> _Stmt:
        while st.block is None and st.parent is not None:
            st = st.parent
        return st

    def uses(self) -> list[int]:
        """Lines of this script where the model and optimizer are used (the forward, the
        backward, the step, the optimizer's construction): an edit after a binding must run
        before these."""
        out = []
        for key in ("forward", "backward", "step", "optimizer"):
            s = self.sites.get(key)
            if s and s.get("line") is not None and not s.get("file"):
                out.append(int(s["line"]))
        return out

    def lift(self, st: _Stmt, name: Optional[str]) -> _Stmt:
        """The statement to insert after: the binding itself, or, when `name` is bound in more
        than one branch of an `if`/`try`/`match` (so which one ran is not known here), that
        whole statement, unless it holds a use of the model or optimizer."""
        st = self.in_block(st)
        keep = self.uses()
        while st.parent is not None and isinstance(st.parent.node, _CONDITIONAL):
            top = self.in_block(st.parent)
            if any(top.start <= k <= top.end for k in keep) or name is None:
                break
            binds = [b for b in self._scope_bindings(name, st.scope, None) if top.start <= b.start <= top.end]
            if len(binds) < 2:
                break
            st = top
        return st

    # -- the model's binding ---------------------------------------------------------------
    def _scope_bindings(self, name: str, scope: Optional[_Stmt], before: Optional[int]) -> list[_Stmt]:
        return [st for st in self.stmts
                if isinstance(st.node, cst.SimpleStatementLine) and st.scope is scope
                and (before is None or st.start < before) and name in _assigned(st.node)[0]]

    @staticmethod
    def _params(scope: Optional[_Stmt]) -> set[str]:
        if scope is None or not isinstance(scope.node, cst.FunctionDef):
            return set()
        p = scope.node.params
        return {a.name.value for a in (*p.posonly_params, *p.params, *p.kwonly_params)}

    def binding(self, name: str, at: _Stmt) -> Optional[_Stmt]:
        """The last assignment to `name` before `at` in its scope; for a name a function only
        reads (neither its parameter nor assigned in it), the module's last one."""
        scope = at.scope
        found = self._scope_bindings(name, scope, at.start)
        if found:
            return found[-1]
        if scope is None or name in self._params(scope) or self._scope_bindings(name, scope, None):
            return None
        if any(name in _bound(st.node) for st in self.stmts if st.scope is scope):
            return None
        module = self._scope_bindings(name, None, None)
        return module[-1] if module else None

    def model_binding(self) -> tuple[_Stmt, str]:
        """(the statement to put model edits after, the model's variable)."""
        given = self.sites.get("model_def")
        if given and given.get("line") is not None:
            self._same_file(given, "model's definition")
            return self._given_binding(given)
        fwd = self.site("forward")
        var = fwd.get("model_var")
        at = self.stmt_at(int(fwd["line"]), "forward")
        if var and "." in var:
            raise _Skip(f"the model is the attribute {var} ({at.where()}); autoopt edits a plain variable "
                        f"only: add the change where {var} is assigned")
        found = self.binding(var, at) if var else None
        if found is not None:
            return self.lift(found, var), var
        via = self._binding_via_optimizer()
        if via is not None:
            return via
        if not var:
            raise _Skip(f"autoopt could not tell which variable holds the model called at {at.where()}")
        raise _Skip(f"no assignment to {var} precedes the forward ({at.where()}) in its scope, nor one to the "
                    f"variable the optimizer takes .parameters() of; add the change where the model is built")

    def _given_binding(self, given: dict) -> tuple[_Stmt, str]:
        line, var = int(given["line"]), given.get("var")
        st = self.stmt_at(line, "model's definition")
        names, attrs = _assigned(st.node)
        if var and "." in var or (not var and attrs):
            shown = var or attrs[0]
            raise _Skip(f"the model is the attribute {shown} ({st.where()}); autoopt edits a plain variable "
                        f"only: add the change where {shown} is assigned")
        if not var or var not in names:
            raise _Skip(f"line {line} of {self.filename} does not assign the model's variable {var or '?'}")
        return self.lift(st, var), var

    def _binding_via_optimizer(self) -> Optional[tuple[_Stmt, str]]:
        """The variable X in the optimizer's `X.parameters()` and its last binding before the
        optimizer is built (the model is what the optimizer trains)."""
        try:
            call = self.optimizer_call()
        except _Skip:
            return None
        for arg in call.node.args:
            v = arg.value
            if (isinstance(v, cst.Call) and isinstance(v.func, cst.Attribute)
                    and v.func.attr.value in ("parameters", "named_parameters")
                    and isinstance(v.func.value, cst.Name) and call.stmt is not None):
                name = v.func.value.value
                found = self.binding(name, call.stmt)
                if found is not None:
                    return self.lift(found, name), name
        return None

    def optimizer_call(self) -> _CallAt:
        s = self.site("optimizer")
        line = int(s["line"])

        def is_opt(call: cst.Call) -> bool:
            return _last(_callee(call)) in _OPTIMIZERS

        try:
            return self.call_at(line, is_opt, "torch.optim optimizer")
        except _Skip:
            st = self.stmt_at(line, "optimizer construction")
            raise _Skip(f"the optimizer is built at {st.where()} by a call autoopt cannot see into "
                        f"(`{self._key(st.node)}`); set the flag in the optimizer's own construction") from None

    def _key(self, node: cst.CSTNode) -> str:
        text = self.module.code_for_node(node.with_changes(leading_lines=[]) if hasattr(node, "leading_lines")
                                         else node).strip()
        first = text.splitlines()[0] if text else ""
        return first if len(first) <= 80 else first[:77] + "..."

    # -- plans ------------------------------------------------------------------------------
    def plan_channels_last(self, _value) -> _Plan:
        st, var = self.model_binding()
        return _Plan(after=[(st.block, st.index, [_stmt(f"{var} = {var}.to(memory_format=torch.channels_last)\n")])])

    def plan_compile(self, value: dict) -> _Plan:
        st, var = self.model_binding()
        value = value or {}
        args = []
        if value.get("mode") not in (None, "default"):
            args.append(f"mode={self.lit(value['mode'])}")
        if value.get("backend") not in (None, "inductor"):
            args.append(f"backend={self.lit(value['backend'])}")
        return _Plan(after=[(st.block, st.index, [_stmt(f"{var}.compile({', '.join(args)})\n")])], needs_torch=False)

    def plan_optimizer_impl(self, impl: str) -> _Plan:
        if impl not in ("fused", "foreach"):
            raise _Skip(f"unknown optimizer implementation {impl!r}")
        call = self.optimizer_call()
        self._no_splat(call, "optimizer")
        other = "foreach" if impl == "fused" else "fused"
        return _Plan(calls=[(call.node, _set_kwargs({impl: "True"}, remove={other}))], needs_torch=False)

    def _no_splat(self, call: _CallAt, what: str) -> None:
        if any(a.star == "**" for a in call.node.args):
            raise _Skip(f"the {what} call at line {call.start} passes **kwargs, so its keyword arguments "
                        f"cannot be set safely")

    def plan_dataloader(self, settings: dict) -> _Plan:
        unknown = set(settings) - set(_LOADER_KWARGS) - {"intra_op_threads", "non_blocking"}
        if unknown:
            raise _Skip(f"{', '.join(sorted(unknown))} is not a DataLoader argument")
        kwargs = {k: self.lit(settings[k]) for k in _LOADER_KWARGS if settings.get(k) is not None}
        remove: set[str] = set()
        if "num_workers" in kwargs and int(settings["num_workers"]) == 0:
            remove = {"persistent_workers", "prefetch_factor"}
            for k in remove:
                kwargs.pop(k, None)
        threads = settings.get("intra_op_threads")
        if not kwargs and not (threads and not self._changes.get("num_threads")):
            raise _Skip("none of these loader settings is an argument of DataLoader(...) "
                        f"({', '.join(sorted(settings)) or 'none given'})")
        sites = self.sites.get("dataloaders") or []
        if not sites and kwargs:
            raise _Skip(f"the run recorded no DataLoader(...) call in {self.filename}")
        plan = _Plan(needs_torch=False)
        for s in sites if kwargs else []:
            self._same_file(s, "DataLoader construction")
            call = self.call_at(int(s["line"]), lambda c: _last(_callee(c)) == "DataLoader", "DataLoader(...)")
            self._no_splat(call, "DataLoader")
            plan.calls.append((call.node, _set_kwargs(kwargs, remove)))
        if threads and not self._changes.get("num_threads"):
            plan.lines.extend(self._setting_lines("set_num_threads", repr(int(threads))))
            if not plan.lines:
                plan.top.append(f"torch.set_num_threads({int(threads)})\n")
            plan.needs_torch = True
        return plan

    def plan_framework_kwargs(self, value: dict) -> _Plan:
        kwargs = dict((value or {}).get("kwargs") or {})
        if not kwargs:
            raise _Skip("no framework arguments were given")
        for k, expr in kwargs.items():
            try:
                cst.parse_expression(str(expr))
            except cst.ParserSyntaxError:
                raise _Skip(f"the value of {k} is not a Python expression: {expr!r}") from None
        s = self.site("framework")
        name = s.get("call") or "Trainer"
        call = self.call_at(int(s["line"]), lambda c: _last(_callee(c)) == name, f"{name}(...)")
        self._no_splat(call, name)
        return _Plan(calls=[(call.node, _set_kwargs({k: str(v) for k, v in kwargs.items()}))], needs_torch=False)

    # settings: in place of the script's own, else after the imports
    def _setting_lines(self, func: str, arg: str) -> list:
        """Rewrites of the script's own `torch.<func>(...)` expression statements."""
        out = []
        for st in self.stmts:
            if not isinstance(st.node, cst.SimpleStatementLine):
                continue
            for small in st.node.body:
                if (isinstance(small, cst.Expr) and isinstance(small.value, cst.Call)
                        and _callee(small.value) == f"torch.{func}"):
                    out.append((st.node, _replace_call_arg(func, arg)))
                    break
        return out

    def plan_matmul_precision(self, value: str) -> _Plan:
        arg = self.lit(str(value))
        lines = self._setting_lines("set_float32_matmul_precision", arg)
        return _Plan(lines=lines, top=[] if lines else [f"torch.set_float32_matmul_precision({arg})\n"])

    def plan_num_threads(self, value: int) -> _Plan:
        arg = repr(int(value))
        lines = self._setting_lines("set_num_threads", arg)
        return _Plan(lines=lines, top=[] if lines else [f"torch.set_num_threads({arg})\n"])

    def plan_cudnn_benchmark(self, value: bool) -> _Plan:
        lines = []
        for st in self.stmts:
            if isinstance(st.node, cst.SimpleStatementLine) and any(
                    isinstance(s, cst.Assign) and any(_dotted(t.target) == "torch.backends.cudnn.benchmark"
                                                      for t in s.targets) for s in st.node.body):
                lines.append((st.node, _replace_assigned("torch.backends.cudnn.benchmark", repr(bool(value)))))
        return _Plan(lines=lines, top=[] if lines else [f"torch.backends.cudnn.benchmark = {bool(value)!r}\n"])

    # amp
    def plan_amp(self, amp: dict) -> _Plan:
        dtype = _DTYPES.get(str(amp.get("dtype") or "bfloat16"))
        if dtype is None:
            raise _Skip(f"unknown autocast dtype {amp.get('dtype')!r}")
        device = str(amp.get("device_type") or "cuda")
        fwd_site, bwd_site = self.site("forward"), self.site("backward")
        fwd = self.stmt_at(int(fwd_site["line"]), "forward")
        bwd = self.stmt_at(int(bwd_site["line"]), "backward")
        for st in fwd.chain():
            if st.scope is not fwd.scope:
                break
            if _is_autocast_with(st.node):
                raise _Skip(f"the forward ({fwd.where()}) already runs under the script's own autocast "
                            f"(line {st.start}); turn that one on instead")
        block, i, j = self._autocast_range(fwd, bwd)
        item = f"torch.autocast(device_type={self.lit(device)}, dtype={dtype})"
        plan = _Plan(wraps=[(block, i, j, item)])
        if amp.get("scaler"):
            self._plan_scaler(plan, device, bwd)
        return plan

    def _backward_call(self, bwd: _Stmt) -> _CallAt:
        line = int(self.sites["backward"]["line"])
        return self.call_at(line, _is_backward, "`.backward()`")

    def _autocast_range(self, fwd: _Stmt, bwd: _Stmt) -> tuple[cst.CSTNode, int, int]:
        """(block, first, last index) of the statements to run under autocast: from the one
        holding the forward through the last one assigning a name the backward's loss uses."""
        if fwd.scope is not bwd.scope:
            raise _Skip(f"the forward ({fwd.where()}) and the backward ({bwd.where()}) are in different "
                        f"functions; put the code that computes the loss under torch.autocast by hand")
        cur = self.in_block(fwd)
        while True:
            sibling = next((b for b in bwd.chain() if b.block is not None and b.block is cur.block), None)
            if sibling is not None:
                break
            parent = cur.parent
            if parent is None or isinstance(parent.node, _SCOPES):
                raise _Skip(f"the forward ({fwd.where()}) and the backward ({bwd.where()}) are in different blocks")
            cur = self.in_block(parent)
        if sibling is cur and cur is self.in_block(fwd):
            raise _Skip(f"the forward ({fwd.where()}) and the backward ({bwd.where()}) share one statement; "
                        f"autocast needs the forward and the loss in statements of their own")
        if sibling is cur or sibling.index < cur.index:
            raise _Skip(f"the forward ({fwd.where()}) and the backward ({bwd.where()}) are in different blocks")
        loss_names = _names(_loss_of(self._backward_call(bwd).node))
        body = cur.block.body
        last = sibling.index - 1
        binders = [k for k in range(cur.index, sibling.index) if _bound(body[k]) & loss_names]
        if binders:
            last = binders[-1]
        return cur.block, cur.index, last

    def _fresh(self, *names: str) -> str:
        for n in names:
            if n not in self.used_names:
                return n
        k = 2
        while f"{names[0]}{k}" in self.used_names:
            k += 1
        return f"{names[0]}{k}"

    def _plan_scaler(self, plan: _Plan, device: str, bwd: _Stmt) -> None:
        call = self._backward_call(bwd)
        loss = _loss_of(call.node)
        if isinstance(loss, cst.Call) and _last(_callee(loss)) == "scale":
            return  # the script scales its loss with its own GradScaler already
        if loss is not call.node.func.value:
            raise _Skip(f"the loss is backpropagated with {_callee(call.node)}(...) ({bwd.where()}); the fp16 "
                        f"GradScaler needs `scaler.scale(loss).backward()` written by hand")
        step_site = self.site("step")
        opt_var = step_site.get("optimizer_var") or (self.sites.get("optimizer") or {}).get("var")
        if not opt_var:
            raise _Skip("autoopt could not tell which variable holds the optimizer, so the fp16 GradScaler "
                        "cannot step it")
        step = self.call_at(int(step_site["line"]),
                            lambda c: isinstance(c.func, cst.Attribute) and c.func.attr.value == "step"
                            and _dotted(c.func.value) == opt_var, f"{opt_var}.step()")
        line = step.stmt
        if not (line is not None and isinstance(line.node, cst.SimpleStatementLine) and line.block is not None
                and any(isinstance(s, cst.Expr) and s.value is step.node for s in line.node.body)):
            raise _Skip(f"{opt_var}.step() at line {step.start} is not a statement of its own, so the fp16 "
                        f"GradScaler cannot take over the step")
        name = self._fresh("scaler", "grad_scaler", "amp_scaler")
        block, idx, where = self._scaler_home(bwd, line, name)
        create = _stmt(f"{name} = torch.amp.GradScaler({self.lit(device)})\n")
        (plan.after if where == "after" else plan.before).append((block, idx, [create]))
        plan.calls.append((call.node, _scaled_backward(name)))
        plan.calls.append((step.node, _scaled_step(name)))
        plan.after.append((line.block, line.index, [_stmt(f"{name}.update()\n")]))

    def _scaler_home(self, bwd: _Stmt, step: _Stmt, name: str) -> tuple[cst.CSTNode, int, str]:
        """Where the GradScaler is created: after the optimizer when that is in the loop's scope
        (or the module's), else before the outermost loop holding the backward and the step."""
        try:
            opt = self.optimizer_call()
        except _Skip:
            opt = None
        if opt is not None and opt.stmt is not None and (
                opt.stmt.scope is None or (opt.stmt.scope is bwd.scope and opt.start < bwd.start)):
            var = (self.sites.get("optimizer") or {}).get("var")
            st = self.lift(opt.stmt, var if var and "." not in var else None)
            return st.block, st.index, "after"
        loops = [st for st in bwd.chain() if isinstance(st.node, (cst.For, cst.While))
                 and st.scope is bwd.scope and st.start <= step.start <= st.end and st.block is not None]
        if loops:
            return loops[-1].block, loops[-1].index, "before"
        raise _Skip(f"the backward ({bwd.where()}) runs in no loop of its own and the optimizer is built "
                    f"elsewhere; create `{name} = torch.amp.GradScaler(...)` once where the optimizer is built")

    # -- running the plans ------------------------------------------------------------------
    def plan(self, key: str, value) -> _Plan:
        return getattr(self, f"plan_{key}")(value)

    def render(self, plans: list[_Plan]) -> str:
        module = self.module.visit(_Apply(plans))
        code = module.code
        top = [s for p in plans for s in p.top]
        if not any(p.needs_torch for p in plans):
            return code
        editor = SourceEditor(code, self.filename)
        editor.ensure_import("torch")
        if top:
            editor.add_statements("".join(top), comment="autoopt: process-wide settings of the kept configuration")
        return editor.code


def _is_backward(call: cst.Call) -> bool:
    func = call.func
    return (isinstance(func, cst.Attribute) and func.attr.value == "backward") or (
        isinstance(func, cst.Name) and func.value == "backward")


def _loss_of(call: cst.Call) -> cst.CSTNode:
    """The loss a backward call backpropagates: `loss` of `loss.backward()` or of
    `torch.autograd.backward(loss)`."""
    name = _callee(call) or ""
    if name == "backward" or name.endswith("autograd.backward"):
        return call.args[0].value if call.args else call
    return call.func.value


def _scaled_backward(scaler: str):
    """`loss.backward(...)` -> `scaler.scale(loss).backward(...)`."""
    def edit(call: cst.Call) -> cst.Call:
        scaled = cst.Call(func=cst.parse_expression(f"{scaler}.scale"), args=[cst.Arg(call.func.value)])
        return call.with_changes(func=call.func.with_changes(value=scaled))
    return edit


def _scaled_step(scaler: str):
    """`opt.step(...)` -> `scaler.step(opt, ...)`."""
    def edit(call: cst.Call) -> cst.Call:
        comma = cst.Comma(whitespace_after=cst.SimpleWhitespace(" ")) if call.args else cst.MaybeSentinel.DEFAULT
        first = cst.Arg(call.func.value, comma=comma)
        return call.with_changes(func=cst.parse_expression(f"{scaler}.step"), args=[first, *call.args])
    return edit


class _Quotes(cst.CSTVisitor):
    def __init__(self):
        super().__init__()
        self.double = self.single = 0

    def visit_SimpleString(self, node) -> None:
        body = node.value.lstrip("rbuRBUfF")
        if body.startswith('"'):
            self.double += 1
        elif body.startswith("'"):
            self.single += 1


def _quote_style(module: cst.Module) -> str:
    v = _Quotes()
    module.visit(v)
    return "'" if v.single > v.double else '"'


def _replace_call_arg(func: str, arg: str):
    def edit(line: cst.SimpleStatementLine) -> cst.SimpleStatementLine:
        body = []
        for s in line.body:
            if isinstance(s, cst.Expr) and isinstance(s.value, cst.Call) and _callee(s.value) == f"torch.{func}":
                s = s.with_changes(value=s.value.with_changes(args=[cst.Arg(cst.parse_expression(arg))]))
            body.append(s)
        return line.with_changes(body=body)
    return edit


def _replace_assigned(target: str, value: str):
    def edit(line: cst.SimpleStatementLine) -> cst.SimpleStatementLine:
        body = []
        for s in line.body:
            if isinstance(s, cst.Assign) and any(_dotted(t.target) == target for t in s.targets):
                s = s.with_changes(value=cst.parse_expression(value))
            body.append(s)
        return line.with_changes(body=body)
    return edit


def _requested(changes: dict) -> list[tuple[str, object]]:
    out = []
    for key in CHANGE_ORDER:
        value = changes.get(key)
        if key == "framework_kwargs":
            value = value if value and (value.get("kwargs") or {}) else None
        if value is None or (value is False and key != "cudnn_benchmark") or (
                key in ("dataloader", "num_threads") and not value):
            continue
        out.append((key, value))
    return out


def _compiles(code: str, filename: str) -> bool:
    try:
        compile(code, filename, "exec")
    except (SyntaxError, ValueError):
        return False
    return True


def patch_script(source: str, sites: dict, changes: dict, filename: str = "train.py") -> ScriptPatch:
    """The script with `changes` written where `sites` say; see the module docstring. A change
    that cannot be placed safely is left out, with its reason, and the others still apply."""
    todo = _requested(changes or {})
    try:
        patcher = _Patcher(source, sites, dict(changes or {}), filename)
    except cst.ParserSyntaxError as exc:
        reason = f"{filename} cannot be parsed for patching: {exc.message} (line {exc.raw_line})"
        return ScriptPatch(source, [], [(k, reason) for k, _ in todo])
    plans: dict[str, _Plan] = {}
    skipped: list[tuple[str, str]] = []
    for key, value in todo:
        try:
            plans[key] = patcher.plan(key, value)
        except (_Skip, PatchError) as exc:
            skipped.append((key, exc.reason))
    code = patcher.render(list(plans.values()))
    if not _compiles(code, filename):  # cannot happen by construction; never hand out a broken script
        for key in list(plans):
            if not _compiles(patcher.render([plans[key]]), filename):
                skipped.append((key, "the edit would not compile"))
                del plans[key]
        code = patcher.render(list(plans.values()))
    order = {k: i for i, k in enumerate(CHANGE_ORDER)}
    skipped.sort(key=lambda kv: order.get(kv[0], len(order)))
    return ScriptPatch(code, [k for k, _ in todo if k in plans], skipped)
