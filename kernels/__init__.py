"""Triton kernels of t2fast (installed as ``t2fast.kernels``). They know nothing of models.

One op per file, each with its kernel bodies, launcher and custom op:
    svf_matmul     ``y = U (S ⊙ z ⊙ (Vh x))`` per token (``torch.ops.t2fast.svf_matmul`` and
                   ``torch.ops.t2fast.svf_matmul_mix``)
    scaled_matmul  ``(A ⊙ scale) @ B``: the expand and the merge ``U diag(σ⊙z) Vh``
Shared code: :mod:`.tile_utils` (tile order, the reduction loop), :mod:`.configs` (launch plans,
shipped tables), :mod:`.launch` (interpreter, precision), :mod:`.aot` (sm_90 compile checks).
Call them through :mod:`t2fast.ops`, which validates inputs.
"""
