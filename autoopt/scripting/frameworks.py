"""Hugging Face `Trainer` and Lightning `Trainer` scripts, optimized through their own knobs.

A script that trains with a framework's Trainer builds the model, the optimizer, the
DataLoaders and the autocast region inside the framework. The framework has arguments for
most of what autoopt changes, and a person would change those arguments rather than wrap the
framework's internals, so the child (autoopt.scripting.driver) applies a configuration
through them and the patch edits them:

- `detect(source)`: which framework a script trains with, read statically (an import of the
  framework and a call of its Trainer / TrainingArguments, or of a subclass the script
  defines), None for a plain loop (a script that only imports transformers for a model or a
  tokenizer is a plain loop);
- `plan(framework, cfg, caps)` -> KnobPlan: the argument values (`kwargs`), the ExecConfig
  fields they apply (`fields`) and, for every other field the configuration sets, how it is
  applied instead (`reasons`); `knobs()` / `knob_exprs()` / `unexpressed()` are its parts;
- `install(cfg, caps, record)`: run in the child before the script; the framework's argument
  class is patched when its module is imported (a `sys.meta_path` finder wraps the module's
  loader; a module already imported is patched at once), so the knobs are set in every
  TrainingArguments / Lightning Trainer the script builds, before the framework validates
  them, and the user's other arguments are left as they are. The user's call site is recorded
  in `record["framework"]`. Returns the set of ExecConfig fields the framework applies; the
  generic hooks of the driver apply the rest.

Mapping (transformers `TrainingArguments`):
  amp_dtype bfloat16 -> bf16=True (on a CPU also use_cpu=True: transformers refuses bf16
  without a bf16 GPU unless told the run is on the CPU); float16 -> fp16=True (with
  grad_scaler: accelerate scales fp16 losses itself); compile_mode -> torch_compile=True,
  torch_compile_mode, torch_compile_backend (and transformers' own TF32 switch that comes with
  torch_compile on Ampere is held off, so the compile variant changes only compilation);
  optimizer_impl fused -> optim="adamw_torch_fused" when the Trainer's optimizer is AdamW
  ("adamw_torch" / "adamw_torch_fused", transformers' default) — another `optim`, or an
  optimizer the script hands to the Trainer, leaves the field to the generic hook;
  matmul_precision high -> tf32=True on CUDA (on a CPU TF32 does not exist: the driver's
  process-wide setting stands); dataloader -> dataloader_num_workers / dataloader_pin_memory /
  dataloader_persistent_workers / dataloader_prefetch_factor (intra_op_threads is the
  driver's process-wide thread count; non_blocking on CUDA -> the accelerator_config's
  non_blocking).
Mapping (Lightning `Trainer`):
  amp_dtype bfloat16 -> precision="bf16-mixed"; float16 -> precision="16-mixed" on CUDA (with
  its GradScaler); on a CPU Lightning turns "16-mixed" into bf16, so fp16 stays with the
  generic hook; cudnn_benchmark -> benchmark=. Lightning's Trainer has no compile argument:
  torch.compile is applied by the driver's generic hook on the LightningModule (compile_mode
  is never in the returned set for Lightning), as are the optimizer implementation (the
  optimizer is the script's, from configure_optimizers()), channels_last and the DataLoader
  settings (the script's own DataLoaders).

The returned set can shrink while the script runs: when the script's own arguments show the
framework cannot apply a field after all (TrainingArguments(optim="sgd"), a Trainer given its
own optimizer, a Lightning precision plugin), install() removes it from that same set object
and says why in `record["framework"]["dropped"]`; whoever applies the rest reads the set when
the object appears (the optimizer's construction or first step), not a copy made before.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.abc
import inspect
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from autoopt.types import Capabilities, ExecConfig
from autoopt.userfiles import is_user_file

TRANSFORMERS = "transformers"
LIGHTNING = "lightning"
FRAMEWORKS = (TRANSFORMERS, LIGHTNING)

# the Trainer's optimizer names that are torch's AdamW (fused or not): optim="adamw_torch_fused" keeps the optimizer
ADAMW_OPTIMS = frozenset({"adamw_torch", "adamw_torch_fused"})
DEFAULT_OPTIM = "adamw_torch"  # what a plan assumes when the script's `optim` is not known (AdamW either way)

# the framework's own default of each knob (and the values it means): an argument at its default is left out of a patch
_DEFAULTS = {
    TRANSFORMERS: {"bf16": (False,), "fp16": (False,), "use_cpu": (False,), "tf32": (None,), "torch_compile": (False,),
                   "torch_compile_mode": (None,), "torch_compile_backend": (None, "inductor"),
                   "dataloader_num_workers": (0,), "dataloader_pin_memory": (True,),
                   "dataloader_persistent_workers": (False,), "dataloader_prefetch_factor": (None,)},
    LIGHTNING: {"precision": (None, "32-true"), "benchmark": (None,)},
}
_LOADER_ARGS = {"num_workers": "dataloader_num_workers", "pin_memory": "dataloader_pin_memory",
                "persistent_workers": "dataloader_persistent_workers", "prefetch_factor": "dataloader_prefetch_factor"}

# the modules whose classes install() patches, per framework
_TA_MODULE = "transformers.training_args"
_HF_TRAINER_MODULE = "transformers.trainer"
_PL_TRAINER_MODULES = ("lightning.pytorch.trainer.trainer", "pytorch_lightning.trainer.trainer")


@dataclasses.dataclass(frozen=True)
class KnobPlan:
    """A configuration in one framework's arguments. `kwargs`: argument name -> value;
    `fields`: the ExecConfig fields those arguments apply; `reasons`: every other field the
    configuration sets -> how it is applied instead (the driver's generic hook or its
    process-wide settings) or why it cannot be."""

    framework: str
    kwargs: dict[str, Any]
    fields: frozenset[str]
    reasons: dict[str, str]

    def exprs(self) -> dict[str, str]:
        """The arguments as Python expressions for a patch, those at the framework's default left out."""
        defaults = _DEFAULTS[self.framework]
        return {name: repr(value) for name, value in self.kwargs.items()
                if not any(value is d or (type(value) is type(d) and value == d) for d in defaults.get(name, ()))}


