"""Triton kernels of t2fast (installed as ``t2fast.kernels``).

Kernel bodies (``svf_shrink``, ``scaled_matmul``) know nothing of models; :mod:`.launch` holds the
launch code and block-size choice. Call them through :mod:`t2fast.ops`, which validates inputs.
"""
