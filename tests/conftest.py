"""Shared test setup.

Kernel tests run the Triton kernels through Triton's interpreter on the CPU unless
TRITON_INTERPRET is set explicitly (e.g. TRITON_INTERPRET=0 on a CUDA machine runs them on the
GPU). The variable must be set before ``triton.jit`` decorates the kernels, hence here.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def device() -> torch.device:
    """CUDA when present (kernels compiled), else the CPU (kernels interpreted)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def svd_cache(tmp_path):
    """A fresh SVD cache folder per test."""
    return tmp_path / "svd"


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: small ops (and LAPACK's SVD) slow down badly when a
    2-core CPU is shared with other work."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
