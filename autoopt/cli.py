"""The command line: the only module that prints, prompts or exits.

Whatever it prints passes autoopt.safe: names from traces, models and file names show
their control characters and bidi controls as visible escapes (`_write`, and the consoles of
`_console`, which make every string they print terminal-safe), and a name inside rich markup
is markup-escaped too.

Every command returns an exit status: 0 done, 2 bad input, 128 + the signal when stopped by
one (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP; the partial report still written). Heavy modules
(torch above all) are imported inside the commands that need them, so `autoopt analyze`
and `autoopt rules` start fast.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from functools import lru_cache
from typing import Any, Optional

from autoopt import __version__
from autoopt.errors import ExitCode, Interrupted, UserError
from autoopt.settings import DEFAULT_TIME_BUDGET_S

EPILOG = ("Docs: autoopt rules | autoopt explain CODE. Exit codes: 0 done, 2 bad input, 130 interrupted (Ctrl-C), "
          "143 SIGTERM, 129 SIGHUP (a stopped optimize still writes its partial report).")


@lru_cache(maxsize=1)
def _safe_console_class():
    """rich's Console, with every string it prints made terminal-safe first (rich itself
    drops only a few control characters and lets ESC sequences through)."""
    from rich.console import Console

    from autoopt.safe import terminal_text

    class SafeConsole(Console):
        def print(self, *objects: Any, **kwargs: Any) -> None:
            super().print(*(terminal_text(o) if isinstance(o, str) else o for o in objects), **kwargs)

    return SafeConsole


def _console(stderr: bool = True):
    console = _safe_console_class()
    c = console(stderr=stderr, highlight=False)
    if not c.is_terminal:  # piped or redirected: don't re-wrap lines at 80 columns
        c = console(stderr=stderr, highlight=False, soft_wrap=True, width=160)
    return c


def _name(s: Any) -> str:
    """A name from a trace, a model or a file name, for one line of output."""
    from autoopt.safe import for_terminal

    return for_terminal(s)


def _print_json(obj: Any) -> None:
    """The JSON document, on the real stdout (with --json everything else goes to stderr: autoopt.stdio)."""
    from autoopt.stdio import write_json

    write_json(json.dumps(obj, indent=2, default=str) + "\n")


def _write(text: str) -> None:
    """Plain text to stdout, terminal-safe but otherwise as it is: no re-wrapping when piped."""
    from autoopt.safe import terminal_text

    text = terminal_text(text)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


def _codes(value: Optional[str]) -> set[str]:
    if not value:
        return set()
    return {c.strip().upper() for c in value.replace(" ", ",").split(",") if c.strip()}


# ---------------------------------------------------------------- progress
class ProgressView:
    """Progress on stderr, with elapsed time and an estimate for the long phases. On a terminal
    one status line is updated in place; the lines a user should keep (the time budget, the
    noise check) are printed above it."""

    LASTING = ("budget", "noise")

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.console = _console()
        self.status = None
        import time

        self._time = time.perf_counter
        self.t0 = self._time()

    def __call__(self, phase: str, detail: str = "", **info: Any) -> None:
        if not self.enabled:
            return
        now = self._time()
        est = ""
        if info.get("compiling"):
            est = " (the first step runs torch.compile: usually 10-60 s)"
        text = f"[{now - self.t0:6.1f}s] {detail}{est}"
        if not self.console.is_terminal or (phase in self.LASTING and not info.get("variant")):
            self.console.print(text, markup=False, highlight=False)
            return
        from rich.text import Text

        from autoopt.safe import terminal_text

        line = Text(terminal_text(text))  # a Text: a name in the detail is never read as markup
        if self.status is None:
            self.status = self.console.status(line)
            self.status.start()
        else:
            self.status.update(line)

    def stop(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None


# ---------------------------------------------------------------- commands
def cmd_env(args) -> int:
    from autoopt.env import env_info
    from autoopt.output.env_text import render_env

    info = env_info()
    if args.json:
        _print_json(info)
    else:
        _write(render_env(info))
    return ExitCode.OK


def cmd_rules(args) -> int:
    from autoopt.diagnosis.explain import render_rules_table
    from autoopt.diagnosis.rules import load_rules

    rules = load_rules()
    if args.json:
        _print_json({"rules": [r.to_json() for r in rules]})
    else:
        _write(render_rules_table(rules))
    return ExitCode.OK


def cmd_explain(args) -> int:
    from autoopt.diagnosis.explain import render_explain
    from autoopt.diagnosis.rules import get_rule

    _write(render_explain(get_rule(args.code)))
    return ExitCode.OK


def _analysis_findings(result: dict) -> list[tuple[Optional[str], object]]:
    """(trace path or None, finding) for an analysis: the ranks of one job are diagnosed
    together; traces of separate runs each on their own."""
    from autoopt.analyze import split_runs
    from autoopt.diagnosis.facts_builder import build_facts, diagnose

    if result.get("runs") == "separate":
        return [(sub["traces"][0]["path"], f) for sub in split_runs(result)
                for f in diagnose(build_facts(analysis=sub), sub)]
    if len(result.get("traces") or []) > 1:
        from autoopt.analyze.balance import rank_balance  # torch-free: names a straggler rank

        rank_balance(result)
    return [(None, f) for f in diagnose(build_facts(analysis=result), result)]


def cmd_analyze(args) -> int:
    from autoopt.analyze import analyze_paths, render_text
    from autoopt.analyze.core import with_finite_numbers
    from autoopt.analyze.limits import Limits

    limits = Limits.default().with_overrides(args.max_trace_bytes, args.max_events, args.max_event_bytes)
    result = analyze_paths(args.traces, limits=limits)
    found = _analysis_findings(result)
    result["findings"] = [dict(f.to_json(), **({"trace": path} if path else {})) for path, f in found]
    result = with_finite_numbers(result)
    if args.json:
        _print_json(result)
        return ExitCode.OK
    _write(render_text(result))
    out = _console(stderr=False)
    if result.get("runs") == "separate":
        for t in result["traces"]:
            out.print(f"\n{_name(t['path'])}:", markup=False)
            _print_findings(out, [f for path, f in found if path == t["path"]])
    else:
        _print_findings(out, [f for _, f in found])
    return ExitCode.OK


def _findings_of(result: dict) -> list:
    from autoopt.types import Finding

    return [Finding.from_json(f) for f in result.get("findings", [])]


def _print_findings(out, findings) -> None:
    if not findings:
        out.print("\nNo findings: no rule fired on these numbers.", markup=False)
        return
    out.print("\nFindings:", markup=False)
    for f in findings:
        gain = f" (up to {f.expected_speedup:.2f}x)" if f.expected_speedup else ""
        out.print(f"  {f.code} [{f.safety}] {_name(f.title)}{gain}", markup=False)
        out.print(f"      {_name(f.message)}", markup=False)
    out.print("Run `autoopt explain CODE` for a rule's documentation.", markup=False)


def cmd_profile(args) -> int:
    if args.script:
        from autoopt.pipelines.script import profile_script

        result = profile_script(args.script, args.script_args, steps=args.steps, logdir=args.logdir)
        if args.json:
            _print_json(result)
        else:
            from autoopt.analyze import render_text

            out = _console(stderr=False)
            out.print(render_text(result), markup=False)
            _print_findings(out, _findings_of(result))
        return ExitCode.OK
    if not args.model:
        raise UserError("autoopt profile needs a model file (autoopt profile path/to/model.py) or --script FILE.")
    if args.nproc and args.nproc > 1:
        from autoopt.pipelines.distributed import profile_distributed

        result = profile_distributed(args.model, nproc=args.nproc, device=args.device, batch_size=args.batch_size,
                                     steps=args.steps, logdir=args.logdir, seed=args.seed, extra=args.launcher_arg)
        if args.json:
            _print_json(result)
        else:
            from autoopt.analyze import render_text

            _write(render_text(result))
            _print_findings(_console(stderr=False), _findings_of(result))
            _write(f"\nTraces of every rank: {result['logdir']}  (autoopt view {result['logdir']})")
        return ExitCode.OK
    from autoopt.pipelines.profile import profile_model

    progress = ProgressView(enabled=not args.quiet)
    try:
        result = profile_model(args.model, device=args.device, batch_size=args.batch_size, steps=args.steps,
                               logdir=args.logdir, seed=args.seed, with_stack=args.with_stack, progress=progress)
    finally:
        progress.stop()
    if args.json:
        _print_json(result)
        return ExitCode.OK
    from autoopt.analyze import render_text

    out = _console(stderr=False)
    m = result["measurement"]
    st = m["step_time_ms"]
    device = _name(result["device"]["name"] or result["device"]["type"])
    out.print(f"{_name(result['model'])} on {device}, batch {m['batch_size']}, "
              f"{result['mode']}: step {st['median']:.2f} ms median "
              f"(IQR {st['p25']:.2f}-{st['p75']:.2f}, n={st['n']}), "
              f"{m['throughput_per_s']:.1f} samples/s, peak memory {m['peak_memory_mb'] or 0:.0f} MB"
              + (f", MFU {m['mfu']:.1%}" if m.get("mfu") else ""), markup=False)
    out.print(render_text(result), markup=False)
    _print_findings(out, _findings_of(result))
    out.print(f"\nTrace: {result['logdir']}  (autoopt view {result['logdir']})", markup=False)
    return ExitCode.OK


def _consent(args):
    from autoopt.settings import Consent

    return Consent(yes=bool(args.yes), accept=sorted(_codes(args.accept)), reject=sorted(_codes(args.reject)))


def _make_decider(args, console):
    """decide(finding, transform) for the optimize pipeline: the flags decide when they can
    (autoopt.settings.Consent); otherwise a person at a terminal is asked, and with nobody to
    ask only `safe` transforms are applied."""
    consent = _consent(args)
    interactive = sys.stdin.isatty() and not args.yes and not consent.accept and not args.json_no_prompt

    def decide(f, transform) -> bool:
        if transform is None:
            return False  # advice only: nothing to apply
        d = consent.decide(f.code, transform.name, str(f.safety))
        if d is not None:
            return d
        if interactive:
            return _ask(console, f, transform)
        return consent.unattended(f.code, transform.name, str(f.safety))

    return decide


def _ask(console, f, transform) -> bool:
    gain = f"up to {f.expected_speedup:.2f}x" if f.expected_speedup else "unknown until measured"
    console.print(f"\n[bold]{_escape(f.code)}[/bold] {_escape(f.title)}", highlight=False)  # escaped: names
    console.print(f"  {_name(f.message)}", markup=False, highlight=False)
    console.print(f"  does: {_name(transform.summary)}", markup=False, highlight=False)
    console.print(f"  expected gain: {gain}; safety: {f.safety}", markup=False, highlight=False)
    while True:
        console.print("  apply and verify? [y/n] ", end="", markup=False)  # with markup, rich drops "[y/n]"
        ans = sys.stdin.readline()
        if not ans:
            return False
        ans = ans.strip().lower()
        if ans in ("y", "yes"):
            return True
        if ans in ("n", "no", ""):
            return False


def _parse_try(text: str) -> tuple[str, dict]:
    """`amp:dtype=float16,foo=2` -> ("amp", {"dtype": "float16", "foo": 2}), checked (autoopt.validate)."""
    from autoopt.validate import parse_try

    return parse_try(text)


def _optimize_settings(args):
    from autoopt.settings import DistributedSettings, MeasureSettings, OptimizeSettings, ProfileSettings, SearchSettings
    from autoopt.validate import absolute

    return OptimizeSettings(
        model_path=args.model, device=args.device, batch_size=args.batch_size, seed=args.seed, out_dir=args.out,
        force=bool(getattr(args, "force", False)), reports_root=str(absolute("reports")),
        measure=MeasureSettings.quick() if args.quick else MeasureSettings(),
        profile=ProfileSettings(with_stack=args.with_stack),
        search=SearchSettings(strategy=args.search, time_budget_s=args.time_budget or None,
                              accuracy_tolerance=args.accuracy_tolerance,
                              convergence_steps=getattr(args, "convergence_steps", None)),
        consent=_consent(args), distributed=DistributedSettings(nproc=args.nproc or 0, launcher_args=args.launcher_arg),
        extra_transforms=[_parse_try(t) for t in args.try_],
        script_path=args.script, script_args=list(getattr(args, "script_args", []) or []),
    )


def cmd_optimize(args) -> int:
    settings = _optimize_settings(args)
    progress = ProgressView(enabled=not args.quiet)
    try:
        if settings.script_path:
            from autoopt.pipelines.script_optimize import run_script_optimize

            report = run_script_optimize(settings, _make_decider(args, _console()), progress)
        elif settings.distributed.nproc > 1:
            from autoopt.pipelines.distributed import optimize_distributed

            report = optimize_distributed(settings, progress=progress)
        else:
            from autoopt.pipelines.optimize import run_optimize

            report = run_optimize(settings, _make_decider(args, _console()), progress)
    finally:
        progress.stop()
    if getattr(args, "debug", False):
        _print_failures(report)
    if args.json:
        _print_json(report)
        return ExitCode.OK
    _print_optimize_summary(report)
    return ExitCode.OK


def _print_failures(report: dict) -> None:
    """--debug: the traceback behind every failed variant, on stderr."""
    err = _console()
    for v in report.get("variants", []):
        failure = v.get("failure") or {}
        if failure.get("traceback"):
            err.print(f"variant {v['name']} failed: {failure.get('kind')}: {failure.get('message')}", markup=False)
            err.print(failure["traceback"], markup=False)


def _print_optimize_summary(report: dict) -> None:
    from rich.table import Table
    from rich.text import Text

    from autoopt.output.report import final_table_rows

    out = _console(stderr=False)
    rows = final_table_rows(report)
    if rows:
        device = report["device"].get("name") or report["device"].get("type")
        title = f"autoopt: {_name(report['model'])} ({_name(report['mode'])}, {_name(device)})"
        t = Table(*rows[0], title=Text(title))
        for r in rows[1:]:
            t.add_row(*[Text(str(x)) for x in r])  # cells are data, never markup
        out.print(t)
    _print_final_line(out, report)
    _print_search_story(out, report)
    a = report["artifacts"]
    out.print(f"Report: {a['report_md']}\nHTML:   {a['report_html']}\nPatch:  {a['patch']}\nPlan:   {a['plan']}\n"
              f"TensorBoard: autoopt view {os.path.dirname(a['report_md'])}", markup=False)


def _print_final_line(out, report: dict) -> None:
    """The findings left out because they change training, then the final line, which leads
    with the speedup with training unchanged (final.fixed_batch_speedup)."""
    from autoopt.output.data import advice_lines, manual_skip_lines

    for line in manual_skip_lines(report):
        out.print(f"Not applied: {_name(line)}", markup=False)
    for line in advice_lines(report):
        out.print(f"Advice (not applied to a script): {_name(line)}", markup=False)
    f = report.get("final") or {}
    fs, lo, hi = f.get("fixed_batch_speedup"), f.get("fixed_batch_low"), f.get("fixed_batch_high")
    if fs is not None:
        lead = f"{fs:.2f}x with training unchanged" + (f" (range {lo:.2f}-{hi:.2f})" if lo is not None
                                                       and hi is not None else "")
    else:
        lead = "training unchanged: not measured"
    if f.get("codes"):
        what = ' + '.join(_name(t['name']) for t in f['transforms'])
        sem = f.get("semantic_changes")
        tail = (f"; {f['speedup']:.2f}x (range {f['speedup_low']:.2f}-{f['speedup_high']:.2f}) with "
                f"{_name(sem)}, which changes training" if sem else "")
        out.print(f"Final: {lead}{tail}; kept {what}", markup=False)
    else:
        out.print(f"Final: {lead}; no change kept. {f.get('note', '')}", markup=False)


def _print_search_story(out, report: dict) -> None:
    """What the time budget left unmeasured and the calls too close to settle."""
    from autoopt.output.data import search_info

    info = search_info(report)
    if info.get("unmeasured"):
        out.print(f"Not measured within the time budget: {', '.join(_name(u) for u in info['unmeasured'])} "
                  "(more time: --time-budget SECONDS)", markup=False)
    if info.get("unsettled"):
        calls = ", ".join(f"{_name(u['variant'])} ({u['ratio']}, {u['interval']})" for u in info["unsettled"])
        out.print(f"Too close to call, not kept: {calls}", markup=False)


def cmd_view(args) -> int:
    import time

    from autoopt.output.view import resolve_logdir, start_tensorboard, stop

    logdir = resolve_logdir(args.dir or "reports")
    proc, url = start_tensorboard(logdir, port=args.port)
    out = _console(stderr=False)
    out.print(f"TensorBoard on {url} (log dir {logdir}); Ctrl-C to stop.", markup=False)
    try:
        while proc.poll() is None:
            time.sleep(0.5)
        return ExitCode.OK if proc.returncode in (0, None) else ExitCode.INTERNAL_ERROR
    except KeyboardInterrupt as e:  # Ctrl-C is how one stops it (exit 0); SIGTERM / SIGHUP: 128 + the signal
        from autoopt.procs import signum_of

        return ExitCode.OK if signum_of(e) == 2 else _say_interrupted(e)
    finally:
        stop(proc)


def cmd_export(args) -> int:
    from autoopt.pipelines.export import export_onnx

    result = export_onnx(args.model, args.onnx, plan_path=args.plan, seed=args.seed, batch_size=args.batch_size)
    if args.json:
        _print_json(result)
    else:
        _console(stderr=False).print(
            f"Exported {result['model']} to {result['onnx_path']} ({result['exporter']} exporter, opset "
            f"{result['opset']}, dynamic batch axis); onnx.checker (full check): ok; onnxruntime on a fresh batch of "
            f"{result['check_batch_size']}: max abs error {result['max_abs_error']:.3g}, max rel error "
            f"{result['max_rel_error']:.3g}", markup=False)
    return ExitCode.OK


# ---------------------------------------------------------------- parser
def _common(sp, json: bool = True) -> None:
    if json:
        sp.add_argument("--json", action="store_true", help="print JSON only on stdout")
    sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks behind errors")


def _run_options(sp, trace_help: str) -> None:
    """Options every command that runs a model file shares."""
    sp.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    sp.add_argument("--batch-size", type=int)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--nproc", type=int, default=0, help="N processes through torch.distributed's launcher (DDP)")
    sp.add_argument("--launcher-arg", action="append", default=[], metavar="ARG",
                    help="passed to torch.distributed.run as is (repeat: --launcher-arg=--nnodes=2 ...)")
    sp.add_argument("--with-stack", action="store_true", help=trace_help)
    sp.add_argument("--quiet", action="store_true", help="no progress on stderr")


def _add_profile(sub) -> None:
    sp = sub.add_parser("profile", help="profile a model file (or an unmodified training script)")
    sp.add_argument("model", nargs="?", help="model file (README, 'The model file': build_model, make_batch, ...)")
    sp.add_argument("--script", help="an unmodified training script to run under the profiler")
    sp.add_argument("--steps", type=int, default=3, help="profiled (active) steps")
    sp.add_argument("--logdir", default=None, help="log directory; each run gets a new run directory in it")
    sp.add_argument("--force", action="store_true", help="write into a report's directory (refused otherwise)")
    _run_options(sp, "record Python stacks (source lines in findings)")
    _common(sp)
    sp.set_defaults(func=cmd_profile)


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not (v >= 0 and v != float("inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0 or more; 0 means no limit)")
    return v


def _tolerance(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a tolerance: a fraction from 0 up to (not including) 1, "
                                         "e.g. 0.01 for 1 %")
    return v


def _steps(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = -1
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of steps: a whole number from 0 up, e.g. 50 "
                                         "(0 turns the convergence check off)")
    return v


def _add_optimize(sub) -> None:
    sp = sub.add_parser("optimize", help="profile, diagnose, apply verified transforms, report and patch")
    sp.add_argument("model", nargs="?", help="model file (default: the bundled example)")
    sp.add_argument("--script", help="optimize an unmodified training script instead: autoopt optimize --script "
                                     "train.py [flags] -- ARGS (each configuration runs the script in its own process)")
    sp.add_argument("--yes", "-y", action="store_true",
                    help="accept every finding that keeps training the same (safe and unsafe transforms); "
                         "a manual one that changes training (batch size, gradient accumulation) needs --accept")
    sp.add_argument("--accept", help="comma-separated rule codes or transform names to accept")
    sp.add_argument("--reject", help="comma-separated rule codes or transform names to reject")
    sp.add_argument("--out", help="report directory (default reports/<model>-<timestamp>); "
                                  "one that holds a report is refused unless --force")
    sp.add_argument("--force", action="store_true", help="replace the report in --out (its files and tb/ deleted)")
    sp.add_argument("--search", default="greedy", choices=["greedy", "exhaustive"])
    sp.add_argument("--try", dest="try_", action="append", default=[], metavar="TRANSFORM[:K=V,...]",
                    help="also try this transform whether or not a rule proposes it, e.g. --try amp:dtype=float16")
    sp.add_argument("--time-budget", type=_seconds, default=DEFAULT_TIME_BUDGET_S, metavar="SECONDS",
                    help=f"time for the baseline and the search (default {DEFAULT_TIME_BUDGET_S:.0f}; 0: no limit); "
                         "trials that would not finish in time are not started, and the report lists them; "
                         "the final re-measurement comes after")
    sp.add_argument("--accuracy-tolerance", type=_tolerance, default=0.01, metavar="FRACTION",
                    help="with the model file's evaluate(model): how much worse than the baseline's a metric may get, "
                         "as a fraction of max(|baseline|, 1) (default 0.01); a variant beyond it is rejected")
    sp.add_argument("--convergence-steps", type=_steps, default=None, metavar="N",
                    help="an accepted change of training (a larger batch, gradient accumulation) is kept only when "
                         "N optimizer steps of it train like the baseline (loss within the band of 3 baseline "
                         "seeds); default: as many steps as fit in 10 %% of the time budget, 20-200; 0: no check")
    sp.add_argument("--quick", action="store_true", help="fewer timed steps (noisier numbers; for smoke tests)")
    _run_options(sp, "record Python stacks in the traces")
    _common(sp)
    sp.set_defaults(func=cmd_optimize)


def _add_env(sub) -> None:
    sp = sub.add_parser("env", help="GPU, driver, CUDA, cuDNN, torch; bf16 / TF32 / tensor-core support")
    _common(sp)
    sp.set_defaults(func=cmd_env)


def _parsed(parse):
    """An argparse type from a parser that raises ValueError."""
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = parse.__name__
    return convert


def _add_analyze(sub) -> None:
    from autoopt.analyze.limits import parse_count, parse_size

    sp = sub.add_parser("analyze", help="analyze Kineto traces (.json / .json.gz, or directories of rank traces)")
    sp.add_argument("traces", nargs="+")
    # limits on untrusted traces (README, "Limits on untrusted traces"); defaults follow this machine's memory
    sp.add_argument("--max-trace-bytes", type=_parsed(parse_size), metavar="SIZE",
                    help="most JSON one trace file may hold, decompressed (e.g. 8G; default: the memory available)")
    sp.add_argument("--max-events", type=_parsed(parse_count), metavar="N",
                    help="most events one trace file may hold (e.g. 50M; default: available memory / 400 bytes)")
    sp.add_argument("--max-event-bytes", type=_parsed(parse_size), metavar="SIZE",
                    help="largest single event, or metadata around the events, held at once (e.g. 512M; "
                         "default: available memory / 16, 16 MiB to 1 GiB)")
    _common(sp)
    sp.set_defaults(func=cmd_analyze)


def _add_rule_commands(sub) -> None:
    sp = sub.add_parser("rules", help="list every rule")
    _common(sp)
    sp.set_defaults(func=cmd_rules)
    sp = sub.add_parser("explain", help="print a rule's documentation")
    sp.add_argument("code")
    _common(sp, json=False)
    sp.set_defaults(func=cmd_explain)


def _add_view(sub) -> None:
    sp = sub.add_parser("view", help="TensorBoard on 127.0.0.1 over a report or log directory")
    sp.add_argument("dir", nargs="?")
    sp.add_argument("--port", type=int, default=None)
    _common(sp, json=False)
    sp.set_defaults(func=cmd_view)


def _add_export(sub) -> None:
    sp = sub.add_parser("export", help="export the model to ONNX with a dynamic batch axis")
    sp.add_argument("model")
    sp.add_argument("--onnx", required=True, help="output .onnx path")
    sp.add_argument("--plan", help="plan.json whose inference-relevant transforms to apply")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--batch-size", type=int)
    sp.add_argument("--force", action="store_true", help="replace an existing --onnx file")
    _common(sp)
    sp.set_defaults(func=cmd_export)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="autoopt",
        description="Profile a PyTorch model, find out why it is slow, apply verified transforms, "
                    "report the measured gain with a patch.",
        epilog=EPILOG,
    )
    p.add_argument("--version", action="version", version=f"autoopt {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks behind errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_env, _add_profile, _add_analyze, _add_optimize, _add_rule_commands, _add_view, _add_export):
        add(sub)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    script_args: list[str] = []
    if "--" in argv:  # autoopt profile --script train.py -- ARGS
        i = argv.index("--")
        argv, script_args = argv[:i], argv[i + 1:]
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: usage errors exit 2, --help / --version exit 0
        return int(e.code or 0)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return ExitCode.BAD_INPUT
    args.script_args = script_args
    args.json_no_prompt = getattr(args, "json", False) and not sys.stdin.isatty()
    from autoopt.procs import signals_as_interrupts

    with signals_as_interrupts():  # SIGTERM / SIGHUP take Ctrl-C's path; the previous handlers after
        return _run(args)


def _interrupted_line(e: BaseException) -> str:
    from autoopt.procs import signal_name, signum_of

    sig = signum_of(e)
    by = "Interrupted" if sig == 2 else f"Stopped by {signal_name(sig)}"
    if not isinstance(e, Interrupted):
        return f"{by}."
    report = os.path.join(e.out, "report.json")
    if not e.measured:
        return f"{by} before anything measured reached the report: {report} (interrupted: true) says so."
    return f"{by}. What was measured so far is in {report} (interrupted: true)."


def _say_interrupted(e: BaseException) -> int:
    from autoopt.procs import deferred_signals, signum_of

    with deferred_signals(reraise=False):
        try:
            _console().print(_interrupted_line(e), markup=False)
        except OSError:  # SIGHUP: the terminal may be gone
            pass
    return ExitCode.of_signal(signum_of(e))


def _run(args) -> int:
    debug = bool(getattr(args, "debug", False))
    try:
        from autoopt.stdio import json_stdout
        from autoopt.validate import check_args

        check_args(args)  # every flag, before any work starts
        with json_stdout(bool(getattr(args, "json", False))):  # the model's prints, fd 1 writes: to stderr
            return int(args.func(args) or 0)
    except UserError as e:
        _report_error(e.message, e.cause or e, debug)
        return e.exit_code
    except (Interrupted, KeyboardInterrupt) as e:
        return _say_interrupted(e)
    except BrokenPipeError:
        return ExitCode.OK
    except Exception as e:  # a bug in autoopt, not bad input, unless the model file's code raised it
        from autoopt.workload.load import model_file_error

        user = model_file_error(e)
        if user is not None:
            _report_error(user.message, e, debug)
            return user.exit_code
        _report_error(
            f"autoopt hit an internal error: {type(e).__name__}: {e}. This is a bug in autoopt, not in your input; "
            "run again with --debug for the traceback and report it."
            + "".join(f" {n}" for n in getattr(e, "__notes__", ())), e, debug)  # where the work was kept
        return ExitCode.INTERNAL_ERROR


def _report_error(message: str, exc: BaseException, debug: bool) -> None:
    """The one place every error is printed: its message names files, traces and models, and
    can quote an exception of the user's code over several lines, so it is made terminal-safe
    (newlines kept) and markup-escaped."""
    from rich.markup import escape

    from autoopt.safe import terminal_text

    err = _console()
    if debug:
        err.print("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)), markup=False)
    err.print(f"[bold red]error:[/bold red] {escape(terminal_text(message))}")


def _escape(text: str) -> str:
    """Text from outside inside a rich markup string: terminal-safe and markup-escaped."""
    from autoopt.safe import for_rich

    return for_rich(text)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
