"""The child that runs one configuration of a training script:
`python -m autoopt.scripting.driver SPEC.json` (autoopt.scripting.protocol describes the spec
and the messages).

Before the script runs, the seeds are forced (random, numpy when installed, torch; the
worker starts every configuration's process with one PYTHONHASHSEED), the
configuration's process-wide settings are put in force (float32 matmul precision / TF32,
cudnn.benchmark, intra-op threads: autoopt.run.apply) and hooks are installed; then the script
runs as `__main__` (runpy) with its argv, its working directory and its directory first on
sys.path, as `python train.py ARGS` would run it.

Hooks, all installed in this process only:
- optimizer construction (every torch.optim.Optimizer class's __init__, and of classes defined
  later): its site, the model (the outermost nn.Module(s) whose parameters it holds, found among
  live objects) and the configuration applied there, before the model's first forward:
  channels_last (the model's parameters converted in place, 4-D float inputs by a forward
  pre-hook), AMP (the forward under torch.autocast, floating outputs cast back to float32 as
  accelerate's convert_outputs_to_fp32 does; fp16 with a GradScaler: backward scaled, the
  optimizer stepped through the scaler), torch.compile (module.compile: the script's own
  variable stays the module it was) and the optimizer's fused / foreach implementation (the
  same object re-initialised with the flag, its groups and hyper-parameters kept);
- DataLoader construction: the configuration's workers / pinning (on CUDA) / persistence /
  prefetch in place of the script's, and every construction site recorded;
- torch.autograd.backward: the loss of each optimizer step (its first backward, detached;
  read as a float only when verification ends; a loss scaled by the script's GradScaler is
  divided by the scale);
- the step boundary: torch's global optimizer step post-hook on the first optimizer stepped
  (the pacer), and GradScaler.step for a step the scaler skipped. Step time is perf_counter
  between boundaries (after torch.cuda.synchronize on CUDA).

After K verification steps and W warm-up steps the child sends "ready" and waits at the step
boundary for the parent's commands (measure N steps, trace, stop). A configuration the driver
cannot apply to a script is an error (kind "transform"), never silently ignored.
"""
from __future__ import annotations

import functools
import json
import os
import runpy
import sys
import time
import traceback
import types
import weakref
from pathlib import Path
from typing import Any, Optional

from autoopt.scripting import protocol
from autoopt.scripting.facts import (
    autocast_on,
    batch_facts,
    env_facts,
    loader_facts,
    model_facts,
    optimizer_facts,
    optimizer_impl_of,
    user_frame,
)
from autoopt.scripting.live import (
    channels_last_inputs,
    describe,
    find_roots,
    flat_tensors,
    is_oom,
    jsonable,
    map_tensors,
    name_of,
    seed_everything,
    site,
    to_float32,
    wraps_optimizer,
)
from autoopt.types import ExecConfig


class _Stop(BaseException):
    """Raised at a step boundary when the parent says stop (a BaseException: a script's
    `except Exception` does not swallow it)."""


class CannotApply(Exception):
    """The configuration cannot be applied to this script (error kind "transform")."""



