"""Packaging: the tiny world's shipped experts install inside the ``t2fast`` package.

``experts/*.safetensors`` (their source is the repository's ``experts/`` folder, beside their
training logs) install as ``t2fast/assets/experts/``, next to the tiny model in
``t2fast/assets/tiny_llama/``; ``t2fast.models.tiny_expert(name)`` finds them in either place.
The Triton kernels live in ``t2fast/kernels/`` (a top-level ``kernels`` folder would shadow the
PyPI package ``kernels``, which transformers imports, wherever the checkout is on ``sys.path``).
"""
from setuptools import find_packages, setup

library = find_packages(include=["t2fast", "t2fast.*"])

setup(
    packages=library + ["t2fast.assets.experts"],
    package_dir={"t2fast.assets.experts": "experts"},
    package_data={"t2fast": ["assets/tiny_llama/*"],
                  "t2fast.kernels": ["configs/*.json", "configs/*.md"],
                  "t2fast.assets.experts": ["*.safetensors"]},
    include_package_data=False,
)
