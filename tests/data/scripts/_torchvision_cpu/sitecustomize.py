"""Lets torchvision's Python parts import beside the CPU build of torch (tests only).

torchvision's PyPI wheels are built against the CUDA build of torch: beside the CPU build their
C++ extension (`torchvision/_C.so`, the detection ops such as nms) cannot be loaded, and
`import torchvision` then fails at its first fake-kernel registration
(`operator torchvision::nms does not exist`). The corpus' torchvision-based scripts use only
`torchvision.datasets` and `torchvision.transforms`, pure Python, which need none of those ops.

torchvision itself is not in the test environment (installed there beside a CPU torch, it would
break `import transformers`, whose import chain loads it): scripts/test.sh installs the release
made for the installed torch into tests/.deps/torchvision, and the corpus entry's `env` puts this
folder and that one on PYTHONPATH for that script's runs only.

Loaded through PYTHONPATH as `sitecustomize`. Nothing happens until
something imports torchvision; then, and only if its extension really fails to load, the two
operator schemas torchvision's import registers fake kernels for without checking are declared
(declarations only: calling them still fails, as it would without the extension). Where the
extension loads (a CUDA build of torch), nothing is declared and torchvision is untouched.
Neither the scripts nor torchvision are edited.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from pathlib import Path


class _DeclareOpsFirst(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.submodule_search_locations:
            _declare_if_unloadable(Path(next(iter(spec.submodule_search_locations))))
        return spec


def _declare_if_unloadable(package_dir: Path) -> None:
    import torch

    lib = next(iter(sorted(package_dir.glob("_C*.so"))), None)
    if lib is not None:
        try:
            torch.ops.load_library(str(lib))
            return
        except OSError:
            pass
    global _LIB
    _LIB = torch.library.Library("torchvision", "DEF")
    _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


_LIB = None
sys.meta_path.insert(0, _DeclareOpsFirst())
