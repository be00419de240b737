"""Every flag checked before any work starts: before a model file is imported, a device
detected or a step measured. Bad input is one paragraph naming the flag, the problem and the
fix (a UserError: exit 2), never minutes of work followed by a surprise or a traceback.

`check_args(args)` is called by the CLI on the parsed arguments of every command. It also
fixes what must not depend on the moment it is read: relative `--out` and `--logdir` paths
(and the default reports/ folder) become absolute against the working directory at startup,
so a model file that calls os.chdir() while imported cannot move them.

The output-directory rule (docs/contracts.md, "The output directory"): `--out DIR` that
already holds a report (any of autoopt's report files, or a tb/ folder) is refused unless
`--force`; with --force the old report files and tb/ are removed when the new run starts
(autoopt.output.write.prepare_report_dir), so two runs never mix.
"""
from __future__ import annotations

import difflib
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Optional

from autoopt.catalog import CATALOG, PARAMS, single_process_names
from autoopt.errors import UserError
from autoopt.output.write import report_leftovers

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
# --accept / --reject words that are neither rule codes nor transform names
CONSENT_WORDS = ("NONE",)


# ---------------------------------------------------------------- --try
def _convert(value: str) -> Any:
    if value in ("true", "false"):
        return value == "true"
    for conv in (int, float):
        try:
            return conv(value)
        except ValueError:
            pass
    return value


def parse_try(text: str) -> tuple[str, dict]:
    """`amp:dtype=float16,grad_scaler=true` -> ("amp", {"dtype": "float16", "grad_scaler": True}),
    checked against the transform's declared parameters (autoopt.catalog.PARAMS)."""
    name, _, rest = text.partition(":")
    name = name.strip()
    known = single_process_names()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UserError(f"--try {text}: there is no transform {name!r}{hint}. Fix: name one of "
                        f"{', '.join(sorted(known))}, e.g. --try amp:dtype=bfloat16.")
    params: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key:
            raise UserError(f"--try {text}: expected KEY=VALUE after the transform name, got {item!r}. Fix: write "
                            f"--try {name}:KEY=VALUE[,KEY=VALUE...]{_keys_hint(name)}.")
        if key in params:
            raise UserError(f"--try {text}: {key} is given twice. Fix: give each parameter once.")
        params[key] = _check_param(text, name, key, value)
    return name, params


def _keys_hint(name: str) -> str:
    keys = sorted(PARAMS.get(name, {}))
    return f" ({name} takes {', '.join(keys)})" if keys else f" ({name} takes no parameters)"


def _check_param(text: str, name: str, key: str, value: str) -> Any:
    specs = PARAMS.get(name, {})
    if key not in specs:
        takes = f"it takes {', '.join(sorted(specs))}" if specs else "it takes no parameters"
        raise UserError(f"--try {text}: {name} has no parameter {key!r}; {takes}. Fix: drop {key}= or correct "
                        "its name (`autoopt explain CODE` documents each transform's parameters).")
    spec = specs[key]
    v = _convert(value)
    problem = None
    if value == "":
        problem = "is empty"
    elif spec[0] == "choice" and v not in spec[1]:
        problem = f"must be one of {', '.join(spec[1])}"
    elif spec[0] == "int" and (not isinstance(v, int) or isinstance(v, bool) or v < spec[1]):
        problem = f"must be a whole number, {spec[1]} or more"
    elif spec[0] == "bool" and not isinstance(v, bool):
        problem = "must be true or false"
    elif spec[0] == "name" and not (isinstance(v, str) and _NAME.match(v)):
        problem = "must be a name such as inductor"
    if problem:
        got = "" if value == "" else f", not {value!r}"
        raise UserError(f"--try {text}: {name}'s {key} {problem}{got}. Fix: pass a valid value, "
                        f"e.g. {name}:{key}={_example(spec)}.")
    return v


def _example(spec: tuple) -> str:
    return {"choice": lambda: spec[1][0], "int": lambda: str(max(spec[1], 1)), "bool": lambda: "true",
            "name": lambda: "inductor"}[spec[0]]()


# ---------------------------------------------------------------- --accept / --reject
def check_codes(flag: str, value: Optional[str]) -> None:
    """Every code of --accept / --reject is a rule code, a transform name or `none`."""
    if not value:
        return
    codes = [c.strip() for c in value.replace(" ", ",").split(",") if c.strip()]
    from autoopt.diagnosis.rules import load_rules

    rules = load_rules()
    valid = {r.code.upper() for r in rules} | {n.upper() for n in CATALOG} | set(CONSENT_WORDS)
    unknown = [c for c in codes if c.upper() not in valid]
    if not unknown:
        return
    by_name = {r.name.upper(): r.code for r in rules}
    pool = sorted(valid)
    hints = []
    for c in unknown:
        if c.upper() in by_name:
            hints.append(f"{c} is the name of rule {by_name[c.upper()]}: pass the code")
        else:
            close = difflib.get_close_matches(c.upper(), pool, n=2, cutoff=0.6)
            if close:
                hints.append(f"did you mean {' or '.join(close)}?")
    hint = f" ({'; '.join(hints)})" if hints else ""
    raise UserError(f"{flag} {value}: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} neither a rule "
                    f"code nor a transform name{hint}, so it would decide nothing. Fix: pass rule codes "
                    "(`autoopt rules` lists them), transform names (amp, compile, ...) or none.")


# ---------------------------------------------------------------- paths
def absolute(path: str) -> Path:
    """The path against the working directory now (not a later one), ~ expanded; symlinks kept."""
    return Path(os.path.abspath(os.path.expanduser(path)))


