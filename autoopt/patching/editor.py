"""Source patches for the user's model file: `patch.diff` that, applied, makes the file
itself run the optimized configuration in plain PyTorch.

A small LibCST editor (`SourceEditor`) offers the edits the transforms need, each keeping
the user's formatting and comments everywhere it does not touch:

- `ensure_import("torch")`
- `wrap_return("build_model", "torch.compile({}, mode='default')")` and
  `update_return_call("build_model", "torch.compile", {"mode": "'reduce-overhead'"})`
- `wrap_body("forward", "torch.autocast('cuda', dtype=torch.bfloat16)")` (a missing
  `forward` is first added with the contract's default semantics, see `ensure_forward`)
- `prepend("forward", "batch = f(batch)")`
- `set_constant("BATCH_SIZE", "64")`
- `add_statements("torch.backends.cudnn.benchmark = True")` (module level, after imports)
- `add_call_kwargs("build_optimizer", {"SGD"}, {"fused": "True"}, remove={"foreach"})`
- `add_function(source)` (a module-level helper such as the checkpointing helper)

`editor.code` is the edited source; `unified_diff(original, new, filename)` the diff
(a/ and b/ paths, so `patch -p1` applies it next to the file).

A transform that cannot express itself in the file raises `PatchError(reason)`;
autoopt.transforms.patch.build_patch records that as a value and goes on with the rest,
as LibCST codemods do. This module imports nothing else of autoopt.
"""
from __future__ import annotations

import difflib
from typing import Iterable, Optional

import libcst as cst

_PLACEHOLDER = "__autoopt_expr__"


