"""Triton kernels of t2fast (installed as ``t2fast.kernels``). They know nothing of models.

Kernel bodies and their launchers (``launch_*``), one module per kernel family:
    shrink_expand  ``y = U (S ⊙ z ⊙ (Vh x))`` per token for a group of 1-3 matrices reading one
                   input (a stacked shrink and a grouped expand: two launches per group)
    scaled_matmul  ``(A ⊙ scale) @ B``: the merge ``U diag(σ⊙z) Vh``
Shared code: :mod:`.tile_utils` (tile order, offsets, the reduction loop), :mod:`.plans`
(launch plans, shipped tables, deterministic plans), :mod:`.launch` (interpreter, precision,
64-bit offsets), :mod:`.aot` (sm_90 compile checks). Call them through :mod:`t2fast.ops`, which
validates inputs and registers the custom ops (``torch.ops.t2fast.*``).
"""