# ---------------------------------------------------------------------------- detection
# trl's trainers and configs subclass transformers' Trainer and TrainingArguments (SFTTrainer, ...)
_HF_ROOTS = ("transformers", "trl")
_PL_ROOTS = ("lightning", "pytorch_lightning")


def detect(source: str) -> Optional[str]:
    """"transformers" when the script builds a Hugging Face TrainingArguments / Trainer (or a
    subclass), "lightning" when it builds a Lightning Trainer, None otherwise (a plain loop,
    also one that imports transformers only for a model or a tokenizer, or a file that does
    not parse)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    aliases = _import_aliases(tree)
    if not aliases:
        return None
    kinds: dict[str, str] = {}  # local class name -> framework, for `class MyTrainer(Trainer)`
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for base in node.bases:
                kind = _framework_of(_dotted(base), aliases, kinds)
                if kind:
                    kinds[node.name] = kind
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            kind = _framework_of(_dotted(node.func), aliases, kinds)
            if kind:
                found.add(kind)
    if TRANSFORMERS in found:
        return TRANSFORMERS
    return LIGHTNING if LIGHTNING in found else None


def _import_aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> the dotted framework name it stands for (`L` -> "lightning",
    `TA` -> "transformers.TrainingArguments")."""
    roots = _HF_ROOTS + _PL_ROOTS
    out: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in roots:
                    if a.asname:
                        out[a.asname] = a.name
                    else:
                        out[a.name.split(".")[0]] = a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] in roots:
                for a in node.names:
                    out[a.asname or a.name] = f"{node.module}.{a.name}"
    return out


def _dotted(node: ast.AST) -> Optional[str]:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return ".".join(reversed(parts))


