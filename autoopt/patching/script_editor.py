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
  `torch.backends.cudnn.benchmark = ...`, `torch.set_num_threads(n)` right after the imports;
  the script's own setting of the same thing is changed in place (and then nothing is added
  unless that one runs only under an if/try/loop).
- channels_last: `model = model.to(memory_format=torch.channels_last)` right after the statement
  that binds the model, in the same block; when that binding ends a branch of an if/try/match
  and the model is also bound in another branch (or before it), after that whole statement.
- compile: `model.compile(mode=..., backend=...)` after that: in place, as the run applied it,
  so the model object, its class and its state_dict keys stay what the rest of the script
  expects (`torch.compile(model)` would return a wrapper with `_orig_mod.` keys).
- optimizer_impl: `fused=True` / `foreach=True` in the optimizer's construction call (the
  other flag removed).
- dataloader: the keyword arguments in each recorded `DataLoader(...)` call (workers 0: no
  persistent_workers / prefetch_factor); its `intra_op_threads` is written as num_threads and
  `non_blocking` left to the script's own `.to()` calls, as the run does.
- amp: `with torch.autocast(device_type=..., dtype=...):` around the statements from the
  forward's through the last one assigning a name the backpropagated loss uses (never the
  backward itself, nor the logging after the loss). A forward nested in an if/loop that ends
  before the backward (same function): that whole statement is the first one wrapped. fp16
  with `scaler`: `scaler = torch.amp.GradScaler(...)` after the optimizer (or before the
  training loop), `scaler.scale(loss).backward()`, `scaler.step(opt)` and `scaler.update()`.