def _nearest_existing(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _writable_dir(d: Path) -> bool:
    """A file can be created in `d` (a real probe: root ignores permission bits, a read-only
    file system does not)."""
    if not os.access(d, os.W_OK | os.X_OK):
        return False
    try:
        fd, name = tempfile.mkstemp(prefix=".autoopt-probe-", dir=d)
    except OSError:
        return False
    os.close(fd)
    os.unlink(name)
    return True


def check_dir(flag: str, path: str) -> Path:
    """`path` as a directory autoopt can create and write: absolute, not a file, writable."""
    p = absolute(path)
    base = _nearest_existing(p)
    if not base.is_dir():
        what = "is a file" if base == p else f"lies under {base}, which is a file"
        raise UserError(f"{flag} {path}: {what}, not a directory. Fix: pass a directory path (it is created "
                        "when missing), or move the file out of the way.")
    if not _writable_dir(base):
        where = "" if base == p else f" (it would be created in {base})"
        raise UserError(f"{flag} {path}: the directory is not writable{where}. Fix: pass a directory you can "
                        "write to, or change its permissions.")
    return p


def check_out(path: str, force: bool) -> Path:
    """--out: a writable directory that holds no report unless --force."""
    p = check_dir("--out", path)
    found = report_leftovers(p) if p.is_dir() else []
    if found and not force:
        raise UserError(f"--out {path}: the directory already holds a report ({', '.join(found)}); writing there "
                        "would overwrite it and mix the TensorBoard runs of both. Fix: pass a new directory, "
                        "leave --out out for a fresh reports/<model>-<time>/, or add --force to replace the "
                        "old report (its report files and tb/ are deleted first).")
    return p


def check_logdir(path: str, force: bool) -> Path:
    """profile --logdir: writable; not a report's directory or its tb/ unless --force."""
    p = check_dir("--logdir", path)
    for d in (p, p.parent):
        if d.is_dir() and (d / "report.json").is_file() and (d == p or p.name == "tb") and not force:
            raise UserError(f"--logdir {path}: {d} is the directory of an `autoopt optimize` report; a profile "
                            "run written there would mix into that report's TensorBoard runs. Fix: pass another "
                            "directory (default reports/profiles/), or add --force to add the run anyway.")
    return p


# ---------------------------------------------------------------- numbers
def _at_least(flag: str, value: Optional[int], low: int, meaning: str) -> None:
    if value is not None and value < low:
        raise UserError(f"{flag} {value}: {meaning} must be {low} or more. Fix: pass {flag} {max(low, 1)} "
                        "or more, or leave it out for the default.")


def check_port(port: Optional[int]) -> Optional[int]:
    """view --port: 1..65535; 0 means a free port (None)."""
    if port is None or port == 0:
        return None
    if not 1 <= port <= 65535:
        raise UserError(f"--port {port}: a TCP port is between 1 and 65535. Fix: pass a port in that range, or "
                        "leave --port out (or pass 0) for a free one.")
    return port


# ---------------------------------------------------------------- the commands
def _check_script_args(args) -> None:
    """optimize: a model file or --script, not both; ARGS after -- only for a script."""
    script = getattr(args, "script", None)
    if script and getattr(args, "model", None):
        raise UserError(f"autoopt optimize got both a model file ({args.model}) and --script {script}. Fix: pass one: "
                        "a model file, or --script train.py -- ARGS for an unmodified training script.")
    if not script and getattr(args, "script_args", None):
        raise UserError(f"autoopt optimize got arguments after -- ({' '.join(args.script_args)}) but no --script: "
                        "they are the training script's. Fix: autoopt optimize --script train.py -- "
                        f"{' '.join(args.script_args)}.")
    if script and getattr(args, "launcher_arg", None):
        raise UserError(f"--launcher-arg with --script {script}: autoopt runs a script's ranks on this machine "
                        "(torch.distributed.run --standalone --nproc-per-node N). Fix: drop --launcher-arg; --nproc N "
                        "sets the number of processes.")
    if script and getattr(args, "batch_size", None) is not None:
        raise UserError(f"--batch-size does not apply to --script {script}: the script builds its own batches. Fix: "
                        "pass the script's own batch-size argument after --, e.g. -- --batch-size 64.")


def check_args(args) -> None:
    """Check (and make absolute) the flags of the parsed command line; UserError on bad input."""
    command = getattr(args, "command", None)
    _at_least("--batch-size", getattr(args, "batch_size", None), 1, "a batch size")
    _at_least("--nproc", getattr(args, "nproc", None), 0, "the number of processes")
    if command == "profile":
        _at_least("--steps", args.steps, 1, "the number of profiled steps")
        args.logdir = str(check_logdir(args.logdir or os.path.join("reports", "profiles"), bool(args.force)))
    elif command == "optimize":
        _check_script_args(args)
        for text in args.try_:
            parse_try(text)
        check_codes("--accept", args.accept)
        check_codes("--reject", args.reject)
        if args.out:
            args.out = str(check_out(args.out, bool(args.force)))
        else:
            check_dir("the default report directory (no --out)", "reports")
    elif command == "view":
        args.port = check_port(args.port)
    elif command == "export" and args.onnx:
        onnx = absolute(args.onnx)
        if onnx.is_dir():
            raise UserError(f"--onnx {args.onnx}: is a directory. Fix: pass a file path such as model.onnx.")
        if onnx.exists() and not getattr(args, "force", False):
            raise UserError(f"--onnx {args.onnx}: the file already exists; exporting would overwrite it. Fix: pass "
                            "another path, or add --force to replace it.")
        check_dir("--onnx", str(onnx.parent))
