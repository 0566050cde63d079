"""What the vLLM integration test asks of the engines (shared by the engine script and the
test, which computes the Hugging Face reference for the same requests)."""
MAX_TOKENS = 16

FILE_EXPERTS = ("math", "code")          # loaded at engine start (bank order)
OBJECT_EXPERTS = ("neg", "ones")         # loaded at run time as Expert objects

PROMPTS = [
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "x",
    "Count: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30",
    "abc",
]

# A batch mixing base, two named experts and α mixtures (by name and in bank order), prompts
# of different lengths, and the same prompt with and without an expert.
BATCH = [
    (PROMPTS[0], None),
    (PROMPTS[1], {"expert": "math"}),
    (PROMPTS[2], {"expert": "code"}),
    (PROMPTS[3], {"alpha": {"math": 0.3, "code": 0.7}}),
    (PROMPTS[4], {"alpha": [0.5, -0.25]}),
    (PROMPTS[1], None),
]

PREFIX_PROMPT = ("In a quiet village by the sea, the old lighthouse keeper wrote every evening "
                 "about the ships he saw, the weather, and the birds that rested on the rail. "
                 "Today he wrote:")
# Served one after the other: base fills the cache, the experts must not reuse its KV; the
# repeated "math" must reuse its own.
PREFIX_SPECS = [None, {"expert": "math"}, {"expert": "code"}, {"expert": "math"}]

BAD_SPECS = [
    {"expert": "nope"},
    {"alpha": [0.5]},
    {"alpha": {"math": float("nan")}},
    {"alpha": [0.5, float("inf")]},
    {"alpha": "math"},
    {"experts": "math"},
    {"expert": "math", "alpha": [1.0, 0.0]},
    {"alpha": {"math": "high"}},
]

OBJECT_REQUESTS = [
    (PROMPTS[0], {"expert": "neg"}),
    (PROMPTS[1], {"expert": "ones"}),
    (PROMPTS[3], {"alpha": {"neg": 0.5, "math": 0.5}}),
]


def hf_spec(spec):
    """The same mixture in the form t2fast.patch_model's handle takes."""
    if spec is None:
        return None
    if "expert" in spec:
        return spec["expert"]
    a = spec["alpha"]
    return dict(zip(FILE_EXPERTS, a)) if isinstance(a, list) else a


# A subset of matrices: parts of the fused qkv and gate_up layers stay dense.
SUBSET_TARGETS = ["q_proj", "up_proj", "down_proj"]
SUBSET_LAYERS = [1]
SUBSET_BATCH = [
    (PROMPTS[0], None),
    (PROMPTS[1], {"expert": "math"}),
    (PROMPTS[3], {"alpha": {"math": 0.5, "code": 0.5}}),
    (PROMPTS[1], {"expert": "code"}),
]
