"""python -m autoopt.analyze TRACE... [--json] [--top N]: the analysis alone, without torch."""
from __future__ import annotations

import argparse
import os
import sys

# a process of its own: numpy's BLAS threads are never used here, and starting them costs time
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import orjson  # noqa: E402

from autoopt.analyze.limits import Limits, parse_count, parse_size  # noqa: E402
from autoopt.errors import UserError  # noqa: E402
from autoopt.safe import terminal_text  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m autoopt.analyze", description="Analyze Kineto traces.")
    ap.add_argument("traces", nargs="+", help=".json / .json.gz traces or directories of them (one per rank)")
    ap.add_argument("--json", action="store_true", help="print only JSON on stdout")
    ap.add_argument("--top", type=int, default=10, help="rows in the top kernel / operator tables")
    ap.add_argument("--max-trace-bytes", type=parse_size, metavar="SIZE", help="as `autoopt analyze`'s")
    ap.add_argument("--max-events", type=parse_count, metavar="N", help="as `autoopt analyze`'s")
    ap.add_argument("--max-event-bytes", type=parse_size, metavar="SIZE", help="as `autoopt analyze`'s")
    args = ap.parse_args(argv)
    from autoopt.analyze import analyze_paths, render_text

    try:
        limits = Limits.default().with_overrides(args.max_trace_bytes, args.max_events, args.max_event_bytes)
        result = analyze_paths(args.traces, top_n=args.top, limits=limits)
    except UserError as e:
        print(f"error: {terminal_text(e.message)}", file=sys.stderr)  # it names files: made terminal-safe
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(result, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS))
        sys.stdout.buffer.write(b"\n")
    else:
        print(render_text(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
