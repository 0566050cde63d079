"""Training of SVF experts (REINFORCE + KL, or SFT) and the LoRA baseline.

    from t2fast.train import TrainConfig, train
    result = train(TrainConfig(task="arith", out="experts/arith.safetensors"))

Modules: :mod:`.config` (validated dataclass), :mod:`.rollout` (answer budgets, teacher batches,
completion logits; generation itself is :mod:`t2fast.generation`), :mod:`.objectives` (losses),
:mod:`.parameterization` (plain / official z), :mod:`.policy` (SVF z or PEFT LoRA),
:mod:`.trainer` (the loop), :mod:`.evaluate`.
"""
from ..generation import Rollout, generate, generate_texts
from .config import ConfigError, TrainConfig
from .evaluate import EvalResult, evaluate, mcnemar_exact, wilson_interval
from .objectives import (advantages, full_vocab_kl, reinforce_kl_loss, sequence_logprobs,
                         sft_loss, token_logprobs)
from .parameterization import ZParameterization
from .policy import LoRAPolicy, SVFPolicy, make_policy
from .rollout import completion_logits, max_new_tokens_for, teacher_batch
from .trainer import Trainer, TrainResult, train

__all__ = [
    "ConfigError", "EvalResult", "LoRAPolicy", "Rollout", "SVFPolicy", "TrainConfig",
    "TrainResult", "Trainer", "ZParameterization", "advantages", "completion_logits",
    "evaluate", "full_vocab_kl", "generate", "generate_texts", "make_policy",
    "max_new_tokens_for", "mcnemar_exact", "reinforce_kl_loss", "sequence_logprobs", "sft_loss",
    "teacher_batch", "token_logprobs", "train", "wilson_interval",
]