def _framework_of(name: Optional[str], aliases: dict[str, str], kinds: dict[str, str]) -> Optional[str]:
    if not name:
        return None
    head, _, rest = name.partition(".")
    if head in kinds and not rest:
        return kinds[head]
    if head not in aliases:
        return None
    full = aliases[head] + ("." + rest if rest else "")
    root, last = full.split(".")[0], full.rsplit(".", 1)[-1]
    if root in _HF_ROOTS and (last.endswith("TrainingArguments") or last.endswith("Trainer")):
        return TRANSFORMERS
    if root in _PL_ROOTS and last == "Trainer":
        return LIGHTNING
    return None


# ---------------------------------------------------------------------------- knobs
def plan(framework: str, cfg: ExecConfig, caps: Capabilities, *, optim: Optional[str] = None) -> KnobPlan:
    """`cfg` in `framework`'s arguments (see the module docstring for the mapping). `optim`:
    the TrainingArguments' optimizer name when known (None: transformers' default, AdamW)."""
    if framework == TRANSFORMERS:
        return _plan_transformers(cfg, caps, optim or DEFAULT_OPTIM)
    if framework == LIGHTNING:
        return _plan_lightning(cfg, caps)
    raise ValueError(f"unknown framework {framework!r}: one of {', '.join(FRAMEWORKS)}")


def knobs(framework: str, cfg: ExecConfig, caps: Capabilities, *, optim: Optional[str] = None) -> dict[str, Any]:
    """The framework's argument values that apply `cfg` (what `plan` says)."""
    return dict(plan(framework, cfg, caps, optim=optim).kwargs)


def knob_exprs(framework: str, cfg: ExecConfig, caps: Capabilities, *, site: Optional[dict] = None) -> dict[str, str]:
    """The same as Python expressions for the patch ({"bf16": "True", "optim":
    "'adamw_torch_fused'"}), arguments at the framework's default left out. `site`: the
    `record["framework"]` a run of the script wrote; its `optim` and `dropped` fields are
    honoured (a field the run could not apply through the framework is not written here)."""
    site = site or {}
    p = plan(framework, cfg, caps, optim=site.get("optim"))
    exprs = p.exprs()
    for field in site.get("dropped") or {}:
        for name in _ARGS_OF_FIELD.get(framework, {}).get(field, ()):
            exprs.pop(name, None)
    return exprs


def unexpressed(framework: str, cfg: ExecConfig, caps: Capabilities, *, optim: Optional[str] = None) -> dict[str, str]:
    """ExecConfig field -> why `framework`'s arguments do not apply it and what does."""
    return dict(plan(framework, cfg, caps, optim=optim).reasons)


# which arguments carry which ExecConfig field (for dropping a field from a patch)
_ARGS_OF_FIELD = {
    TRANSFORMERS: {"optimizer_impl": ("optim",), "amp_dtype": ("bf16", "fp16", "use_cpu"),
                   "compile_mode": ("torch_compile", "torch_compile_mode", "torch_compile_backend"),
                   "matmul_precision": ("tf32",), "dataloader": (*_LOADER_ARGS.values(), "accelerator_config")},
    LIGHTNING: {"amp_dtype": ("precision",), "cudnn_benchmark": ("benchmark",)},
}

_GENERIC = "the driver's generic hook applies it"
_PROCESS = "a process-wide setting the driver applies before the script"