class PatchError(Exception):
    """A transform cannot be written into the model file; the message says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _dotted(node: cst.CSTNode) -> Optional[str]:
    if isinstance(node, cst.Name):
        return node.value
    if isinstance(node, cst.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr.value}"
    return None


def _is_docstring(stmt: cst.CSTNode) -> bool:
    return (
        isinstance(stmt, cst.SimpleStatementLine)
        and len(stmt.body) == 1
        and isinstance(stmt.body[0], cst.Expr)
        and isinstance(stmt.body[0].value, (cst.SimpleString, cst.ConcatenatedString))
    )


def _is_import(stmt: cst.CSTNode) -> bool:
    return isinstance(stmt, cst.SimpleStatementLine) and any(
        isinstance(s, (cst.Import, cst.ImportFrom)) for s in stmt.body
    )


def _is_future_import(stmt: cst.CSTNode) -> bool:
    if not isinstance(stmt, cst.SimpleStatementLine):
        return False
    return any(
        isinstance(s, cst.ImportFrom) and s.module is not None and _dotted(s.module) == "__future__"
        for s in stmt.body
    )


def _atom_like(expr: cst.BaseExpression) -> bool:
    return bool(expr.lpar) or isinstance(
        expr, (cst.Name, cst.Attribute, cst.Call, cst.Subscript, cst.SimpleString, cst.Integer, cst.Float)
    )


def _comment_lines(comment: Optional[str]) -> list[cst.EmptyLine]:
    if not comment:
        return []
    return [cst.EmptyLine(), cst.EmptyLine(comment=cst.Comment(f"# {comment}"))]


def _with_leading(stmt: cst.CSTNode, comment: Optional[str]):
    if comment and hasattr(stmt, "leading_lines"):
        return stmt.with_changes(leading_lines=[*stmt.leading_lines, *_comment_lines(comment)])
    return stmt


class _ReturnRewriter(cst.CSTTransformer):
    """Rewrites `return X` in one function body (not in nested functions, lambdas or
    classes) with fn(X) -> new expression, or None to leave it."""

    def __init__(self, fn):
        self.fn = fn
        self.depth = 0
        self.count = 0

    def visit_FunctionDef(self, node):
        self.depth += 1
        return self.depth == 1

    def leave_FunctionDef(self, original, updated):
        self.depth -= 1
        return updated

    def visit_ClassDef(self, node):
        return False

    def visit_Lambda(self, node):
        return False

    def leave_Return(self, original, updated):
        if updated.value is None:
            return updated
        new = self.fn(updated.value)
        if new is None:
            return updated
        self.count += 1
        return updated.with_changes(value=new)


class _Substitute(cst.CSTTransformer):
    def __init__(self, expr):
        self.expr = expr

    def leave_Name(self, original, updated):
        if updated.value == _PLACEHOLDER:
            return self.expr
        return updated


class _CallKwargs(cst.CSTTransformer):
    def __init__(self, callees: set[str], kwargs: dict[str, str], remove: set[str]):
        self.callees = callees
        self.kwargs = kwargs
        self.remove = remove
        self.depth = 0
        self.count = 0
        self.splat = False

    def visit_FunctionDef(self, node):
        self.depth += 1
        return self.depth == 1

    def leave_FunctionDef(self, original, updated):
        self.depth -= 1
        return updated

    def leave_Call(self, original, updated):
        name = _dotted(updated.func)
        if name is None or not (name in self.callees or name.rsplit(".", 1)[-1] in self.callees):
            return updated
        if any(a.star == "**" for a in updated.args):
            self.splat = True
            return updated
        self.count += 1
        args = [a for a in updated.args if not (a.keyword and a.keyword.value in self.remove)]
        if args and updated.args and args[-1] is not updated.args[-1]:
            # the last argument was removed: the new last one ends the call like it did
            args[-1] = args[-1].with_changes(comma=updated.args[-1].comma)
        pending = dict(self.kwargs)
        out = []
        for a in args:
            if a.keyword is not None and a.keyword.value in pending:
                a = a.with_changes(value=cst.parse_expression(pending.pop(a.keyword.value)))
            out.append(a)
        new_args = [
            cst.Arg(
                keyword=cst.Name(key),
                value=cst.parse_expression(code),
                equal=cst.AssignEqual(
                    whitespace_before=cst.SimpleWhitespace(""), whitespace_after=cst.SimpleWhitespace("")
                ),
            )
            for key, code in pending.items()
        ]
        trailing = out[-1].comma if out else cst.MaybeSentinel.DEFAULT
        if new_args and isinstance(trailing, cst.Comma):
            # one argument per line with a trailing comma: separate like the existing
            # arguments, and keep the trailing comma (and the closing paren's line) last
            if len(out) >= 2 and isinstance(out[-2].comma, cst.Comma):
                sep = out[-2].comma
            else:
                sep = cst.Comma(whitespace_after=updated.whitespace_before_args)
            out[-1] = out[-1].with_changes(comma=sep)
            new_args = [a.with_changes(comma=sep) for a in new_args[:-1]] + [new_args[-1].with_changes(comma=trailing)]
        out.extend(new_args)  # otherwise LibCST writes ", " between arguments
        return updated.with_changes(args=out)


_DEFAULT_FORWARD = '''
def forward(model, batch):
    """One forward pass (autoopt's default: model(**batch) / model(*batch) / model(batch))."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)
'''


# how autoopt calls each contract function: the parameters of a delegating wrapper
_CONTRACT_PARAMS = {"build_model": "", "make_batch": "batch_size", "forward": "model, batch",
                    "build_optimizer": "model", "build_dataloader": "batch_size"}


def _binds(stmt: cst.CSTNode, name: str) -> bool:
    """A module-level statement that binds `name` otherwise than by `def`: an import
    (`from lib import forward`, `import x as forward`) or an assignment."""
    if not isinstance(stmt, cst.SimpleStatementLine):
        return False
    for s in stmt.body:
        if isinstance(s, (cst.Import, cst.ImportFrom)) and not isinstance(s.names, cst.ImportStar):
            for alias in s.names:
                bound = alias.asname.name if alias.asname else alias.name
                if _dotted(bound) == name:
                    return True
        targets = [t.target for t in s.targets] if isinstance(s, cst.Assign) else (
            [s.target] if isinstance(s, cst.AnnAssign) and s.value is not None else [])
        if any(isinstance(t, cst.Name) and t.value == name for t in targets):
            return True
    return False


class SourceEditor:
    """Edits one Python source file with LibCST; `code` is the result.

    A contract function the file imports (`from lib import forward`) or assigns is kept: an
    edit to it turns it into a local `def` that delegates to the imported one
    (`_autoopt_user_forward`), never into autoopt's default."""

    def __init__(self, source: str, filename: str = "model.py"):
        self.filename = filename
        self.original = source
        try:
            self.module = cst.parse_module(source)
        except cst.ParserSyntaxError as exc:
            raise PatchError(f"{filename} cannot be parsed for patching: {exc.message}") from exc
        self._added_after_imports: list[str] = []
        self._added_functions: list[str] = []

    # -- reading -----------------------------------------------------------------
    @property
    def code(self) -> str:
        return self.module.code

    def _function_index(self, name: str) -> Optional[int]:
        for i, stmt in enumerate(self.module.body):
            if isinstance(stmt, cst.FunctionDef) and stmt.name.value == name:
                return i
        return None

    def has_function(self, name: str) -> bool:
        return self._function_index(name) is not None

    def _binding_index(self, name: str) -> Optional[int]:
        """Index of the last module-level import or assignment that binds `name`."""
        found = None
        for i, stmt in enumerate(self.module.body):
            if _binds(stmt, name):
                found = i
        return found

    def provides(self, name: str) -> bool:
        """The file defines, imports or assigns `name` at module level."""
        return self.has_function(name) or self._binding_index(name) is not None

    def function_params(self, name: str) -> list[str]:
        """Positional parameter names of a top-level function."""
        fn = self._function(name)[1]
        return [p.name.value for p in (*fn.params.posonly_params, *fn.params.params)]

    def get_constant(self, name: str) -> Optional[str]:
        idx = self._constant_index(name)
        if idx is None:
            return None
        stmt = self.module.body[idx].body[0]
        return self.module.code_for_node(stmt.value)

    # -- helpers -------------------------------------------------------------------
    def _key(self, node: cst.CSTNode) -> str:
        """A statement's code without its leading comments and blank lines."""
        if hasattr(node, "leading_lines"):
            node = node.with_changes(leading_lines=[])
        return self.module.code_for_node(node).strip()

    def _replace(self, idx: int, node: cst.CSTNode) -> None:
        body = list(self.module.body)
        body[idx] = node
        self.module = self.module.with_changes(body=body)

    def _insert(self, idx: int, nodes: Iterable[cst.CSTNode]) -> None:
        body = list(self.module.body)
        body[idx:idx] = list(nodes)
        self.module = self.module.with_changes(body=body)

    def _function(self, name: str) -> tuple[int, cst.FunctionDef]:
        """The top-level def of `name`; an imported or assigned contract function gets a local
        def that delegates to it first (_delegate)."""
        idx = self._function_index(name)
        if idx is None and name in _CONTRACT_PARAMS and self._binding_index(name) is not None:
            self._delegate(name)
            idx = self._function_index(name)
        if idx is None:
            raise PatchError(f"{self.filename} has no top-level function {name}()")
        return idx, self.module.body[idx]

    def _delegate(self, name: str) -> None:
        """Right after the statement that imports (or assigns) contract function `name`: keep
        it as `_autoopt_user_<name>` and define `name` as a function calling it, so edits have
        a body to change and the user's own function still does the work."""
        params = _CONTRACT_PARAMS[name]
        kept = f"_autoopt_user_{name}"
        code = (f"{kept} = {name}\n\n\n"
                f"def {name}({params}):\n"
                f'    """autoopt: {name} from the import above, with the changes below."""\n'
                f"    return {kept}({params})\n")
        new = list(cst.parse_module(code).body)
        new[0] = new[0].with_changes(leading_lines=[cst.EmptyLine(), cst.EmptyLine()])
        at = max(self._binding_index(name) + 1, self._after_imports())
        self._insert(at, new)
        after = at + len(new)
        if after < len(self.module.body):  # two blank lines between the def and what follows
            nxt = self.module.body[after]
            lead = list(getattr(nxt, "leading_lines", []))
            blank = next((i for i, line in enumerate(lead) if line.comment is not None), len(lead))
            if blank < 2:
                self._replace(after, nxt.with_changes(leading_lines=[cst.EmptyLine()] * (2 - blank) + lead))

    def _header_end(self) -> int:
        """Index after the module docstring and `from __future__` imports."""
        i = 0
        body = self.module.body
        if body and _is_docstring(body[0]):
            i = 1
        while i < len(body) and _is_future_import(body[i]):
            i += 1
        return i

    def _after_imports(self) -> int:
        """Index after the last import that precedes the first def/class, and after the
        statements this editor already added there."""
        body = self.module.body
        end = self._header_end()
        for i, stmt in enumerate(body):
            if isinstance(stmt, (cst.FunctionDef, cst.ClassDef)):
                break
            if _is_import(stmt):
                end = i + 1
        while end < len(body) and self._key(body[end]) in self._added_after_imports:
            end += 1
        return end

    def _first_def(self) -> int:
        """Index of the first def/class (before the `_autoopt_user_X = X` line of a delegating def)."""
        body = self.module.body
        for i, stmt in enumerate(body):
            if isinstance(stmt, (cst.FunctionDef, cst.ClassDef)) or (
                isinstance(stmt, cst.If) and "__main__" in self.module.code_for_node(stmt.test)
            ):
                while i > 0 and self._key(body[i - 1]).startswith("_autoopt_user_"):
                    i -= 1
                return i
        return len(body)

    def _constant_index(self, name: str) -> Optional[int]:
        for i, stmt in enumerate(self.module.body):
            if isinstance(stmt, cst.SimpleStatementLine) and len(stmt.body) == 1:
                s = stmt.body[0]
                if isinstance(s, cst.Assign) and len(s.targets) == 1 and isinstance(s.targets[0].target, cst.Name):
                    if s.targets[0].target.value == name:
                        return i
                if isinstance(s, cst.AnnAssign) and isinstance(s.target, cst.Name) and s.target.value == name:
                    if s.value is not None:
                        return i
        return None

    @staticmethod
    def _body_split(fn: cst.FunctionDef) -> tuple[list, list]:
        """(docstring statements, the rest) of a function body."""
        if isinstance(fn.body, cst.SimpleStatementSuite):
            stmts = [cst.SimpleStatementLine(body=[s]) for s in fn.body.body]
        else:
            stmts = list(fn.body.body)
        if stmts and _is_docstring(stmts[0]):
            return stmts[:1], stmts[1:]
        return [], stmts

    # -- edits -----------------------------------------------------------------------
    def ensure_import(self, module: str, name: Optional[str] = None) -> None:
        """`import module` (or `from module import name`) at the top, unless present."""
        for stmt in self.module.body:
            if not isinstance(stmt, cst.SimpleStatementLine):
                continue
            for s in stmt.body:
                if name is None and isinstance(s, cst.Import):
                    for alias in s.names:
                        if _dotted(alias.name) == module and alias.asname is None:
                            return
                if name is not None and isinstance(s, cst.ImportFrom) and s.module is not None:
                    if _dotted(s.module) == module and not isinstance(s.names, cst.ImportStar):
                        if any(_dotted(a.name) == name and a.asname is None for a in s.names):
                            return
        code = f"import {module}\n" if name is None else f"from {module} import {name}\n"
        stmt = cst.parse_statement(code)
        body = self.module.body
        idx = self._header_end()
        for i, s in enumerate(body):
            if isinstance(s, (cst.FunctionDef, cst.ClassDef)):
                break
            if _is_import(s):
                idx = i + 1
        self._insert(idx, [stmt])

    def add_statements(self, code: str, comment: Optional[str] = None) -> None:
        """Module-level statements right after the imports; a statement already present
        (same text) is not added twice."""
        module = cst.parse_module(code)
        existing = {self._key(s) for s in self.module.body}
        new = [s for s in module.body if self._key(s) not in existing]
        if not new:
            return
        new[0] = _with_leading(new[0], comment)
        idx = self._after_imports()
        self._insert(idx, new)
        self._added_after_imports.extend(self._key(s) for s in new)

    def set_constant(self, name: str, value_code: str, comment: Optional[str] = None) -> None:
        """`NAME = value` at module level: replace an existing assignment's value, or add
        one after the imports."""
        value = cst.parse_expression(value_code)
        idx = self._constant_index(name)
        if idx is not None:
            line = self.module.body[idx]
            s = line.body[0]
            self._replace(idx, _with_leading(line.with_changes(body=[s.with_changes(value=value)]), comment))
            return
        self.add_statements(f"{name} = {value_code}\n", comment)

    def add_function(self, source: str, *, after: Optional[str] = None) -> None:
        """Module-level function(s) from source, before the first def/class (or after the
        function `after` when given); a function whose name exists is not added again."""
        module = cst.parse_module(source)
        new = [
            f for f in module.body
            if not (isinstance(f, cst.FunctionDef) and self.has_function(f.name.value))
        ]
        if not new:
            return
        blank = [cst.EmptyLine(), cst.EmptyLine()]
        new = [n.with_changes(leading_lines=blank) if hasattr(n, "leading_lines") else n for n in new]
        if after is not None and self.has_function(after):
            idx = self._function_index(after) + 1
        elif after is not None:
            idx = self._first_def_after_functions()
        else:
            idx = self._first_def()
            ours = [self._function_index(n) for n in self._added_functions if self.has_function(n)]
            if ours:
                idx = max(ours) + 1
        self._insert(idx, new)
        self._added_functions.extend(f.name.value for f in new if isinstance(f, cst.FunctionDef))

    def _first_def_after_functions(self) -> int:
        """Index after the last top-level def/class and before a `__main__` block."""
        idx = len(self.module.body)
        for i, stmt in enumerate(self.module.body):
            if isinstance(stmt, cst.If) and "__main__" in self.module.code_for_node(stmt.test):
                return i
        return idx

    def ensure_forward(self) -> None:
        """Add `forward(model, batch)` with the contract's default semantics
        (autoopt.workload.contract.call_forward) when the file has none, after make_batch."""
        if not self.provides("forward"):
            self.add_function(_DEFAULT_FORWARD, after="make_batch")

    def forward_params(self) -> tuple[str, str]:
        """The names of forward's (model, batch) parameters, adding the default forward
        when the file has none."""
        self.ensure_forward()
        params = self.function_params("forward")
        if len(params) < 2:
            raise PatchError(
                f"forward() in {self.filename} does not take (model, batch) positional parameters"
            )
        return params[0], params[1]

    def wrap_return(self, func: str, template: str) -> None:
        """Replace every `return X` of a top-level function with template.format(X),
        e.g. "torch.compile({}, mode='default')" or "{}.to(memory_format=torch.channels_last)"."""
        idx, fn = self._function(func)
        tmpl = cst.parse_expression(template.format(_PLACEHOLDER))

        def wrap(expr):
            if not _atom_like(expr):
                expr = expr.with_changes(lpar=[cst.LeftParen()], rpar=[cst.RightParen()])
            return tmpl.visit(_Substitute(expr))

        rw = _ReturnRewriter(wrap)
        new = fn.visit(rw)
        if rw.count == 0:
            raise PatchError(f"{func}() in {self.filename} has no `return <value>` to wrap")
        self._replace(idx, new)

    def update_return_call(self, func: str, callee: str, kwargs: dict[str, str]) -> bool:
        """When every `return` of func already returns callee(...) (e.g. torch.compile),
        set these keyword arguments on it and return True; else change nothing, False."""
        idx, fn = self._function(func)
        values = []

        def collect(expr):
            values.append(expr)
            return None

        fn.visit(_ReturnRewriter(collect))
        if not values or not all(isinstance(v, cst.Call) and _dotted(v.func) == callee for v in values):
            return False
        rw = _ReturnRewriter(lambda expr: expr.visit(_CallKwargs({callee}, kwargs, set())))
        self._replace(idx, fn.visit(rw))
        return True

    def wrap_body(self, func: str, with_item: str) -> None:
        """Wrap the body of a top-level function (after its docstring) in
        `with <with_item>:`. A missing `forward` is added first (ensure_forward)."""
        if func == "forward":
            self.ensure_forward()
        idx, fn = self._function(func)
        doc, rest = self._body_split(fn)
        if not rest:
            raise PatchError(f"{func}() in {self.filename} has an empty body")
        item_code = self.module.code_for_node(cst.parse_expression(with_item))
        first = rest[0]
        if len(rest) == 1 and isinstance(first, cst.With):
            if any(self.module.code_for_node(i.item) == item_code for i in first.items):
                return
        block = cst.With(
            items=[cst.WithItem(item=cst.parse_expression(with_item))],
            body=cst.IndentedBlock(
                body=[s.with_changes(leading_lines=[]) if i == 0 else s for i, s in enumerate(rest)]),
            leading_lines=first.leading_lines,
        )
        self._replace(idx, fn.with_changes(body=cst.IndentedBlock(body=[*doc, block])))

    def prepend(self, func: str, code: str) -> None:
        """Statements at the start of a top-level function's body (after its docstring);
        not added twice. A missing `forward` is added first."""
        if func == "forward":
            self.ensure_forward()
        idx, fn = self._function(func)
        doc, rest = self._body_split(fn)
        module = cst.parse_module(code)
        have = {self._key(s) for s in rest}
        new = [s for s in module.body if self._key(s) not in have]
        if not new:
            return
        self._replace(idx, fn.with_changes(body=cst.IndentedBlock(body=[*doc, *new, *rest])))

    def add_call_kwargs(
        self, func: str, callees: set[str], kwargs: dict[str, str], remove: Iterable[str] = ()
    ) -> int:
        """Set keyword arguments (name -> source of the value) on every call inside the
        top-level function whose callee is one of `callees` (a bare name matches any
        module path: "DataLoader" matches torch.utils.data.DataLoader); drop the keywords
        in `remove`. Returns how many calls changed; raises PatchError when none matched."""
        if not self.has_function(func) and self._binding_index(func) is not None:
            stmt = self.module.body[self._binding_index(func)]
            raise PatchError(f"{func}() is not defined in {self.filename} but bound by "
                             f"`{self._key(stmt)}`, so its {', '.join(sorted(callees))}(...) call lives in "
                             "another file; make the change there")
        idx, fn = self._function(func)
        tr = _CallKwargs(set(callees), kwargs, set(remove))
        new = fn.visit(tr)
        if tr.count == 0:
            names = ", ".join(sorted(callees))
            if tr.splat:
                raise PatchError(
                    f"the {names}(...) call in {func}() of {self.filename} passes **kwargs, so its "
                    f"keyword arguments cannot be set safely"
                )
            raise PatchError(f"{func}() in {self.filename} has no {names}(...) call to change")
        self._replace(idx, new)
        return tr.count


_C_ESCAPES = {7: "\\a", 8: "\\b", 9: "\\t", 10: "\\n", 11: "\\v", 12: "\\f", 13: "\\r", 34: '\\"', 92: "\\\\"}


def diff_path(path: str) -> str:
    """A path for a `---` / `+++` header as git writes it, so that `git apply` and GNU `patch`
    both read it back: C-quoted ("a/x\\"y.py") when it holds a quote, a backslash, a control
    character or a non-ASCII byte; ended by a tab when it holds a space."""
    raw = path.encode("utf-8", "surrogateescape")
    if any(b < 32 or b >= 127 or b in (34, 92) for b in raw):
        return '"' + "".join(_C_ESCAPES.get(b) or (chr(b) if 32 <= b < 127 else f"\\{b:03o}") for b in raw) + '"'
    return path + "\t" if " " in path else path


def unified_diff(original: str, new: str, filename: str) -> str:
    """A unified diff with a/ and b/ paths (apply with `patch -p1` or `git apply` in the
    file's folder), headers quoted as git quotes them (diff_path)."""
    a = original.splitlines(keepends=True)
    b = new.splitlines(keepends=True)
    out = list(difflib.unified_diff(a, b, fromfile="a", tofile="b"))
    if not out:
        return ""
    out[0] = f"--- {diff_path('a/' + filename)}\n"
    out[1] = f"+++ {diff_path('b/' + filename)}\n"
    return "".join(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n" for line in out)
