"""Benchmarks run compiled Triton kernels on CUDA and the interpreter on the CPU (an explicit
``TRITON_INTERPRET`` in the environment wins)."""
import os

import torch

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
