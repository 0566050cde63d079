"""t2fast: fast Transformer-Squared (SVF experts, per-request expert mixtures)."""
__version__ = "0.1.0"
