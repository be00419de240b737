"""The LibCST pieces of the script patcher (autoopt.patching.script_editor): an index of a
script's statements and calls with their lines (`Collector`), what statements bind, and the
one-pass editor (`Apply`) that makes every planned edit (`Plan`) on the original tree, nodes
matched by identity so that the lines the run recorded stay valid. Imports nothing else of
autoopt."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import libcst as cst
from libcst.metadata import PositionProvider

from autoopt.patching.editor import _CallKwargs, _dotted

SCOPES = (cst.FunctionDef, cst.ClassDef)


# ---------------------------------------------------------------------------- the script's index
@dataclass(eq=False)
class Stmt:
    node: cst.BaseStatement
    block: Optional[cst.CSTNode]  # the Module / IndentedBlock whose body holds it (None: an elif)
    index: Optional[int]
    parent: Optional["Stmt"]
    start: int
    end: int
    col: int = 0  # its indentation

    def chain(self) -> Iterable["Stmt"]:
        """This statement and its enclosing ones, innermost first."""
        st = self
        while st is not None:
            yield st
            st = st.parent

    @property
    def scope(self) -> Optional["Stmt"]:
        """The def/class this statement runs in (None: the module)."""
        for st in list(self.chain())[1:]:
            if isinstance(st.node, SCOPES):
                return st
        return None

    def where(self) -> str:
        scope = self.scope
        if scope is None:
            return f"line {self.start}"
        return f"line {self.start}, in {scope.node.name.value}()"


@dataclass(eq=False)
class CallAt:
    node: cst.Call
    start: int
    end: int
    stmt: Optional[Stmt]
    col: int = 0  # of the call's first character


class Collector(cst.CSTVisitor):
    """Every statement (with its block, index and enclosing statement) and call, with lines."""

    METADATA_DEPENDENCIES = (PositionProvider,)

    def __init__(self):
        super().__init__()
        self.stmts: list[Stmt] = []
        self.calls: list[CallAt] = []
        self._stack: list[Stmt] = []
        self._slot: dict[int, tuple[cst.CSTNode, int]] = {}

    def on_visit(self, node: cst.CSTNode) -> bool:
        if isinstance(node, (cst.Module, cst.IndentedBlock)):
            for i, s in enumerate(node.body):
                self._slot[id(s)] = (node, i)
        elif isinstance(node, cst.BaseStatement):
            pos = self.get_metadata(PositionProvider, node)
            block, idx = self._slot.get(id(node), (None, None))
            st = Stmt(node, block, idx, self._stack[-1] if self._stack else None, pos.start.line, pos.end.line,
                      pos.start.column)
            self.stmts.append(st)
            self._stack.append(st)
        elif isinstance(node, cst.Call):
            pos = self.get_metadata(PositionProvider, node)
            self.calls.append(CallAt(node, pos.start.line, pos.end.line, self._stack[-1] if self._stack else None,
                                     pos.start.column))
        return True

    def on_leave(self, original_node: cst.CSTNode) -> None:
        if isinstance(original_node, cst.BaseStatement):
            self._stack.pop()


def target_names(target: cst.BaseExpression) -> set[str]:
    if isinstance(target, cst.Name):
        return {target.value}
    if isinstance(target, (cst.Tuple, cst.List)):
        out: set[str] = set()
        for el in target.elements:
            out |= target_names(el.value)
        return out
    if isinstance(target, cst.StarredElement):
        return target_names(target.value)
    return set()


class Binder(cst.CSTVisitor):
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
            self.names |= target_names(t.target)

    def visit_AnnAssign(self, node) -> None:
        if node.value is not None:
            self.names |= target_names(node.target)

    def visit_AugAssign(self, node) -> None:
        self.names |= target_names(node.target)

    def visit_NamedExpr(self, node) -> None:
        self.names |= target_names(node.target)

    def visit_For(self, node) -> None:
        self.names |= target_names(node.target)

    def visit_AsName(self, node) -> None:
        self.names |= target_names(node.name)


def bound_names(node: cst.CSTNode) -> set[str]:
    v = Binder()
    node.visit(v)
    return v.names


def assigned(stmt: cst.BaseStatement) -> tuple[set[str], list[str]]:
    """(names, attribute targets such as self.model) a simple statement line assigns."""
    names: set[str] = set()
    attrs: list[str] = []
    if not isinstance(stmt, cst.SimpleStatementLine):
        return names, attrs
    for s in stmt.body:
        targets = [t.target for t in s.targets] if isinstance(s, cst.Assign) else (
            [s.target] if isinstance(s, cst.AnnAssign) and s.value is not None else [])
        for t in targets:
            names |= target_names(t)
            if isinstance(t, cst.Attribute) and _dotted(t):
                attrs.append(_dotted(t))
    return names, attrs


class Names(cst.CSTVisitor):
    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def visit_Name(self, node) -> None:
        self.names.add(node.value)


def names_in(node: cst.CSTNode) -> set[str]:
    v = Names()
    node.visit(v)
    return v.names


def callee(call: cst.Call) -> Optional[str]:
    return _dotted(call.func)


def last_part(name: Optional[str]) -> Optional[str]:
    return None if name is None else name.rsplit(".", 1)[-1]


def is_autocast_with(node: cst.CSTNode) -> bool:
    return isinstance(node, cst.With) and any(
        isinstance(i.item, cst.Call) and last_part(callee(i.item)) == "autocast" for i in node.items)


def parse_stmt(code: str) -> cst.BaseStatement:
    return cst.parse_statement(code)


def code_of(node: cst.CSTNode) -> str:
    return cst.Module(body=[]).code_for_node(node)


# ---------------------------------------------------------------------------- edits
@dataclass
class Plan:
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
    remark: str = ""  # what the user should know about this edit (the script's own switch for it)


class Apply(cst.CSTTransformer):
    """All plans' edits in one pass over the original tree (nodes matched by identity, so the
    lines the sites name stay valid)."""

    def __init__(self, plans: list[Plan]):
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
                out.append(with_block(item, inner))
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


def with_block(item: str, stmts: list) -> cst.With:
    first = stmts[0]
    inner = [first.with_changes(leading_lines=[]), *stmts[1:]]
    return cst.With(items=[cst.WithItem(item=cst.parse_expression(item))], body=cst.IndentedBlock(body=inner),
                    leading_lines=first.leading_lines)


def set_kwargs(kwargs: dict[str, str], remove: Iterable[str] = ()) -> Callable[[cst.Call], cst.Call]:
    def edit(call: cst.Call) -> cst.Call:
        name = last_part(callee(call)) or ""
        return _CallKwargs({name}, kwargs, set(remove)).leave_Call(call, call)
    return edit


def wrap_new_args(old: cst.Call, new: cst.Call, hanging: int) -> cst.Call:
    """`new` (old with keyword arguments added) with the added ones on a continuation line
    `hanging` columns in from the statement's indentation (aligned with the open paren)."""
    had = {a.keyword.value for a in old.args if a.keyword is not None}
    first = next((i for i, a in enumerate(new.args) if a.keyword is not None and a.keyword.value not in had), 0)
    if first == 0:
        return new
    brk = cst.Comma(whitespace_after=cst.ParenthesizedWhitespace(
        first_line=cst.TrailingWhitespace(), empty_lines=[], indent=True,
        last_line=cst.SimpleWhitespace(" " * hanging)))
    args = list(new.args)
    args[first - 1] = args[first - 1].with_changes(comma=brk)
    return new.with_changes(args=args)


