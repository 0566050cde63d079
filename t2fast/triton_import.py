"""Triton is optional: t2fast imports it, with its kernel modules, only when the triton backend
first runs.

``import t2fast``, ``patch_model`` and the torch backend never import Triton, so they work where
it is not installed (Triton has Linux wheels only). :func:`t2fast.ops.resolve_backend` turns
``"auto"`` into the torch backend there, and asking for ``"triton"`` raises the ImportError of
:func:`require_triton`, which says what to do; where Triton is installed it calls
:func:`register_custom_ops` before the triton backend runs.
"""
from __future__ import annotations

import importlib

# Plain module flags, not functools.cache: torch.compile traces the checks below on every call of
# an op and reads a flag without a graph break.
_triton_found: bool | None = None
_custom_ops_registered = False


def triton_available() -> bool:
    """True when ``import triton`` works (the first call imports it)."""
    global _triton_found
    if _triton_found is None:
        try:
            import triton  # noqa: F401
            _triton_found = True
        except ImportError:
            _triton_found = False
    return _triton_found


def require_triton(what: str = "backend='triton'") -> None:
    """Raise an ImportError naming ``what`` unless Triton can be imported."""
    if not triton_available():
        raise ImportError(f"{what} needs the triton package, which is not installed (Triton has "
                          f"Linux wheels: pip install triton). Use backend='torch', or 'auto', "
                          f"which runs the torch backend without Triton.")


#: The modules that register t2fast's custom ops (``torch.ops.t2fast.*``) when imported.
CUSTOM_OP_MODULES = ("t2fast.ops.custom_ops",)


def register_custom_ops() -> None:
    """Import Triton and the kernels, registering the custom ops (an ImportError without
    Triton, see :func:`require_triton`)."""
    global _custom_ops_registered
    if not _custom_ops_registered:
        require_triton()
        for name in CUSTOM_OP_MODULES:
            importlib.import_module(name)
        _custom_ops_registered = True


class LazyModule:
    """Stands for the module ``name`` (one that imports Triton) and imports it on first attribute
    access, after :func:`require_triton`: ``scaled_matmul_kernels =
    LazyModule("t2fast.kernels.scaled_matmul")`` at the top of a module,
    ``scaled_matmul_kernels.launch_scaled_matmul(...)`` where the triton backend runs."""

    def __init__(self, name: str):
        self.name = name

    def __getattr__(self, attr: str):
        require_triton(f"t2fast's Triton kernels ({self.name})")
        return getattr(importlib.import_module(self.name), attr)
