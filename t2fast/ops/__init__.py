"""Public SVF operators: ``svf_matmul``, ``svf_matmul_mix``, ``svf_group``, ``svf_group_mix``
(with ``stack_group``, the layout they read), ``mix_experts``, ``svf_merge``.

See :mod:`t2fast.ops.dispatch` for the contract and backends, :mod:`t2fast.ops.reference` for the
pure-torch oracle.
"""
from .dispatch import (BACKENDS, mix_experts, resolve_backend, stack_group, svf_group,
                       svf_group_mix, svf_matmul, svf_matmul_mix, svf_merge)

__all__ = ["BACKENDS", "mix_experts", "resolve_backend", "stack_group", "svf_group",
           "svf_group_mix", "svf_matmul", "svf_matmul_mix", "svf_merge"]