class _ParamOwners(cst.CSTVisitor):
    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def visit_Call(self, node: cst.Call) -> None:
        f = node.func
        if isinstance(f, cst.Attribute) and "param" in f.attr.value and isinstance(f.value, cst.Name):
            self.names.add(f.value.value)


def param_owners(node: cst.CSTNode) -> set[str]:
    """Names X of the `X.parameters()` / `X.named_parameters()` / `X.<...param...>(...)` calls in
    a node: whose parameters it hands on."""
    v = _ParamOwners()
    node.visit(v)
    return v.names


def is_backward(call: cst.Call) -> bool:
    func = call.func
    return (isinstance(func, cst.Attribute) and func.attr.value == "backward") or (
        isinstance(func, cst.Name) and func.value == "backward")


def loss_of(call: cst.Call) -> cst.CSTNode:
    """The loss a backward call backpropagates: `loss` of `loss.backward()` or of
    `torch.autograd.backward(loss)`."""
    name = callee(call) or ""
    if name == "backward" or name.endswith("autograd.backward"):
        return call.args[0].value if call.args else call
    return call.func.value


def scaled_backward(scaler: str):
    """`loss.backward(...)` -> `scaler.scale(loss).backward(...)`."""
    def edit(call: cst.Call) -> cst.Call:
        scaled = cst.Call(func=cst.parse_expression(f"{scaler}.scale"), args=[cst.Arg(call.func.value)])
        return call.with_changes(func=call.func.with_changes(value=scaled))
    return edit


def scaled_step(scaler: str):
    """`opt.step(...)` -> `scaler.step(opt, ...)`."""
    def edit(call: cst.Call) -> cst.Call:
        comma = cst.Comma(whitespace_after=cst.SimpleWhitespace(" ")) if call.args else cst.MaybeSentinel.DEFAULT
        first = cst.Arg(call.func.value, comma=comma)
        return call.with_changes(func=cst.parse_expression(f"{scaler}.step"), args=[first, *call.args])
    return edit


class Quotes(cst.CSTVisitor):
    def __init__(self):
        super().__init__()
        self.double = self.single = 0

    def visit_SimpleString(self, node) -> None:
        body = node.value.lstrip("rbuRBUfF")
        if body.startswith('"'):
            self.double += 1
        elif body.startswith("'"):
            self.single += 1


def quote_style(module: cst.Module) -> str:
    v = Quotes()
    module.visit(v)
    return "'" if v.single > v.double else '"'


def replace_call_arg(func: str, arg: str):
    def edit(line: cst.SimpleStatementLine) -> cst.SimpleStatementLine:
        body = []
        for s in line.body:
            if isinstance(s, cst.Expr) and isinstance(s.value, cst.Call) and callee(s.value) == f"torch.{func}":
                s = s.with_changes(value=s.value.with_changes(args=[cst.Arg(cst.parse_expression(arg))]))
            body.append(s)
        return line.with_changes(body=body)
    return edit


def replace_assigned(target: str, value: str):
    def edit(line: cst.SimpleStatementLine) -> cst.SimpleStatementLine:
        body = []
        for s in line.body:
            if isinstance(s, cst.Assign) and any(_dotted(t.target) == target for t in s.targets):
                s = s.with_changes(value=cst.parse_expression(value))
            body.append(s)
        return line.with_changes(body=body)
    return edit