def _plan_transformers(cfg: ExecConfig, caps: Capabilities, optim: str) -> KnobPlan:
    kw: dict[str, Any] = {}
    fields: set[str] = set()
    why: dict[str, str] = {}
    cpu = caps.device_type != "cuda"
    _hf_amp(cfg, cpu, kw, fields, why)
    if cfg.compile_mode:
        kw.update(torch_compile=True, torch_compile_mode=None if cfg.compile_mode == "default" else cfg.compile_mode,
                  torch_compile_backend=cfg.compile_backend)
        fields.update({"compile_mode", "compile_backend"})
    if cfg.optimizer_impl == "fused" and optim in ADAMW_OPTIMS:
        kw["optim"] = "adamw_torch_fused"
        fields.add("optimizer_impl")
    elif cfg.optimizer_impl == "fused":
        why["optimizer_impl"] = (f"the Trainer's optimizer is optim={optim!r}, not AdamW, so "
                                 f"optim='adamw_torch_fused' would change the optimizer; {_GENERIC}")
    elif cfg.optimizer_impl:
        why["optimizer_impl"] = f"TrainingArguments has no {cfg.optimizer_impl} optimizer switch; {_GENERIC}"
    if cfg.matmul_precision == "high" and not cpu:
        kw["tf32"] = True
        fields.add("matmul_precision")
    elif cfg.matmul_precision:
        why["matmul_precision"] = ("TF32 is a CUDA math mode (tf32=True fails elsewhere); " if cpu else
                                   f"TrainingArguments has no matmul precision {cfg.matmul_precision!r}; ") + _PROCESS
    if cfg.dataloader:
        loader = {k: v for k, v in cfg.dataloader.items() if v is not None}
        kw.update({arg: loader[key] for key, arg in _LOADER_ARGS.items() if key in loader})
        if loader.get("non_blocking") and not cpu:
            kw["accelerator_config"] = {"non_blocking": True}
        fields.add("dataloader")
    _generic_rest(cfg, fields, why, channels="TrainingArguments has no memory-format argument")
    return KnobPlan(TRANSFORMERS, kw, frozenset(fields), why)


def _hf_amp(cfg: ExecConfig, cpu: bool, kw: dict[str, Any], fields: set[str], why: dict[str, str]) -> None:
    if cfg.amp_dtype == "bfloat16":
        kw.update(bf16=True, fp16=False)
        if cpu:
            kw["use_cpu"] = True
        fields.add("amp_dtype")
    elif cfg.amp_dtype == "float16":
        kw.update(fp16=True, bf16=False)
        fields.add("amp_dtype")
        if cfg.grad_scaler:
            fields.add("grad_scaler")
    elif cfg.amp_dtype:
        why["amp_dtype"] = f"TrainingArguments has no autocast dtype {cfg.amp_dtype!r}; {_GENERIC}"


def _plan_lightning(cfg: ExecConfig, caps: Capabilities) -> KnobPlan:
    kw: dict[str, Any] = {}
    fields: set[str] = set()
    why: dict[str, str] = {}
    cuda = caps.device_type == "cuda"
    if cfg.amp_dtype == "bfloat16":
        kw["precision"] = "bf16-mixed"
        fields.add("amp_dtype")
    elif cfg.amp_dtype == "float16" and cuda:
        kw["precision"] = "16-mixed"
        fields.add("amp_dtype")
        if cfg.grad_scaler:
            fields.add("grad_scaler")
    elif cfg.amp_dtype:
        why["amp_dtype"] = (f"Lightning's precision={'16-mixed'!r} runs bf16 on a CPU, not {cfg.amp_dtype}; "
                            if cfg.amp_dtype == "float16" else
                            f"Lightning has no precision for {cfg.amp_dtype!r}; ") + _GENERIC
    if cfg.cudnn_benchmark is not None:
        kw["benchmark"] = bool(cfg.cudnn_benchmark)
        fields.add("cudnn_benchmark")
    if cfg.compile_mode:
        why["compile_mode"] = ("Lightning's Trainer has no compile argument; the driver's generic hook compiles "
                               "the LightningModule (the patch writes torch.compile(model))")
    if cfg.optimizer_impl:
        why["optimizer_impl"] = f"the optimizer is the script's own, from configure_optimizers(); {_GENERIC}"
    if cfg.dataloader:
        why["dataloader"] = f"the DataLoaders are the script's own (the patch edits their calls); {_GENERIC}"
    if cfg.matmul_precision:
        why["matmul_precision"] = _PROCESS
    _generic_rest(cfg, fields, why, channels="Lightning's Trainer has no memory-format argument")
    return KnobPlan(LIGHTNING, kw, frozenset(fields), why)


