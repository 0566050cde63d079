"""Packaging: the top-level ``kernels/`` folder installs as ``t2fast.kernels``.

The PyPI project named ``kernels`` would clash with a top-level ``kernels`` package, so the
Triton kernels live in the repository's ``kernels/`` folder but are only importable as
``t2fast.kernels``.
"""
from setuptools import find_packages, setup

library = find_packages(include=["t2fast", "t2fast.*"])

setup(
    packages=library + ["t2fast.kernels"],
    package_dir={"t2fast.kernels": "kernels"},
    package_data={"t2fast": ["assets/**/*", "assets/*"],
                  "t2fast.kernels": ["configs/*.json", "configs/README.md"]},
    include_package_data=True,
)