- framework_kwargs: the keyword arguments set in the `TrainingArguments(...)` / `Trainer(...)`
  call (an existing keyword's value replaced). Arguments the script parses from its command line
  (HfArgumentParser / TrlParser: `parser.parse_args_*()` where the run saw them built) get
  `parser.set_defaults(...)` before that call instead, so that the command line still rules;
  one the script's own arguments (`argv` in the value) already set is a remark naming the flag.

Arguments added to a one-line call that would outgrow the script's longest line go on a
continuation line under the first argument; strings are written in the script's own quotes.

An edit that cannot be placed safely is not made: `ScriptPatch.skipped` holds (change, reason)
with the reason in one line; `applied` the changes written. Each change is all or nothing.
`unified_diff` (autoopt.patching.editor) makes the diff. Imports nothing else of autoopt.
"""
from __future__ import annotations

import ast
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import libcst as cst
from libcst.metadata import MetadataWrapper, PositionProvider

from autoopt.patching.editor import PatchError, SourceEditor, _dotted, unified_diff
from autoopt.patching.script_cst import (
    SCOPES,
    Apply,
    CallAt,
    Collector,
    Plan,
    Stmt,
    assigned,
    bound_names,
    callee,
    code_of,
    is_autocast_with,
    is_backward,
    last_part,
    loss_of,
    names_in,
    param_owners,
    parse_stmt,
    quote_style,
    replace_assigned,
    replace_call_arg,
    scaled_backward,
    scaled_step,
    set_kwargs,
    wrap_new_args,
)

__all__ = ["ScriptPatch", "patch_script", "unified_diff", "CHANGE_ORDER"]

# the order changes are planned in and listed in `applied`
CHANGE_ORDER = ("amp", "channels_last", "compile", "optimizer_impl", "dataloader", "matmul_precision",
                "cudnn_benchmark", "num_threads", "framework_kwargs")

_OPTIMIZERS = {"SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Adadelta", "Adamax", "NAdam", "RAdam", "ASGD",
               "Rprop", "SparseAdam", "LBFGS", "Adafactor", "Muon"}
_LOADER_KWARGS = ("num_workers", "pin_memory", "persistent_workers", "prefetch_factor")
_DTYPES = {"bfloat16": "torch.bfloat16", "float16": "torch.float16"}
_SITE_WHAT = {"forward": "call of the model", "backward": "backward call", "step": "optimizer step",
              "optimizer": "optimizer construction", "framework": "framework call"}
_CONDITIONAL = (cst.If, cst.Try, cst.TryStar, cst.Match)


@dataclass
class ScriptPatch:
    """The patched script (`code`), the changes written (`applied`) and those not, each with
    its reason (`skipped`); `remarks`: what to know about a change written (e.g. the script's
    own switch that would do the same)."""

    code: str
    applied: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    remarks: list[tuple[str, str]] = field(default_factory=list)


class _Skip(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------------------- the patcher
class _Patcher:
    def __init__(self, source: str, sites: dict, changes: dict, filename: str):
        self.source = source
        self.sites = sites or {}
        self._changes = changes
        self.filename = filename
        self.wrapper = MetadataWrapper(cst.parse_module(source))
        self.module = self.wrapper.module
        col = Collector()
        self.wrapper.visit(col)
        self.positions = self.wrapper.resolve(PositionProvider)
        self.stmts, self.calls = col.stmts, col.calls
        self.used_names = names_in(self.module)
        self.quote = quote_style(self.module)
        self.source_lines = source.splitlines()
        self.width = max([79, *(len(ln) for ln in self.source_lines)])

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

    def stmt_at(self, line: int, what: str) -> Stmt:
        """The innermost statement holding this line."""
        best = None
        for st in self.stmts:
            if st.start <= line <= st.end and (best is None or st.end - st.start <= best.end - best.start):
                best = st
        if best is None:
            raise _Skip(f"line {line} of {self.filename} (the {what}) holds no statement")
        return best

    def call_at(self, line: int, pred: Callable[[cst.Call], bool], what: str) -> CallAt:
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
        found = [code_of(c.node.func) for c in self.calls if c.start <= line <= c.end]
        seen = f" (it calls {', '.join(f'{f}(...)' for f in found)})" if found else ""
        raise _Skip(f"line {line} of {self.filename} holds no {what} call that autoopt can edit{seen}")

    @staticmethod
    def in_block(st: Stmt) -> Stmt:
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

    def lift(self, st: Stmt, name: Optional[str]) -> Stmt:
        """The statement to insert after: the binding itself, or the `if`/`try`/`match` holding
        it when that binding ends its branch and which branch ran is not known here (`name` is
        bound in another branch too, or already before the statement), unless the statement
        holds a use of the model or optimizer."""
        st = self.in_block(st)
        keep = self.uses()
        while name is not None and st.parent is not None and isinstance(st.parent.node, _CONDITIONAL):
            top = self.in_block(st.parent)
            if any(top.start <= k <= top.end for k in keep) or st.index != len(st.block.body) - 1:
                break
            binds = [b.start for b in self._scope_bindings(name, st.scope, None)]
            branches = sum(1 for lo, hi in self._branches(top.node) if any(lo <= b <= hi for b in binds))
            if branches < 2 and not any(b < top.start for b in binds):
                break
            st = top
        return st

    def _branches(self, node: cst.CSTNode) -> list[tuple[int, int]]:
        """(first, last line) of each branch of an if/elif/else, try/except/else/finally or match."""
        blocks: list[cst.CSTNode] = []
        while isinstance(node, cst.If):
            blocks.append(node.body)
            node = node.orelse
        if isinstance(node, cst.Else):
            blocks.append(node.body)
        if isinstance(node, (cst.Try, cst.TryStar)):
            blocks += [node.body, *(h.body for h in node.handlers)]
            blocks += [x.body for x in (node.orelse, node.finalbody) if x is not None]
        if isinstance(node, cst.Match):
            blocks += [c.body for c in node.cases]
        out = []
        for b in blocks:
            pos = self.positions[b]
            out.append((pos.start.line, pos.end.line))
        return out

    # -- the model's binding ---------------------------------------------------------------
    def _scope_bindings(self, name: str, scope: Optional[Stmt], before: Optional[int]) -> list[Stmt]:
        return [st for st in self.stmts
                if isinstance(st.node, cst.SimpleStatementLine) and st.scope is scope
                and (before is None or st.start < before) and name in assigned(st.node)[0]]

    @staticmethod
    def _params(scope: Optional[Stmt]) -> set[str]:
        if scope is None or not isinstance(scope.node, cst.FunctionDef):
            return set()
        p = scope.node.params
        return {a.name.value for a in (*p.posonly_params, *p.params, *p.kwonly_params)}

    def binding(self, name: str, at: Stmt) -> Optional[Stmt]:
        """The last assignment to `name` before `at` in its scope; for a name a function only
        reads (neither its parameter nor assigned in it), the module's last one."""
        scope = at.scope
        found = self._scope_bindings(name, scope, at.start)
        if found:
            return found[-1]
        if scope is None or name in self._params(scope) or self._scope_bindings(name, scope, None):
            return None
        if any(name in bound_names(st.node) for st in self.stmts if st.scope is scope):
            return None
        module = self._scope_bindings(name, None, None)
        return module[-1] if module else None

    def model_binding(self) -> tuple[Stmt, str]:
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
            raise _Skip(f"autoopt could not tell which variable holds the model called at {at.where()} "
                        f"(`{self._key(at.node)}`); add the change where the model is built")
        raise _Skip(f"no assignment to {var} precedes the forward ({at.where()}) in its scope, nor one to the "
                    f"variable the optimizer takes .parameters() of; add the change where the model is built")

    def _given_binding(self, given: dict) -> tuple[Stmt, str]:
        line, var = int(given["line"]), given.get("var")
        st = self.stmt_at(line, "model's definition")
        names, attrs = assigned(st.node)
        if var and "." in var or (not var and attrs):
            shown = var or attrs[0]
            raise _Skip(f"the model is the attribute {shown} ({st.where()}); autoopt edits a plain variable "
                        f"only: add the change where {shown} is assigned")
        if not var or var not in names:
            raise _Skip(f"line {line} of {self.filename} does not assign the model's variable {var or '?'}")
        return self.lift(st, var), var

    def _binding_via_optimizer(self) -> Optional[tuple[Stmt, str]]:
        """The variable X whose parameters the optimizer is given (`X.parameters()`,
        `X.named_parameters()`, a method of X with "param" in its name, in its arguments or in
        the statement binding a variable passed to it) and X's last binding before the
        optimizer is built: the model is what the optimizer trains."""
        try:
            call = self.optimizer_call()
        except _Skip:
            return None
        if call.stmt is None:
            return None
        owners = param_owners(call.node)
        passed = set().union(*(names_in(a.value) for a in call.node.args)) if call.node.args else set()
        for name in sorted(passed):
            found = self.binding(name, call.stmt)
            if found is not None and isinstance(found.node, cst.SimpleStatementLine):
                owners |= param_owners(found.node)
        if len(owners) != 1:
            return None
        (name,) = owners
        found = self.binding(name, call.stmt)
        return None if found is None else (self.lift(found, name), name)

    def optimizer_call(self) -> CallAt:
        s = self.site("optimizer")
        line = int(s["line"])

        def is_opt(call: cst.Call) -> bool:
            return last_part(callee(call)) in _OPTIMIZERS

        try:
            return self.call_at(line, is_opt, "torch.optim optimizer")
        except _Skip:
            st = self.stmt_at(line, "optimizer construction")
            raise _Skip(f"the optimizer is built at {st.where()} by a call autoopt cannot see into "
                        f"(`{self._key(st.node)}`); set the flag in the optimizer's own construction") from None

    def _key(self, node: cst.CSTNode) -> str:
        if hasattr(node, "leading_lines"):
            node = node.with_changes(leading_lines=[])
        if isinstance(node, cst.SimpleStatementLine):  # without its trailing comment
            node = node.with_changes(trailing_whitespace=cst.TrailingWhitespace())
        text = self.module.code_for_node(node).strip()
        first = text.splitlines()[0] if text else ""
        return first if len(first) <= 80 else first[:77] + "..."

    # -- plans ------------------------------------------------------------------------------
    def plan_channels_last(self, _value) -> Plan:
        st, var = self.model_binding()
        line = parse_stmt(f"{var} = {var}.to(memory_format=torch.channels_last)\n")
        return Plan(after=[(st.block, st.index, [line])])

    def plan_compile(self, value: dict) -> Plan:
        st, var = self.model_binding()
        value = value or {}
        args = []
        if value.get("mode") not in (None, "default"):
            args.append(f"mode={self.lit(value['mode'])}")
        if value.get("backend") not in (None, "inductor"):
            args.append(f"backend={self.lit(value['backend'])}")
        line = parse_stmt(f"{var}.compile({', '.join(args)})\n")
        return Plan(after=[(st.block, st.index, [line])], needs_torch=False, remark=self._own_compile())

    def _own_compile(self) -> str:
        """The script's own torch.compile(...), which did not run (the run compiled the model
        itself): most often behind a switch (nanoGPT's `if compile:`)."""
        for c in self.calls:
            if callee(c.node) == "torch.compile" and c.stmt is not None:
                guard = next((st for st in list(c.stmt.chain())[1:] if isinstance(st.node, cst.If)), None)
                cond = (f" under `{self._key(guard.node).rstrip(':')}` (line {guard.start}), off in this run"
                        if guard is not None else ", which did not run in this run")
                return (f"the script has its own `{self._key(c.stmt.node)}` at line {c.stmt.start}{cond}; the "
                        f"diff compiles the model where it is built instead, and turning the script's own "
                        f"switch on would do the same")
        return ""

    def plan_optimizer_impl(self, impl: str) -> Plan:
        if impl not in ("fused", "foreach"):
            raise _Skip(f"unknown optimizer implementation {impl!r}")
        call = self.optimizer_call()
        self._no_splat(call, "optimizer")
        other = "foreach" if impl == "fused" else "fused"
        return Plan(calls=[(call.node, self.kwargs_edit(call, {impl: "True"}, remove={other}))], needs_torch=False)

    def kwargs_edit(self, call: CallAt, kwargs: dict[str, str], remove: Iterable[str] = ()) -> Callable:
        """Set (and drop) keyword arguments of a call; on a one-line call that would grow longer
        than the script's longest line, the added ones go on a continuation line under the
        first argument, as a person would wrap it."""
        base = set_kwargs(kwargs, remove)
        if call.start != call.end or call.stmt is None:
            return base
        text = self.source_lines[call.start - 1] if call.start <= len(self.source_lines) else ""
        paren = call.col + len(code_of(call.node.func)) + len(code_of(call.node.whitespace_after_func))
        hanging = paren + 1 - call.stmt.col

        def edit(node: cst.Call) -> cst.Call:
            new = base(node)
            if len(text) + len(code_of(new)) - len(code_of(node)) <= self.width:
                return new
            return wrap_new_args(node, new, hanging)
        return edit

    def _no_splat(self, call: CallAt, what: str) -> None:
        if any(a.star == "**" for a in call.node.args):
            raise _Skip(f"the {what} call at line {call.start} passes **kwargs, so its keyword arguments "
                        f"cannot be set safely")

    def plan_dataloader(self, settings: dict) -> Plan:
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
        plan = Plan(needs_torch=False)
        for s in sites if kwargs else []:
            self._same_file(s, "DataLoader construction")
            call = self.call_at(int(s["line"]), lambda c: last_part(callee(c)) == "DataLoader", "DataLoader(...)")
            self._no_splat(call, "DataLoader")
            if all(node is not call.node for node, _ in plan.calls):  # a loader built in a loop: one site a call
                plan.calls.append((call.node, self.kwargs_edit(call, kwargs, remove)))
        if threads and not self._changes.get("num_threads"):
            setting = self._setting("set_num_threads", repr(int(threads)))
            plan.lines, plan.top, plan.needs_torch = setting.lines, setting.top, True
        return plan

    def plan_framework_kwargs(self, value: dict) -> Plan:
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
        try:
            call = self.call_at(int(s["line"]), lambda c: last_part(callee(c)) == name, f"{name}(...)")
        except _Skip as exc:
            plan = self._parser_defaults(int(s["line"]), kwargs, list((value or {}).get("argv") or []))
            if plan is None:
                raise _Skip(exc.reason + _command_line_hint(s.get("kind"), kwargs)) from None
            return plan
        self._no_splat(call, name)
        return Plan(calls=[(call.node, self.kwargs_edit(call, {k: str(v) for k, v in kwargs.items()}))],
                    needs_torch=False)

    def _parser_defaults(self, line: int, kwargs: dict, argv: list[str]) -> Optional[Plan]:
        """`parser.set_defaults(k=v, ...)` before the `parser.parse_args_*(...)` call at `line`
        (HfArgumentParser's parse_args_into_dataclasses, TrlParser's parse_args_and_config):
        the arguments become the script's defaults and its command line still rules. Keys its
        command line (`argv`) sets are left to a remark. None: no such call there."""
        calls = [c for c in self.calls if c.start <= line <= c.end and c.stmt is not None
                 and isinstance(c.node.func, cst.Attribute) and isinstance(c.node.func.value, cst.Name)
                 and c.node.func.attr.value.startswith("parse_args")]
        if len(calls) != 1:
            return None
        given = [k for k in kwargs if any(a == f"--{k}" or a.startswith(f"--{k}=") for a in argv)]
        free = {k: v for k, v in kwargs.items() if k not in given}
        if not free:
            return None
        st = self.in_block(calls[0].stmt)
        parser = calls[0].node.func.value.value
        line_code = parse_stmt(f"{parser}.set_defaults({', '.join(f'{k}={v}' for k, v in free.items())})\n")
        remark = ""
        if given:
            flags = _flags({k: kwargs[k] for k in given})
            remark = (f"the script parses its arguments from the command line, and yours already set "
                      f"{', '.join('--' + k for k in given)}, which a default cannot change: "
                      + (f"pass {flags} instead" if flags else "set them there"))
        return Plan(before=[(st.block, st.index, [line_code])], needs_torch=False, remark=remark)

    # settings: in place of the script's own, else after the imports
    def _setting(self, func: str, arg: str) -> Plan:
        """`torch.<func>(arg)`: the script's own calls of it changed in place; after the imports
        unless one of those runs unconditionally (not under an if/try/loop of its function)."""
        plan = Plan()
        for st in self.stmts:
            if isinstance(st.node, cst.SimpleStatementLine) and any(
                    isinstance(small, cst.Expr) and isinstance(small.value, cst.Call)
                    and callee(small.value) == f"torch.{func}" for small in st.node.body):
                plan.lines.append((st.node, replace_call_arg(func, arg)))
        if not any(self._unconditional(st) for st in self._setting_stmts(plan)):
            plan.top = [f"torch.{func}({arg})\n"]
        return plan

    def _setting_stmts(self, plan: Plan) -> list[Stmt]:
        nodes = {id(node) for node, _ in plan.lines}
        return [st for st in self.stmts if id(st.node) in nodes]

    @staticmethod
    def _unconditional(st: Stmt) -> bool:
        """Runs whenever its function (or the module) runs: no if/try/match/loop around it."""
        for up in list(st.chain())[1:]:
            if isinstance(up.node, SCOPES):
                return True
            if isinstance(up.node, (*_CONDITIONAL, cst.For, cst.While)):
                return False
        return True

    def plan_matmul_precision(self, value: str) -> Plan:
        return self._setting("set_float32_matmul_precision", self.lit(str(value)))

    def plan_num_threads(self, value: int) -> Plan:
        return self._setting("set_num_threads", repr(int(value)))

    def plan_cudnn_benchmark(self, value: bool) -> Plan:
        target = "torch.backends.cudnn.benchmark"
        plan = Plan()
        for st in self.stmts:
            if isinstance(st.node, cst.SimpleStatementLine) and any(
                    isinstance(s, cst.Assign) and any(_dotted(t.target) == target for t in s.targets)
                    for s in st.node.body):
                plan.lines.append((st.node, replace_assigned(target, repr(bool(value)))))
        if not any(self._unconditional(st) for st in self._setting_stmts(plan)):
            plan.top = [f"{target} = {bool(value)!r}\n"]
        return plan

    # amp
    def plan_amp(self, amp: dict) -> Plan:
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
            own = isinstance(st.node, cst.With) and self._autocast_with(st.node)
            if own:
                made = "" if own is True else f"; it is assigned at line {own.start}: `{self._key(own.node)}`"
                raise _Skip(f"the forward ({fwd.where()}) already runs under the script's own autocast context "
                            f"(`{self._key(st.node).rstrip(':')}` at line {st.start}{made}); autoopt does not nest "
                            f"a second one: make that one torch.autocast(device_type={self.lit(device)}, "
                            f"dtype={dtype}) in this run's case instead")
        block, i, j = self._autocast_range(fwd, bwd)
        item = f"torch.autocast(device_type={self.lit(device)}, dtype={dtype})"
        plan = Plan(wraps=[(block, i, j, item)])
        if amp.get("scaler"):
            self._plan_scaler(plan, device, bwd)
        return plan

    def _autocast_with(self, node: cst.With) -> "bool | Stmt":
        """True for `with torch.autocast(...)` / `with autocast(...)`; for `with ctx:` where the
        script assigns ctx something that builds an autocast (`ctx = nullcontext() if ... else
        torch.autocast(...)`), that assignment; False otherwise."""
        if is_autocast_with(node):
            return True
        names = {i.item.value for i in node.items if isinstance(i.item, cst.Name)}
        for st in self.stmts:
            if isinstance(st.node, cst.SimpleStatementLine) and assigned(st.node)[0] & names and any(
                    isinstance(c.node.func, (cst.Name, cst.Attribute)) and last_part(callee(c.node)) == "autocast"
                    for c in self.calls if c.stmt is st):
                return st
        return False

    def _backward_call(self, bwd: Stmt) -> CallAt:
        line = int(self.sites["backward"]["line"])
        return self.call_at(line, is_backward, "`.backward()`")

    def _autocast_range(self, fwd: Stmt, bwd: Stmt) -> tuple[cst.CSTNode, int, int]:
        """(block, first, last index) of the statements to run under autocast: from the one
        holding the forward through the last one assigning a name the backward's loss uses."""
        if fwd.scope is not bwd.scope:
            raise _Skip(f"the forward ({fwd.where()}) and the backward ({bwd.where()}) are in different "
                        f"functions; put the code that computes the loss under torch.autocast by hand")
        loops = [b for b in list(bwd.chain())[1:] if b.scope is bwd.scope and isinstance(b.node, (cst.For, cst.While))]
        loop = loops[0] if loops else None
        if loop is not None and not loop.start <= fwd.start <= loop.end:
            raise _Skip(f"the model call recorded ({fwd.where()}) runs outside the loop (line {loop.start}) that "
                        f"holds the backward ({bwd.where()}); put the training forward under torch.autocast by hand")
        cur = self.in_block(fwd)
        while True:
            sibling = next((b for b in bwd.chain() if b.block is not None and b.block is cur.block), None)
            if sibling is not None:
                break
            parent = cur.parent
            if parent is None or isinstance(parent.node, SCOPES):
                raise _Skip(f"the forward ({fwd.where()}) and the backward ({bwd.where()}) are in different blocks")
            cur = self.in_block(parent)
        if sibling is cur and cur is self.in_block(fwd):
            raise _Skip(f"the forward ({fwd.where()}) and the backward ({bwd.where()}) share one statement; "
                        f"autocast needs the forward and the loss in statements of their own")
        if sibling is cur or sibling.index < cur.index:
            raise _Skip(f"the forward ({fwd.where()}) and the backward ({bwd.where()}) are in different blocks")
        loss_names = names_in(loss_of(self._backward_call(bwd).node))
        body = cur.block.body
        last = sibling.index - 1
        binders = [k for k in range(cur.index, sibling.index) if bound_names(body[k]) & loss_names]
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

    def _plan_scaler(self, plan: Plan, device: str, bwd: Stmt) -> None:
        call = self._backward_call(bwd)
        loss = loss_of(call.node)
        if isinstance(loss, cst.Call) and last_part(callee(loss)) == "scale":
            return  # the script scales its loss with its own GradScaler already
        if loss is not call.node.func.value:
            raise _Skip(f"the loss is backpropagated with {callee(call.node)}(...) ({bwd.where()}); the fp16 "
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
        create = parse_stmt(f"{name} = torch.amp.GradScaler({self.lit(device)})\n")
        (plan.after if where == "after" else plan.before).append((block, idx, [create]))
        plan.calls.append((call.node, scaled_backward(name)))
        plan.calls.append((step.node, scaled_step(name)))
        plan.after.append((line.block, line.index, [parse_stmt(f"{name}.update()\n")]))

    def _scaler_home(self, bwd: Stmt, step: Stmt, name: str) -> tuple[cst.CSTNode, int, str]:
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
    def plan(self, key: str, value) -> Plan:
        return getattr(self, f"plan_{key}")(value)

    def render(self, plans: list[Plan]) -> str:
        module = self.module.visit(Apply(plans))
        code = module.code
        top = [s for p in plans for s in p.top]
        if not any(p.needs_torch for p in plans):
            return code
        editor = SourceEditor(code, self.filename)
        editor.ensure_import("torch")
        if top:
            editor.add_statements("".join(top), comment="autoopt: process-wide settings of the kept configuration")
        return editor.code


def _command_line_hint(kind: Optional[str], kwargs: dict) -> str:
    """For TrainingArguments parsed from the command line (HfArgumentParser): the flags that
    set these arguments, when every value is a plain literal."""
    flags = _flags(kwargs) if kind == "transformers" else ""
    return f"; if the script reads TrainingArguments from its command line, pass {flags}" if flags else ""


def _flags(kwargs: dict) -> str:
    """`--key value ...` for keyword arguments whose values are plain literals ("" otherwise)."""
    flags = []
    for k, expr in kwargs.items():
        try:
            value = ast.literal_eval(str(expr))
        except (ValueError, SyntaxError):
            return ""
        if not isinstance(value, (bool, int, float, str)):
            return ""
        flags.append(f"--{k} {value}")
    return " ".join(flags)


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
    that cannot be placed safely is left out, with its reason, and the others still apply.
    `filename`: the script's name as the reasons show it."""
    todo = _requested(changes or {})
    try:
        patcher = _Patcher(source, sites, dict(changes or {}), filename)
    except cst.ParserSyntaxError as exc:
        reason = f"{filename} cannot be parsed for patching: {exc.message} (line {exc.raw_line})"
        return ScriptPatch(source, [], [(k, reason) for k, _ in todo])
    plans: dict[str, Plan] = {}
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
    for key in sorted(set(changes or {}) - set(CHANGE_ORDER)):
        if (changes or {})[key] not in (None, False, {}, []):
            skipped.append((key, f"autoopt does not know how to write {key} into a script"))
    order = {k: i for i, k in enumerate(CHANGE_ORDER)}
    skipped.sort(key=lambda kv: order.get(kv[0], len(order)))
    remarks = [(k, plans[k].remark) for k, _ in todo if k in plans and plans[k].remark]
    return ScriptPatch(code, [k for k, _ in todo if k in plans], skipped, remarks)