def _generic_rest(cfg: ExecConfig, fields: set[str], why: dict[str, str], *, channels: str) -> None:
    if cfg.channels_last:
        why["channels_last"] = f"{channels}; {_GENERIC}"
    if cfg.cudnn_benchmark is not None and "cudnn_benchmark" not in fields:
        why["cudnn_benchmark"] = _PROCESS
    if cfg.num_threads:
        why["num_threads"] = _PROCESS


# ---------------------------------------------------------------------------- install (the child)
def install(cfg: ExecConfig, caps: Capabilities, record: dict, *, framework: Optional[str] = None) -> set[str]:
    """Set `cfg` through the framework's own arguments in every TrainingArguments (transformers)
    or Trainer (Lightning) the script builds from now on, and record the first one's call site
    in `record["framework"]`: {"kind", "call", "file", "line", "function", "direct" (the call is
    the script's own, not one a library makes for it), "optim" (transformers: the Trainer's
    optimizer name), "kwargs" (the arguments set, as expressions), "dropped" (field -> why)}.
    `framework`: "transformers" | "lightning"; None reads it from `record["script"]` (`detect`).
    Returns the ExecConfig fields the framework applies (see the module docstring: the set
    shrinks when the script's own arguments rule a field out)."""
    if framework is None:
        script = record.get("script")
        if not script:
            raise ValueError("install() needs framework= or record['script'] to detect it from")
        framework = detect(Path(script).read_text(encoding="utf-8", errors="replace"))
        if framework is None:
            return set()
    applied = set(plan(framework, cfg, caps).fields)
    # installed for a configuration without knobs too (the baseline): the call site is recorded for the patch
    state = _State(framework, cfg, caps, record, applied)
    if framework == TRANSFORMERS:
        patches = {_TA_MODULE: state.patch_training_args, _HF_TRAINER_MODULE: state.patch_hf_trainer}
    else:
        patches = {name: state.patch_pl_trainer for name in _PL_TRAINER_MODULES}
    _ImportPatcher.add(patches)
    return applied


