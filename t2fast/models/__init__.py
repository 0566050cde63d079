"""Models of the bundled tiny world.

``load_tiny()`` returns the trained tiny Llama and its tokenizer in one call;
``tiny_model_path()`` is the folder to hand to ``from_pretrained`` or vLLM;
``tiny_expert(name)`` / ``tiny_experts()`` give the shipped SVF experts' files;
``random_tiny_llama()`` builds a randomly initialised model of the same shape for tests.
"""
from .tiny import (BOS_ID, EOS_ID, PAD_ID, TINY_CONFIG, VOCAB_SIZE, build_char_tokenizer,
                   generate_greedy, load_tiny, random_tiny_llama, save_tiny, tiny_config,
                   tiny_expert, tiny_experts, tiny_model_path)

__all__ = ["BOS_ID", "EOS_ID", "PAD_ID", "TINY_CONFIG", "VOCAB_SIZE", "build_char_tokenizer",
           "generate_greedy", "load_tiny", "random_tiny_llama", "save_tiny", "tiny_config",
           "tiny_expert", "tiny_experts", "tiny_model_path"]
