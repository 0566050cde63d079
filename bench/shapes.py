"""Model dimensions for benchmarks, from one registry.

Each entry maps a projection to its weight shape (m, n) = (out_features, in_features).
"""


def llama_projections(hidden: int, intermediate: int, heads: int, kv_heads: int) -> dict:
    head_dim = hidden // heads
    kv = kv_heads * head_dim
    return {
        "q": (hidden, hidden), "k": (kv, hidden), "v": (kv, hidden), "o": (hidden, hidden),
        "gate": (intermediate, hidden), "up": (intermediate, hidden), "down": (hidden, intermediate),
    }


MODELS = {
    # Llama-3-8B: hidden 4096, intermediate 14336, 32 heads, 8 KV heads (32 layers).
    "llama3-8b": dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8, layers=32),
    # Mistral-7B has the same projection shapes as Llama-3-8B.
    "mistral-7b": dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8, layers=32),
    # Qwen2.5-7B: hidden 3584, intermediate 18944, 28 heads, 4 KV heads (28 layers).
    "qwen2.5-7b": dict(hidden=3584, intermediate=18944, heads=28, kv_heads=4, layers=28),
    # Scaled down for CPU runs (same ratios as Llama-3-8B at 1/16 of the width).
    "cpu-small": dict(hidden=256, intermediate=896, heads=4, kv_heads=1, layers=2),
}


def projections(model: str) -> dict:
    d = MODELS[model]
    return llama_projections(d["hidden"], d["intermediate"], d["heads"], d["kv_heads"])


# The ops of one decoder layer: matrices that read the same input run as one group.
LAYER_GROUPS = {"qkv": ("q", "k", "v"), "o": ("o",), "gate_up": ("gate", "up"),
                "down": ("down",)}


def groups(model: str) -> dict:
    """Each op of a layer → its slices' shapes [(m_i, n), ...] (one shared n)."""
    p = projections(model)
    return {g: [p[name] for name in names] for g, names in LAYER_GROUPS.items()}


def group_dims(slices) -> tuple[int, int, int]:
    """(Σ m_i, n, R = Σ min(m_i, n)) of a group's slices: the key of its kernel plan."""
    n = slices[0][1]
    return sum(m for m, _ in slices), n, sum(min(m, n) for m, _ in slices)
