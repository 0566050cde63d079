"""t2fast: fast Transformer-Squared — SVF experts and per-request expert mixtures.

    import t2fast
    handle = t2fast.patch_model(model, experts=[...])

Operators live in :mod:`t2fast.ops`, the Triton kernels in :mod:`t2fast.kernels`.
"""
__version__ = "0.1.0"

from .decompose import SVDCache, SVDFactors, decompose_model  # noqa: E402
from .experts import Expert, load_expert  # noqa: E402
from .patching import SVFHandle, patch_model  # noqa: E402
from .runtime import ExpertBank, SVFRuntime  # noqa: E402
from .safetensors_io import T2FileError  # noqa: E402

__all__ = ["Expert", "ExpertBank", "SVDCache", "SVDFactors", "SVFHandle", "SVFRuntime",
           "T2FileError",
           "decompose_model", "load_expert", "patch_model"]

#: Subpackages reachable as attributes after ``import t2fast`` (``t2fast.tasks.get_task``),
#: imported on first use so that ``import t2fast`` stays cheap.
LAZY_SUBMODULES = ("adapt", "generation", "mixtures", "models", "official", "ops", "tasks",
                   "train", "vllm")


def __getattr__(name):
    if name in LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
