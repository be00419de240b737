"""Overhead of the gradient-health measurement (issue 14) on the bundled example.

    python bench/health_bench.py [--model examples/simplenet.py] [--device cpu|cuda] [--rounds 15]

One Session of the model; after a warm-up, rounds alternate a plain run of --steps training
steps (4: autoopt's verification) and the same steps with one health monitor attached
across them, as autoopt attaches it (autoopt.run.health.HealthMonitor: per-layer gradient
norms with torch._foreach_norm, inf/NaN counts, a copy of the weights and the
update-to-weight ratios on every step; forward hooks reading each layer's output RMS on the
first step, then removed). Each run is timed alone (device synchronised), in alternating
order so machine drift hits both alike. Prints the medians and quartiles per step, the ratio
monitored / plain (the median of the rounds' ratios), and the measurement's own work per
step outside the forward (timed with the device synchronised around it; the hooks run inside
the forward, so only the ratio counts them). autoopt takes the measurement on its 4
verification steps only, never inside a timed step; the last line spreads it over a
baseline's minimum steps. The goal: under 5 % of step time.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class _TimedMonitor:
    """A HealthMonitor whose own work (before_step, after_step) is timed, device synchronised."""

    def __init__(self, s):
        from autoopt.run.health import HealthMonitor

        self.inner = HealthMonitor(s.eager_model, scaler=s.scaler, optimizer=s.optimizer)
        self.s = s
        self.ms = 0.0

    def _time(self, fn, *a) -> None:
        self.s.sync()
        t0 = time.perf_counter()
        fn(*a)
        self.s.sync()
        self.ms += (time.perf_counter() - t0) * 1e3

    def before_step(self) -> None:
        self._time(self.inner.before_step)

    def after_step(self, stepped: bool = True) -> None:
        self._time(self.inner.after_step, stepped)


def _timed(s, monitored: bool, steps: int) -> tuple[float, float]:
    """One verification's worth of steps (`steps`), with one monitor across them as autoopt
    attaches it, or plain: (ms per step, the monitor's own ms per step)."""
    step = s.training_step
    monitor = _TimedMonitor(s) if monitored else None
    step.monitor = monitor
    try:
        s.sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            s.step()
        s.sync()
        return (time.perf_counter() - t0) * 1e3 / steps, (monitor.ms / steps) if monitor else 0.0
    finally:
        step.monitor = None
        if monitor is not None:
            monitor.inner.detach()  # its forward hooks (layer output RMS), if still on


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4)
    return q[0], statistics.median(xs), q[2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "examples" / "simplenet.py"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="steps per measured run (autoopt verifies on 4)")
    args = ap.parse_args(argv)

    import torch

    from autoopt.env import detect_capabilities
    from autoopt.run.session import Session
    from autoopt.workload.build import build_workload
    from autoopt.workload.load import load_model_file

    spec = load_model_file(args.model)
    caps = detect_capabilities(args.device)
    wl = build_workload(spec, caps, seed=0)
    plain, monitored, own = [], [], []
    with Session(wl, wl.base_config()) as s:
        for _ in range(args.warmup):
            s.step()
        for r in range(args.rounds):
            order = (False, True) if r % 2 == 0 else (True, False)
            for m in order:
                ms, mine = _timed(s, m, args.steps)
                (monitored if m else plain).append(ms)
                if m:
                    own.append(mine)
    p, m = _quartiles(plain), _quartiles(monitored)
    # each round's pair ran back to back: the median of their ratios cancels the machine's drift
    ratio = statistics.median(b / a for a, b in zip(plain, monitored))
    name = Path(args.model).stem
    dev = torch.cuda.get_device_name() if caps.device_type == "cuda" else (caps.name or "cpu")
    print(f"Gradient-health overhead on {name}, {dev} ({caps.device_type}), torch {torch.__version__}, "
          f"batch {wl.batch_size}, {args.rounds} alternating rounds of {args.steps} steps (ms per step)")
    print()
    print("| step | median ms | quartiles ms |")
    print("|---|---|---|")
    print(f"| plain | {p[1]:.2f} | {p[0]:.2f}–{p[2]:.2f} |")
    print(f"| with health measurement | {m[1]:.2f} | {m[0]:.2f}–{m[2]:.2f} |")
    print(f"| the health measurement's own work in a measured step | {statistics.median(own):.2f} | "
          f"{_quartiles(own)[0]:.2f}–{_quartiles(own)[2]:.2f} |")
    print()
    share = statistics.median(own) / p[1]
    print(f"The measurement's own work: {100 * share:.2f} % of the plain step's median (goal < 5 %).")
    print(f"Per-step overhead of the measured steps: {100 * (ratio - 1):+.1f} % (median of the rounds' ratios "
          f"{ratio:.3f}; goal < 5 %).")
    # autoopt measures health on its 4 verification steps; a baseline also runs warm-up and
    # at least 10 timed steps (MeasureSettings) without it
    spread = (ratio - 1) * 4 / (4 + 3 + 10)
    print(f"Spread over the baseline's verification, warm-up and minimum timed steps (4 + 3 + 10): "
          f"{100 * spread:+.2f} %.")
    return 0 if share < 0.05 and ratio < 1.05 else 1


if __name__ == "__main__":
    sys.exit(main())