class Driver:
    """What the hooks see and do in the child; one per process."""

    def __init__(self, spec: dict, conn):
        self.spec = spec
        self.conn = conn
        self.cfg = ExecConfig.from_json(spec["config"])
        self.script = os.path.abspath(spec["script"])
        self.nproc = int(spec.get("nproc") or 1)
        self.rank = int(os.environ.get("RANK", "0")) if self.nproc > 1 else 0
        self.verify_steps = int(spec["verify_steps"])
        self.warmup_steps = int(spec["warmup_steps"])
        self.phase = "verify"  # verify -> warmup -> (wait) -> measure | trace
        self.steps = 0
        self.pacer: Optional[int] = None
        self.optimizers: dict[int, dict] = {}
        self.roots: list = []  # the model(s): root modules of the first optimizer
        self.prepared: set[int] = set()
        self.batch: Optional[dict] = None
        self.autocast_seen = False
        self.shapes: set = set()
        self.forward_sites: list[dict] = []
        self.losses: list = []
        self.loss_taken = False
        self.scaled: dict[int, tuple] = {}
        self.scaler = None
        self.scaled_opt = None  # the optimizer the driver's GradScaler steps
        self.unscaled = False  # its gradients were unscaled this step (for clipping)
        self.sites: dict[str, Any] = {"script": self.script, "forward": None, "backward": None, "step": None,
                                      "optimizer": None, "dataloaders": [], "model_def": None, "framework": None}
        self.loaders: list = []
        self.handled: set[str] = set()
        self.applied: list[str] = []
        self.notes: list[str] = []
        self.framework: Optional[str] = None
        self.device = "cpu"
        self.cuda_device = None  # the model's GPU (None: the current one)
        self.t_last: Optional[float] = None
        self.times: list[float] = []
        self.warmup_times: list[float] = []
        self.left = 0
        self.skip = 0
        self.prof = None
        self.trace_cmd: Optional[dict] = None
        self.step_fired = False
        self.opt_depth = 0
        self.internal = 0  # > 0 while the driver builds objects of its own
        self.observer = None
        self.fallback_random = None

    # ------------------------------------------------------------------ messages
    def send(self, event: str, **data) -> None:
        self.conn.send(dict(data, event=event))

    def _sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize(self.cuda_device)  # the model's GPU (a rank's own, under --nproc)

    # ------------------------------------------------------------------ setup
    def check_config(self) -> None:
        reasons = protocol.cannot_apply(self.cfg, self.handled)
        if reasons:
            raise CannotApply("; ".join(reasons))

    def process_settings(self) -> None:
        from autoopt.run.apply import process_settings_for, read_process_settings, write_process_settings

        cfg = self.cfg
        if "matmul_precision" in self.handled:  # TrainingArguments(tf32=True) sets it through torch's newer
            cfg = cfg.with_(matmul_precision=None)  # fp32_precision API; both APIs at once make torch raise
        write_process_settings(process_settings_for(cfg, read_process_settings()))
        for name in ("matmul_precision", "cudnn_benchmark", "num_threads"):
            if getattr(self.cfg, name) and name not in self.handled:
                self.applied.append(name)
        if (self.cfg.dataloader or {}).get("intra_op_threads") and not self.cfg.num_threads:
            self.applied.append("intra_op_threads")

    def frameworks(self) -> None:
        """HF Trainer / Lightning scripts: their own knobs apply what they can express."""
        if not self.spec.get("framework_knobs"):
            return
        import importlib

        try:
            frameworks = importlib.import_module("autoopt.scripting.frameworks")
        except ModuleNotFoundError as e:  # an autoopt without framework support: the generic hooks apply all
            if e.name != "autoopt.scripting.frameworks":
                raise
            return
        source = Path(self.script).read_text(encoding="utf-8", errors="replace")
        self.framework = frameworks.detect(source)
        if self.framework is None:
            return
        from autoopt.env import detect_capabilities

        caps = detect_capabilities(self.cfg.device)
        # the same set object install() returns: a field leaves it while the script runs when the
        # script's own arguments rule it out (optim not AdamW, its own optimizer handed to the
        # Trainer, a precision plugin); the generic hooks then apply that field (on_step)
        self.handled = frameworks.install(self.cfg, caps, self.sites)

    # ------------------------------------------------------------------ hooks: optimizer
    def wrap_optimizer_init(self, cls) -> None:
        init = cls.__dict__.get("__init__")
        if init is None or getattr(init, "_autoopt_driver", False):
            return
        driver = self

        @functools.wraps(init)
        def wrapped(opt, *args, **kwargs):
            driver.opt_depth += 1
            try:
                init(opt, *args, **kwargs)
            finally:
                driver.opt_depth -= 1
            if driver.opt_depth == 0 and not driver.internal:
                driver.on_optimizer(opt)

        wrapped._autoopt_driver = True
        cls.__init__ = wrapped

    def install_optimizer_hooks(self) -> list:
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook

        def subclasses(c):
            for s in c.__subclasses__():
                yield s
                yield from subclasses(s)

        for cls in [torch.optim.Optimizer, *subclasses(torch.optim.Optimizer)]:
            self.wrap_optimizer_init(cls)
        driver = self

        def init_subclass(cls, **kwargs):
            driver.wrap_optimizer_init(cls)

        torch.optim.Optimizer.__init_subclass__ = classmethod(init_subclass)
        return [register_optimizer_step_post_hook(lambda opt, a, k: self.on_step(opt))]

    def on_optimizer(self, opt) -> None:
        if wraps_optimizer(opt):
            return  # a wrapper (accelerate's AcceleratedOptimizer, ...): the optimizer inside was seen first
        frame = user_frame(3)
        key = id(opt)
        self.optimizers[key] = {"type": type(opt).__name__, "module": type(opt).__module__, "impl": None,
                                "ref": weakref.ref(opt)}
        if self.sites["optimizer"] is None and frame is not None:
            self.sites["optimizer"] = dict(site(frame, self.script), var=None)
        if self.cfg.optimizer_impl and "optimizer_impl" not in self.handled:
            self.set_impl(opt)
        self.optimizers[key]["impl"] = optimizer_impl_of(opt)
        roots = find_roots(opt)
        if not self.roots:
            self.roots = roots
        for m in roots:
            self.prepare_model(m)
        if self.cfg.grad_scaler and self.scaler is None and "grad_scaler" not in self.handled:
            self.install_scaler(opt)

    def set_impl(self, opt) -> None:
        """The optimizer re-initialised in place with the configuration's implementation."""
        from autoopt.run.optimizers import rebuild_optimizer

        device = next((p.device.type for g in opt.param_groups for p in g["params"]), self.cfg.device)
        self.internal += 1
        try:
            new = rebuild_optimizer(opt, self.cfg.optimizer_impl, device)
        except ValueError as e:
            raise CannotApply(f"optimizer_impl={self.cfg.optimizer_impl!r}: {e}") from e
        finally:
            self.internal -= 1
        opt.__dict__.update(new.__dict__)
        if "optimizer_impl" not in self.applied:
            self.applied.append("optimizer_impl")

    # ------------------------------------------------------------------ the model
    def prepare_model(self, m) -> None:
        import torch

        if id(m) in self.prepared:
            return
        self.prepared.add(id(m))
        p = next(m.parameters(), None)
        if p is not None and m is (self.roots[0] if self.roots else m):
            self.device = p.device.type
        cfg = self.cfg
        if cfg.channels_last and "channels_last" not in self.handled:
            m.to(memory_format=torch.channels_last)
            m.register_forward_pre_hook(channels_last_inputs, with_kwargs=True)
            self._applied("channels_last")
        if cfg.amp_dtype and "amp_dtype" not in self.handled:
            self.wrap_autocast(m)
        if cfg.compile_call_mode is not None and "compile_mode" not in self.handled:
            mode = cfg.compile_call_mode
            m.compile(mode=None if mode == "default" else mode, backend=cfg.compile_backend)
            self._applied("compile_mode")
        if cfg.compile_call_mode is None and self.observer is None and m is self.roots[0]:
            self.observer = m.register_forward_pre_hook(self.observe, with_kwargs=True)

    def _applied(self, name: str) -> None:
        if name not in self.applied:
            self.applied.append(name)

    def wrap_autocast(self, m) -> None:
        import torch

        from autoopt.run.apply import DTYPES

        forward = m.forward
        dtype = DTYPES[self.cfg.amp_dtype]
        fallback = self.cfg.device if self.cfg.device in ("cuda", "cpu") else "cpu"

        @functools.wraps(forward)
        def amp_forward(*args, **kwargs):
            # where the weights are now (a script may move the model after building its optimizer)
            p = next(m.parameters(), None)
            device = p.device.type if p is not None and p.device.type in ("cuda", "cpu") else fallback
            with torch.autocast(device_type=device, dtype=dtype):
                out = forward(*args, **kwargs)
            return map_tensors(out, to_float32)

        m.forward = amp_forward
        self._applied("amp_dtype")

    def observe(self, module, args, kwargs) -> None:
        """The model's training calls during verification (grad enabled: not an evaluation
        under torch.no_grad()): its batch, shapes, autocast and call sites."""
        import torch

        if not torch.is_grad_enabled():
            return
        if self.batch is None:
            self.batch = batch_facts((args, kwargs))
        self.autocast_seen = self.autocast_seen or autocast_on()
        self.shapes.add(tuple(tuple(t.shape) for t in flat_tensors((args, kwargs), torch)))
        frame = self._script_frame(user_frame(2))
        if frame is not None and len(self.forward_sites) < 8:
            where = dict(site(frame, self.script), model_var=name_of(module, frame))
            if where not in self.forward_sites:
                self.forward_sites.append(where)

    def forward_site(self) -> Optional[dict]:
        """The training forward call: the last one before the backward call in the backward's
        function, else the first one seen."""
        back = self.sites.get("backward")
        if back is not None:
            before = [f for f in self.forward_sites if f["function"] == back["function"]
                      and f.get("file") == back.get("file") and f["line"] <= back["line"]]
            if before:
                return max(before, key=lambda f: f["line"])
        return self.forward_sites[0] if self.forward_sites else None

    def _script_frame(self, frame):
        """The innermost frame in the script file from `frame` outwards, else `frame`."""
        f = frame
        while f is not None:
            if os.path.abspath(f.f_code.co_filename) == self.script:
                return f
            f = f.f_back
        return frame

    # ------------------------------------------------------------------ fp16: the GradScaler
    def install_scaler(self, opt) -> None:
        import torch

        self.internal += 1
        try:
            self.scaler = torch.amp.GradScaler(self.device)
        finally:
            self.internal -= 1
        scaler = self.scaler
        self.scaled_opt = weakref.ref(opt)
        original = opt.step
        state = {"inner": False}

        def step(optimizer, *args, **kwargs):
            if state["inner"]:  # the scaler's own call, after unscaling
                return original(*args, **kwargs)
            state["inner"] = True
            try:
                out = scaler.step(optimizer, *args, **kwargs)
                scaler.update()
            finally:
                state["inner"] = False
            return out

        # a bound method, as LR schedulers expect when they wrap optimizer.step
        opt.step = types.MethodType(step, opt)
        self._applied("grad_scaler")

    def install_scaler_hooks(self) -> None:
        import torch

        driver = self
        cls = torch.amp.GradScaler
        scale, step = cls.scale, cls.step

        def scale_w(scaler, outputs):
            enabled = scaler.is_enabled()
            if enabled and driver.scaler is not None and scaler is not driver.scaler and not driver.internal:
                raise CannotApply("grad_scaler: the script scales its loss with its own GradScaler already")
            out = scale(scaler, outputs)
            if enabled and isinstance(out, torch.Tensor):  # a disabled scaler returns the loss as it is
                driver.scaled[id(out)] = (weakref.ref(out), scaler)
            return out

        def step_w(scaler, optimizer, *args, **kwargs):
            driver.step_fired = False
            out = step(scaler, optimizer, *args, **kwargs)
            if not driver.step_fired:  # the scaler skipped the step (inf/NaN gradients): still a step
                driver.on_step(optimizer)
            return out

        cls.scale, cls.step = scale_w, step_w
        self.install_clip_hooks()

    def install_clip_hooks(self) -> None:
        """Gradient clipping sees unscaled gradients under the driver's GradScaler: the pacer's
        gradients are unscaled first (once per step), as a person adds scaler.unscale_(opt)."""
        import torch.nn.utils as nn_utils

        driver = self
        for name in ("clip_grad_norm_", "clip_grad_value_"):
            original = getattr(nn_utils, name)

            @functools.wraps(original)
            def clip(*args, _original=original, **kwargs):
                driver.unscale_for_clipping()
                return _original(*args, **kwargs)

            setattr(nn_utils, name, clip)

    def unscale_for_clipping(self) -> None:
        if self.scaler is None or self.unscaled or self.scaled_opt is None:
            return
        opt = self.scaled_opt()
        if opt is not None:
            self.scaler.unscale_(opt)
            self.unscaled = True

    # ------------------------------------------------------------------ backward: the loss
    def install_backward_hook(self) -> None:
        import torch

        original = torch.autograd.backward
        driver = self

        @functools.wraps(original)
        def backward(*args, **kwargs):
            if args:
                new = driver.on_backward(args[0])
                if new is not args[0]:
                    args = (new,) + tuple(args[1:])
            return original(*args, **kwargs)

        torch.autograd.backward = backward

    def on_backward(self, t):
        import torch

        if not isinstance(t, torch.Tensor) or t.numel() != 1 or not t.is_floating_point():
            return t
        entry = self.scaled.get(id(t))
        value = t.detach().float().reshape(())
        if entry is not None and entry[0]() is t:
            s = getattr(entry[1], "_scale", None)
            value = value / (s.float().reshape(()) if s is not None else entry[1].get_scale())
        if not self.loss_taken and len(self.losses) < self.verify_steps:
            self.losses.append(value.clone())
            self.loss_taken = True
        if self.sites["backward"] is None:
            frame = self._script_frame(user_frame(3))
            if frame is not None:
                self.sites["backward"] = site(frame, self.script)
        if self.scaler is not None and entry is None:
            return self.scaler.scale(t)
        return t

    # ------------------------------------------------------------------ DataLoaders
    def install_loader_hook(self) -> None:
        import inspect

        from torch.utils.data import DataLoader

        init = DataLoader.__init__
        sig = inspect.signature(init)
        driver = self
        state = {"depth": 0}

        @functools.wraps(init)
        def wrapped(loader, *args, **kwargs):
            if state["depth"] == 0 and not driver.internal:
                bound = sig.bind(loader, *args, **kwargs)
                driver.loader_settings(bound.arguments)
                args, kwargs = bound.args[1:], bound.kwargs
            state["depth"] += 1
            try:
                init(loader, *args, **kwargs)
            finally:
                state["depth"] -= 1
            if state["depth"] == 0 and not driver.internal:
                driver.on_loader(loader)

        DataLoader.__init__ = wrapped

    def loader_settings(self, arguments: dict) -> None:
        """The configuration's DataLoader settings in place of the script's (as
        autoopt.run.apply.prepare_loader sets them)."""
        settings = self.cfg.dataloader
        if not settings or "dataloader" in self.handled:
            return
        from torch.utils.data import IterableDataset

        workers = int(settings.get("num_workers", arguments.get("num_workers", 0)) or 0)
        if workers > 0 and isinstance(arguments.get("dataset"), IterableDataset):
            raise CannotApply("dataloader: the dataset is iterable-style: every worker would yield the whole stream "
                              "again, changing what the loader yields")
        arguments["num_workers"] = workers
        arguments["pin_memory"] = bool(settings.get("pin_memory")) and self.cfg.device == "cuda"
        if workers > 0:
            arguments["persistent_workers"] = bool(settings.get("persistent_workers", True))
            if settings.get("prefetch_factor") is not None:
                arguments["prefetch_factor"] = int(settings["prefetch_factor"])
        else:
            arguments["persistent_workers"] = False
            arguments.pop("prefetch_factor", None)
        self._applied("dataloader")
        if settings.get("non_blocking") and "non_blocking copies" not in " ".join(self.notes):
            self.notes.append("non_blocking copies are left to the script's own .to() calls (pinned memory applied)")

    def on_loader(self, loader) -> None:
        self.loaders.append(weakref.ref(loader))
        frame = self._script_frame(user_frame(3))
        if frame is not None:
            self.sites["dataloaders"].append(site(frame, self.script))

    # ------------------------------------------------------------------ the step boundary
    def on_step(self, opt) -> None:
        self.step_fired = True
        key = id(opt)
        if key in self.optimizers:
            self.optimizers[key]["steps"] = self.optimizers[key].get("steps", 0) + 1
        if self.pacer is None:
            self.pacer = key
        if key != self.pacer:
            return
        self.steps += 1
        self._sync()
        now = time.perf_counter()
        dt = None if self.t_last is None else (now - self.t_last) * 1000.0
        self.t_last = now
        self.loss_taken = False
        self.unscaled = False
        self.scaled.clear()
        if self.steps == 1:
            self.step_site(opt)
            self.framework_dropped(opt)
        getattr(self, f"_boundary_{self.phase}")(dt)

    def framework_dropped(self, opt) -> None:
        """At the first step: optimizer_impl the Trainer's arguments claimed, then dropped (the script
        handed the Trainer its own optimizer), is applied in place by the generic hook now."""
        if self.framework and self.cfg.optimizer_impl and "optimizer_impl" not in {*self.handled, *self.applied}:
            self.set_impl(opt)

    def step_site(self, opt) -> None:
        frame = self._script_frame(user_frame(3))
        if frame is None:
            return
        var = name_of(opt, frame)
        self.sites["step"] = dict(site(frame, self.script), optimizer_var=var)
        if self.sites["optimizer"] is not None and self.sites["optimizer"].get("var") is None:
            self.sites["optimizer"]["var"] = var

    def _boundary_verify(self, dt: Optional[float]) -> None:
        if self.steps >= self.verify_steps:
            self.end_verification()
            self.phase = "warmup"
            if self.warmup_steps == 0:
                self.ready()

    def _boundary_warmup(self, dt: Optional[float]) -> None:
        if dt is not None:
            self.warmup_times.append(dt)
        if self.steps >= self.verify_steps + self.warmup_steps:
            self.ready()

    def _boundary_measure(self, dt: Optional[float]) -> None:
        if self.skip > 0:  # the window's first steps wake the process up (thread pools, caches): not timed
            self.skip -= 1
            return
        self.times.append(dt)
        self.left -= 1
        if self.left <= 0:
            from autoopt.run.measure import peak_memory_mb

            self.send("measured", times_ms=self.times, peak_memory_mb=peak_memory_mb(self.device))
            self.wait()

    def _boundary_trace(self, dt: Optional[float]) -> None:
        self.prof.step()
        self.left -= 1
        if self.left <= 0:
            prof, self.prof = self.prof, None
            prof.stop()
            cmd = self.trace_cmd or {}
            files = sorted(str(p) for p in Path(cmd["dir"]).glob(f"{cmd.get('worker') or ''}*.pt.trace.json*"))
            self.send("traced", files=files)
            self.wait()

    def end_verification(self) -> None:
        if self.observer is not None:
            self.observer.remove()
            self.observer = None
        if self.fallback_random is not None:
            import torch._inductor.config as inductor_config

            inductor_config.fallback_random = self.fallback_random
            self.fallback_random = None

    def ready(self) -> None:
        if self.roots:  # the device the model trains on now (synchronised around timed steps)
            p = next(self.roots[0].parameters(), None)
            if p is not None:
                self.device = p.device.type
                self.cuda_device = p.device if p.device.type == "cuda" else None
        missing = protocol.not_taken(self.cfg, set(self.applied) | self.handled)
        if missing:
            raise CannotApply("; ".join(missing))
        if self.handled and not self.sites.get("framework"):
            raise CannotApply(f"no {self.framework} Trainer was built to apply {', '.join(sorted(self.handled))}")
        self.applied += [n for n in sorted(self.handled) if n not in self.applied]
        losses = [float(t) for t in self.losses]
        self.sites["forward"] = self.forward_site()
        self.send("ready", losses=losses, steps=self.steps, facts=self.facts(), sites=self.sites, device=self.device,
                  batch_size=(self.batch or {}).get("batch_size"), framework=self.framework, applied=self.applied,
                  notes=self.notes, warmup_times_ms=self.warmup_times)
        self.wait()

    def wait(self) -> None:
        """Block at the boundary until the parent's next command, then start it."""
        try:
            cmd = self.conn.recv()
        except (EOFError, OSError):  # the parent is gone
            raise _Stop() from None
        what = cmd.get("cmd")
        if what == "stop":
            raise _Stop()
        if what == "measure":
            from autoopt.run.measure import reset_peak_memory

            reset_peak_memory(self.device)
            self.phase, self.left, self.times = "measure", max(1, int(cmd["steps"])), []
            self.skip = max(0, int(cmd.get("warmup", 0)))
        elif what == "trace":
            self.start_trace(cmd)
        else:
            raise RuntimeError(f"autoopt's script driver got an unknown command {cmd!r}")
        self._sync()
        self.t_last = time.perf_counter()

    def start_trace(self, cmd: dict) -> None:
        from torch.profiler import profile, schedule, tensorboard_trace_handler

        from autoopt.run.trace import activities_for

        warmup, active = int(cmd.get("warmup", 1)), int(cmd.get("active", 3))
        Path(cmd["dir"]).mkdir(parents=True, exist_ok=True)
        if self.nproc > 1:  # one file per rank, named as autoopt's distributed traces are
            cmd = dict(cmd, worker=f"rank{self.rank}")
        self.trace_cmd = cmd
        self.prof = profile(
            activities=activities_for(self.device),
            schedule=schedule(wait=0, warmup=warmup, active=active, repeat=1),
            on_trace_ready=tensorboard_trace_handler(cmd["dir"], worker_name=cmd.get("worker"), use_gzip=True),
            record_shapes=bool(cmd.get("record_shapes", True)), profile_memory=bool(cmd.get("profile_memory", True)),
            with_stack=bool(cmd.get("with_stack", False)))
        self.prof.start()
        self.phase, self.left = "trace", warmup + active

    # ------------------------------------------------------------------ facts
    def facts(self) -> dict[str, Any]:
        from autoopt.env import available_cpus

        model = self.roots[0] if self.roots else None
        loaders = [r() for r in self.loaders if r() is not None]
        bs = (self.batch or {}).get("batch_size")
        out: dict[str, Any] = dict(loader_facts(bs, loaders))
        out["workload.cpu_count"] = available_cpus()
        opt = self.optimizers.get(self.pacer) if self.pacer is not None else None
        out.update(optimizer_facts(opt["type"] if opt else None, opt["impl"] if opt else None))
        if opt is not None:
            out["_optimizer_module"] = opt["module"]
            o = opt["ref"]()
            lr = o.param_groups[0].get("lr") if o is not None and o.param_groups else None
            if isinstance(lr, (int, float)) and not isinstance(lr, bool):
                out["_optimizer_lr"] = float(lr)
        if model is not None:
            out.update(model_facts(model, self.batch, self.autocast_seen))
        out["workload.static_shapes"] = len(self.shapes) <= 1
        out["_dataloader"] = describe(loaders, bs)
        out.update(env_facts())
        return {k: v for k, v in out.items() if jsonable(v)}