class _State:
    """What install() set up for one script: the configuration, the live set of applied fields,
    the record of the call site."""

    def __init__(self, framework: str, cfg: ExecConfig, caps: Capabilities, record: dict, applied: set[str]):
        self.framework = framework
        self.cfg = cfg
        self.caps = caps
        self.record = record
        self.applied = applied
        self.dropped: dict[str, str] = {}

    # -- bookkeeping
    def drop(self, field: str, reason: str) -> None:
        if field in self.applied:
            self.applied.discard(field)
            self.dropped[field] = reason
            site = self.record.get("framework")
            if isinstance(site, dict):
                site["dropped"] = dict(self.dropped)

    def note_site(self, obj: Any, call: str, kwargs: dict[str, Any], extra: dict[str, Any]) -> None:
        if isinstance(self.record.get("framework"), dict):
            return
        site = _call_site(obj)
        exprs = {k: repr(v) for k, v in kwargs.items()}
        self.record["framework"] = {"kind": self.framework, "call": call, **site, **extra,
                                    "kwargs": exprs, "dropped": dict(self.dropped)}

    # -- transformers
    def patch_training_args(self, module) -> None:
        cls = getattr(module, "TrainingArguments", None)
        post = getattr(cls, "__post_init__", None)
        if post is None or getattr(post, "_autoopt_framework", False):
            return
        state = self

        @functools.wraps(post)
        def __post_init__(args, *a, **k):
            if not state.set_training_args(args):
                return post(args, *a, **k)
            with _Tf32Held(module):
                return post(args, *a, **k)

        __post_init__._autoopt_framework = True
        cls.__post_init__ = __post_init__

    def set_training_args(self, args) -> bool:
        """The knobs set on a TrainingArguments before transformers validates it; True when
        transformers' own TF32 switch for torch_compile must be held off."""
        optim = getattr(args, "optim", None)
        optim = str(getattr(optim, "value", optim)) if optim is not None else DEFAULT_OPTIM
        p = plan(TRANSFORMERS, self.cfg, self.caps, optim=optim)
        for field, reason in p.reasons.items():
            if field in self.applied:
                self.drop(field, reason)
        known = _fields_of(args)
        kwargs = dict(p.kwargs)
        for field, names in _ARGS_OF_FIELD[TRANSFORMERS].items():
            missing = [n for n in names if n in kwargs and n not in known]
            if missing:
                self.drop(field, f"this transformers' TrainingArguments has no {', '.join(missing)} "
                                 f"argument; {_GENERIC}")
                for n in names:
                    kwargs.pop(n, None)
        user_compile = bool(getattr(args, "torch_compile", False))
        for name, value in kwargs.items():
            if name == "accelerator_config":
                value = _merge_accelerator_config(getattr(args, name, None), value)
            setattr(args, name, value)
        self.note_site(args, "TrainingArguments", kwargs, {"optim": optim})
        return bool(kwargs.get("torch_compile")) and not user_compile and getattr(args, "tf32", None) is None

    def patch_hf_trainer(self, module) -> None:
        cls = getattr(module, "Trainer", None)
        init = cls.__dict__.get("__init__") if cls is not None else None
        if init is None or getattr(init, "_autoopt_framework", False):
            return
        state = self
        sig = inspect.signature(init)

        @functools.wraps(init)
        def __init__(trainer, *args, **kwargs):
            try:
                bound = sig.bind_partial(trainer, *args, **kwargs).arguments
            except TypeError:  # the call is wrong: the Trainer says so itself
                bound = {}
            optimizers = bound.get("optimizers") or (None, None)
            if (isinstance(optimizers, (tuple, list)) and optimizers and optimizers[0] is not None) \
                    or bound.get("optimizer_cls_and_kwargs") is not None:
                state.drop("optimizer_impl", "the script gives the Trainer its own optimizer (optimizers= / "
                                             f"optimizer_cls_and_kwargs=), which TrainingArguments' optim does "
                                             f"not choose; {_GENERIC}")
            return init(trainer, *args, **kwargs)

        __init__._autoopt_framework = True
        cls.__init__ = __init__

    # -- lightning
    def patch_pl_trainer(self, module) -> None:
        cls = getattr(module, "Trainer", None)
        init = cls.__dict__.get("__init__") if cls is not None else None
        if init is None or getattr(init, "_autoopt_framework", False):
            return
        state = self

        @functools.wraps(init)
        def __init__(trainer, *args, **kwargs):
            return init(trainer, *args, **state.set_pl_kwargs(trainer, kwargs))

        __init__._autoopt_framework = True
        cls.__init__ = __init__

    def set_pl_kwargs(self, trainer, kwargs: dict[str, Any]) -> dict[str, Any]:
        p = plan(LIGHTNING, self.cfg, self.caps)
        knobs_ = dict(p.kwargs)
        if "precision" in knobs_ and _has_precision_plugin(kwargs.get("plugins")):
            self.drop("amp_dtype", "the script gives the Trainer a precision plugin (plugins=), which precision= "
                                   f"would contradict; {_GENERIC}")
            knobs_.pop("precision")
        out = {**kwargs, **knobs_}
        self.note_site(trainer, "Trainer", knobs_, {})
        return out


def _fields_of(args) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(args)) if dataclasses.is_dataclass(args) else frozenset()


def _merge_accelerator_config(current, wanted: dict) -> Any:
    """The script's accelerator_config (dict, AcceleratorConfig or None) with `wanted` set in it."""
    if current is None:
        return dict(wanted)
    if isinstance(current, dict):
        return {**current, **wanted}
    if isinstance(current, (str, Path)):  # a JSON file, as transformers reads it, then the wanted keys
        return {**json.loads(Path(current).read_text(encoding="utf-8")), **wanted}
    for key, value in wanted.items():
        setattr(current, key, value)
    return current


