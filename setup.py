"""Packaging: two repository folders install inside the ``t2fast`` package.

- ``kernels/`` installs as ``t2fast.kernels``: the PyPI project named ``kernels`` would clash
  with a top-level ``kernels`` package, so the Triton kernels are only importable as
  ``t2fast.kernels``.
- ``experts/*.safetensors`` (the tiny world's shipped experts; ``experts/`` stays their source,
  beside their training logs) install as ``t2fast/assets/experts/``, next to the tiny model in
  ``t2fast/assets/tiny_llama/``. ``t2fast.models.tiny_expert(name)`` finds them in either place.
"""
from setuptools import find_packages, setup

library = find_packages(include=["t2fast", "t2fast.*"])

setup(
    packages=library + ["t2fast.kernels", "t2fast.assets.experts"],
    package_dir={"t2fast.kernels": "kernels", "t2fast.assets.experts": "experts"},
    package_data={"t2fast": ["assets/tiny_llama/*"],
                  "t2fast.kernels": ["configs/*.json", "configs/README.md"],
                  "t2fast.assets.experts": ["*.safetensors"]},
    include_package_data=False,
)
