"""Bad training configurations give clear errors."""
import pytest

from t2fast.train import TrainConfig
from t2fast.train.config import ConfigError


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("field,value,message", [
    ("task", "nope", "unknown task"),
    ("method", "qlora", "expected one of"),
    ("objective", "ppo", "expected one of"),
    ("parameterization", "tanh", "expected one of"),
    ("steps", 0, ">= 1"),
    ("batch_size", -3, ">= 1"),
    ("samples_per_prompt", 1.5, "integer"),
    ("lr", 0.0, "> 0"),
    ("lr", float("nan"), "finite"),
    ("kl_coef", -0.1, ">= 0"),
    ("grad_clip", -1.0, ">= 0"),
    ("temperature", 0.0, "> 0"),
    ("min_lr_ratio", 2.0, "<= 1"),
    ("unparsable_penalty", -3.0, ">= -1"),
    ("betas", (0.9,), "two numbers"),
    ("targets", " ", "expected all, attention, mlp"),
    ("targets", [], "non-empty list"),
    ("eval_split", "dev", "expected one of"),
    ("patience", 0, ">= 1"),
    ("backend", "cuda", "backend"),
    ("logprob_reduction", "max", "expected one of"),
    ("out", "experts/arith.pt", ".safetensors"),
])
def test_bad_field(field, value, message):
    cfg = TrainConfig(**{"task": "arith", field: value})
    with pytest.raises(ConfigError, match=message) as err:
        cfg.validate()
    assert f"TrainConfig.{field}" in str(err.value)


def test_cross_field_errors():
    with pytest.raises(ConfigError, match="samples_per_prompt >= 2"):
        TrainConfig(task="arith", baseline="mean", samples_per_prompt=1).validate()
    with pytest.raises(ConfigError, match="only applies to method='svf'"):
        TrainConfig(task="arith", method="lora", parameterization="official").validate()
    with pytest.raises(ConfigError, match="smaller than steps"):
        TrainConfig(task="arith", steps=5, warmup_steps=5).validate()
    with pytest.raises(ConfigError, match="checkpoint path"):
        TrainConfig(task="arith", resume=True).validate()
    assert isinstance(ConfigError("x"), ValueError)


def test_good_config_round_trips():
    cfg = TrainConfig(task="classify", targets=["q_proj", "down_proj"], layers=(0, 2),
                      out="x/classify.safetensors", unparsable_penalty=-0.1).validate()
    d = cfg.to_dict()
    assert d["targets"] == ["q_proj", "down_proj"] and d["betas"] == [0.9, 0.999]
    again = TrainConfig.from_dict(d)
    assert again.task == "classify" and again.betas == (0.9, 0.999)
    assert str(cfg.log_path) == "x/classify.safetensors.log.jsonl"
    assert str(cfg.checkpoint_path) == "x/classify.safetensors.state.pt"
    with pytest.raises(ConfigError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({"task": "arith", "learning_rate": 1})


def test_trainer_rejects_bad_inputs():
    from t2fast.models import build_char_tokenizer, random_tiny_llama
    from t2fast.train import Trainer
    def small():
        return random_tiny_llama(0, num_hidden_layers=1, hidden_size=64, intermediate_size=128,
                                 num_attention_heads=4, num_key_value_heads=2)
    m = small()
    with pytest.raises(ConfigError, match="both model and tokenizer"):
        Trainer(TrainConfig(task="arith"), m, None)
    with pytest.raises(ConfigError, match="batch_size=8: a step takes that many"):
        Trainer(TrainConfig(task="arith", train_n=4, batch_size=8, cache_dir=False), m,
                build_char_tokenizer())
    with pytest.raises(ValueError, match="no nn.Linear module matches"):
        Trainer(TrainConfig(task="arith", targets="nothing_proj", cache_dir=False),
                small(), build_char_tokenizer())
