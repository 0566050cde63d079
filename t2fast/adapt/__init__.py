"""Two-pass self-adaptation: prompt-based dispatch (A), a classification expert (B), few-shot
CEM over mixture weights (C), any of them after a restatement of the question (:class:`Restated`),
and the two-pass engine.

    from t2fast.adapt import PromptDispatch, TwoPassEngine
    engine = TwoPassEngine(handle, tokenizer)
    result = engine.run(prompts, PromptDispatch(handle, tokenizer))
"""
from .cem import (CEMConfig, CEMResult, FewShotScorer, cem_search, fewshot_cem,
                  fewshot_examples, transform)
from .classifier import ClassifierDispatch, train_classifier
from .engine import FixedMixture, TwoPassEngine, TwoPassResult, uniform_alpha
from .prompt import (PROMPT_TEMPLATES, PromptDispatch, paper_style_prompt, parse_category,
                     tiny_world_prompt)
from .restate import (Restated, restated_examples, restated_questions, restated_task,
                      restatement_prompt)

__all__ = [
    "CEMConfig", "CEMResult", "ClassifierDispatch", "FewShotScorer", "FixedMixture",
    "PROMPT_TEMPLATES",
    "PromptDispatch", "Restated", "TwoPassEngine", "TwoPassResult", "cem_search", "fewshot_cem",
    "fewshot_examples", "paper_style_prompt", "parse_category", "restated_examples",
    "restated_questions", "restated_task", "restatement_prompt", "tiny_world_prompt",
    "train_classifier", "transform", "uniform_alpha",
]