# ---------------------------------------------------------------------------- running the script
def _error(driver: Driver, exc: BaseException, kind: str) -> None:
    message = " ".join(str(exc).split())[:1500] or type(exc).__name__
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-6000:]
    driver.send("error", kind=kind, type=type(exc).__name__, message=message,
                where=protocol.where(exc, driver.script), traceback=tb, steps=driver.steps)


def _run(driver: Driver) -> int:
    """Set up, run the script, report how it ended; the exit status of the child."""
    spec = driver.spec
    try:
        seed_everything(int(spec.get("seed", 0)))
        driver.frameworks()
        driver.check_config()
        driver.process_settings()
        driver.install_optimizer_hooks()
        driver.install_scaler_hooks()
        driver.install_backward_hook()
        driver.install_loader_hook()
        if driver.cfg.compile_call_mode is not None:
            _eager_rng(driver)
        os.chdir(spec["cwd"])
        sys.argv = [spec["script"], *spec["args"]]
        sys.path[0] = spec["sys_path0"]  # `python -m` put the working directory there; a script has its own
    except CannotApply as e:
        _error(driver, e, protocol.TRANSFORM)
        return 1
    except Exception as e:  # noqa: BLE001 - the driver could not start: reported, not raised
        _error(driver, e, protocol.SETUP)
        return 1
    return _run_script(driver)


