"""ExportError, and reading the errors the exporters and onnxruntime raise: the operator
they name (`operator_from_error`) and their innermost message."""
from __future__ import annotations

import re
from typing import Optional

from autoopt.errors import UserError


class ExportError(UserError):
    """The model cannot be exported to ONNX, or the exported graph disagrees with PyTorch."""


_OP_PATTERNS = (
    re.compile(r"Exporting the operator '([^']+)' to ONNX"),  # TorchScript exporter
    re.compile(r"No ONNX function found for <OpOverload\(op='([^']+)'"),  # dynamo: no translation
    re.compile(r"call_function\[target=torch\.ops\.([\w.]+?)\.(?:default|[A-Za-z_]\w*)\]"),  # dynamo: node failed
    re.compile(r"Could not find an implementation for (\w+)\(\d+\) node"),  # onnxruntime: no kernel
)


def _chain(exc: BaseException) -> list[BaseException]:
    out = []
    while exc is not None and exc not in out and len(out) < 20:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def operator_from_error(exc: BaseException) -> Optional[str]:
    """The operator an exporter (or onnxruntime) error names, as `aten::name`, or None."""
    texts = [str(e) for e in _chain(exc)]
    for pattern in _OP_PATTERNS:
        for text in texts:
            m = pattern.search(text)
            if m:
                op = m.group(1)
                if "::" not in op and "." in op:  # aten._linalg_svd -> aten::_linalg_svd
                    ns, _, rest = op.partition(".")
                    op = f"{ns}::{rest}"
                return op
    return None


def _short(exc: BaseException, limit: int = 240) -> str:
    text = " ".join(str(exc).split())
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _summary(exc: BaseException) -> str:
    """The innermost meaningful message of an exporter error."""
    chain = _chain(exc)
    for e in reversed(chain):
        if str(e).strip():
            return f"{type(e).__name__}: {_short(e)}"
    return type(exc).__name__
