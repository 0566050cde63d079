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