def _eager_rng(driver: Driver) -> None:
    """Compiled graphs draw random numbers with eager's streams during verification (see
    autoopt.run.verify.eager_rng_in_compiled_graphs)."""
    try:
        import torch._inductor.config as inductor_config
    except Exception:  # noqa: BLE001 - a torch without Inductor compiles nothing here
        return
    driver.fallback_random = inductor_config.fallback_random
    inductor_config.fallback_random = True


def _run_script(driver: Driver) -> int:
    try:
        runpy.run_path(driver.spec["script"], run_name="__main__")
    except _Stop:
        return 0
    except SystemExit as e:
        if e.code not in (None, 0):
            msg = f"the script exited with status {e.code!r}" + (
                " (an argparse usage error exits 2: check the arguments after --)" if e.code == 2 else "")
            _error(driver, RuntimeError(msg), protocol.SCRIPT)
            return 1
    except KeyboardInterrupt:
        return 130
    except CannotApply as e:
        _error(driver, e, protocol.TRANSFORM)
        return 1
    except BaseException as e:  # noqa: BLE001 - the script's failure, reported with its line
        _error(driver, e, protocol.OOM if is_oom(e) else protocol.SCRIPT)
        return 1
    driver.send("ended", steps=driver.steps, times_ms=driver.times if driver.phase == "measure" else [],
                losses=[float(t) for t in driver.losses])
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    from multiprocessing.connection import Client

    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    conn = Client(spec["address"], family="AF_UNIX", authkey=bytes.fromhex(spec["authkey"]))
    conn.send({"event": "hello", "rank": int(os.environ.get("RANK", "0")) if int(spec.get("nproc") or 1) > 1 else 0})
    driver = Driver(spec, conn)
    try:
        code = _run(driver)
    except (EOFError, OSError, BrokenPipeError):  # the parent went away: nothing to report to
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    try:
        conn.close()
    except OSError:
        pass
    # the script's own atexit work (loggers, loader workers) is not waited for
    os._exit(code)


if __name__ == "__main__":
    main()
