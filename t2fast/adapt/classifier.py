"""Strategy B — a classification expert.

An SVF expert trained with the same RL recipe on the classification task (``t2fast train --task
classify``) is loaded into the bank and used **for pass 1 only**; pass 2 uses the chosen
category's expert (base for "other"), exactly as in prompt-based dispatch.
"""
from __future__ import annotations

from pathlib import Path

from ..experts import Expert
from .prompt import PromptDispatch


class ClassifierDispatch(PromptDispatch):
    """Strategy B: like :class:`PromptDispatch`, with the classification expert for pass 1.

    ``classifier`` is the name of a loaded expert, or an :class:`Expert` / file path to load.
    ``categories`` defaults to every other loaded expert, labelled by its name.
    """

    name = "classifier"

    def __init__(self, handle, tokenizer, classifier, categories=None, **kwargs):
        if isinstance(classifier, (str, Path)) and str(classifier) not in handle.expert_names:
            if not Path(classifier).exists():
                raise ValueError(f"classification expert {str(classifier)!r} is neither a loaded "
                                 f"expert ({handle.expert_names}) nor a file")
            before = set(handle.expert_names)
            handle.add_experts([classifier])
            classifier = next(n for n in handle.expert_names if n not in before)
        elif isinstance(classifier, Expert):
            if classifier.name not in handle.expert_names:
                handle.add_experts([classifier])
            classifier = classifier.name
        self.classifier = str(classifier)
        if categories is None:
            categories = [n for n in handle.expert_names if n != self.classifier]
        super().__init__(handle, tokenizer, categories, **kwargs)
        if self.classifier in self.categories.values():
            raise ValueError("the classification expert cannot also be a pass-2 expert")

    @property
    def pass1_mixture(self):
        return self.classifier


def train_classifier(out: str, **overrides):
    """Train the classification expert with the trainer (``task="classify"``)."""
    from ..train import TrainConfig, train
    return train(TrainConfig(task="classify", out=out, **overrides))