def _has_precision_plugin(plugins) -> bool:
    items = plugins if isinstance(plugins, (list, tuple)) else [plugins]
    return any(p is not None and not isinstance(p, str) and any(c.__name__.endswith("Precision")
                                                                for c in type(p).__mro__) for p in items)


class _Tf32Held:
    """transformers turns TF32 on with torch_compile on an Ampere GPU unless told tf32=False
    (and tf32=False turns cuDNN's TF32 off too). While a TrainingArguments whose torch_compile
    is autoopt's validates itself, its module's enable_tf32 does nothing, so the compile
    variant changes compilation only."""

    def __init__(self, module):
        self.module = module
        self.saved = module.__dict__.get("enable_tf32")

    def __enter__(self):
        if self.saved is not None:
            self.module.enable_tf32 = lambda enable: None
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            self.module.enable_tf32 = self.saved
        return False


# ---------------------------------------------------------------------------- call sites
def _call_site(obj: Any) -> dict[str, Any]:
    """Where `obj` was constructed: the caller of its outermost constructor frame (an
    `__init__` / `__post_init__` whose receiver is `obj`) as {"file", "line", "function",
    "direct"}; when that caller is a library (HfArgumentParser, a Trainer building default
    arguments), the innermost frame of the user's code, with direct=False."""
    f = sys._getframe(1)
    outer = None
    while f is not None:
        code = f.f_code
        if code.co_name in ("__init__", "__post_init__") and code.co_argcount \
                and f.f_locals.get(code.co_varnames[0]) is obj:
            outer = f
        f = f.f_back
    caller = outer.f_back if outer is not None else sys._getframe(1)
    direct = caller is not None and is_user_file(caller.f_code.co_filename)
    while caller is not None and not is_user_file(caller.f_code.co_filename):
        caller = caller.f_back
    if caller is None:
        return {"file": None, "line": None, "function": None, "direct": False}
    return {"file": str(Path(caller.f_code.co_filename).resolve()), "line": caller.f_lineno,
            "function": caller.f_code.co_name, "direct": direct}


# ---------------------------------------------------------------------------- the import hook
class _PatchingLoader(importlib.abc.Loader):
    """A module's own loader, then `patch(module)` once the module has run."""

    def __init__(self, inner, patch: Callable):
        self._inner = inner
        self._patch = patch

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        self._patch(module)

    def __getattr__(self, name):  # get_source, get_filename, is_package, ... as the module's own loader
        return getattr(self._inner, name)


class _ImportPatcher(importlib.abc.MetaPathFinder):
    """A meta path finder that finds nothing itself: for a watched module it asks the finders
    after it and wraps the loader they return, so the module is patched right after it runs."""

    _instance: Optional["_ImportPatcher"] = None

    def __init__(self):
        self.patches: dict[str, Callable] = {}

    @classmethod
    def add(cls, patches: dict[str, Callable]) -> None:
        if cls._instance is None or cls._instance not in sys.meta_path:
            cls._instance = cls()
            sys.meta_path.insert(0, cls._instance)
        for name, patch in patches.items():
            module = sys.modules.get(name)
            if module is not None:
                patch(module)
            else:
                cls._instance.patches[name] = patch

    def find_spec(self, fullname, path, target=None):
        patch = self.patches.get(fullname)
        if patch is None:
            return None
        spec = _find_with(_others(self), fullname, path, target)
        if spec is None or spec.loader is None:
            return None
        self.patches.pop(fullname, None)
        spec.loader = _PatchingLoader(spec.loader, patch)
        return spec


def _others(finder) -> Iterable:
    return [f for f in sys.meta_path if f is not finder]


def _find_with(finders: Iterable, fullname: str, path, target):
    for f in finders:
        find = getattr(f, "find_spec", None)
        if find is None:
            continue
        spec = find(fullname, path, target)
        if spec is not None:
            return spec
    return None
