"""One settings object: SVFConfig and the configs built on it read back what they write, layer
ranges included, and the command line's flags are its fields."""
import dataclasses
import json

import pytest
import torch

import t2fast
from t2fast.models import random_tiny_llama
from t2fast.adapt import CEMConfig
from t2fast.config import BACKENDS, SVFConfig, SVFConfigError
from t2fast.mixtures import MixtureBounds
from t2fast.targets import layers_to_json, normalize_layers, resolve_targets
from t2fast.train import TrainConfig
from t2fast.vllm.config import T2Config

pytestmark = pytest.mark.usefixtures("one_thread")

LAYER_FORMS = [None, 2, (1, 3), [1, 3], "second_half"]

SVF_VALUES = dict(targets=["q_proj", "model.layers.*.mlp.*"], layers=(1, 3), backend="torch",
                  hybrid=False, cache_dir="svd", allow_other_model=True, max_alpha_abs=2.0,
                  max_alpha_l1=3.0, mix_in_kernel=True, keep_dense=False,
                  deterministic=False, max_experts=3, merge_cache_bytes=1 << 20)
#: T2Config's mix_in_kernel and keep_dense are always True (the vLLM layers' way).
T2_VALUES = dict(SVF_VALUES, experts=["a.safetensors", "b.safetensors"], max_experts=3,
                 hybrid=True, keep_dense=True)
TRAIN_VALUES = dict(
    task="classify", method="svf", objective="sft", parameterization="official",
    official_init=0.3, targets=["q_proj"], layers=(1, 3), lora_rank=2, lora_alpha=4.0,
    lora_dropout=0.1, steps=7, batch_size=3, samples_per_prompt=2, lr=1e-3, min_lr_ratio=0.1,
    warmup_steps=1, weight_decay=0.01, betas=(0.8, 0.9), grad_clip=0.5, kl_coef=0.2,
    unparsable_penalty=-0.1, temperature=0.7, top_k=5, max_new_tokens=9,
    logprob_reduction="mean", baseline="mean", log_kl=True, train_n=12, eval_split="test",
    eval_n=5, eval_every=2, eval_batch_size=4, patience=3, seed=1, out="x/e.safetensors",
    log="x/log.jsonl", checkpoint="x/state.pt", resume=True, tensorboard="tb", progress=False,
    backend="triton", threads=2, cache_dir="svd", extra={"command": "t2fast train"})
CEM_VALUES = dict(population=8, elite_ratio=0.5, iterations=3, init_mean=[0.25, 0.75],
                  init_std=0.2, min_std=0.01, clamp=(-0.5, 1.5), normalize=True, per_layer=True,
                  keep_best=False, include_mean=False, patience=2, seed=4,
                  objective="accuracy", space="absolute", keep_base=False, check_shots=3)


@pytest.mark.parametrize("cls, values, fixed", [
    (SVFConfig, SVF_VALUES, ()),
    (T2Config, T2_VALUES, ("mix_in_kernel", "keep_dense")),
    (TrainConfig, TRAIN_VALUES, ("method",)),
    (CEMConfig, CEM_VALUES, ()),
], ids=lambda v: getattr(v, "__name__", ""))
def test_every_field_round_trips_through_json(cls, values, fixed):
    fields = {f.name for f in dataclasses.fields(cls)}
    assert set(values) == fields, "give every field a value"
    default = cls(task="arith") if cls is TrainConfig else cls()
    changed = {n for n in fields if getattr(default, n) != values[n]}
    assert changed == fields - set(fixed), "every field but the fixed ones differs from default"
    cfg = cls(**values)
    if cls is TrainConfig:
        cfg.validate()
    again = cls.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("layers", LAYER_FORMS + [range(1, 3)], ids=repr)
@pytest.mark.parametrize("cls", [SVFConfig, T2Config, TrainConfig],
                         ids=lambda c: c.__name__)
def test_layer_selection_round_trips_as_the_same_layers(cls, layers):
    model = random_tiny_llama(0, num_hidden_layers=4)
    kw = dict(task="arith") if cls is TrainConfig else {}
    cfg = cls(layers=layers, **kw)
    again = cls.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert normalize_layers(again.layers) == normalize_layers(layers)
    assert resolve_targets(model, "all", again.layers) == resolve_targets(model, "all", layers)


def test_train_config_keeps_a_layer_range_a_range():
    """layers=(1, 3) once reloaded as the explicit layers [1, 3] (layer 3 instead of 2)."""
    d = TrainConfig(task="arith", layers=(1, 3)).to_dict()
    assert d["layers"] == {"start": 1, "stop": 3}
    assert TrainConfig.from_dict(d).layers == (1, 3)
    assert TrainConfig.from_dict({"task": "arith", "layers": [1, 3]}).layers == [1, 3]


def test_layer_forms():
    assert normalize_layers(range(2, 5)) == (2, 5)
    assert normalize_layers(range(0, 6, 2)) == [0, 2, 4]
    assert normalize_layers({"start": 1, "stop": 2}) == (1, 2)
    assert normalize_layers({3, 1}) == [1, 3]
    assert normalize_layers((0, 1, 2)) == [0, 1, 2]
    assert layers_to_json((0, 2)) == {"start": 0, "stop": 2} and layers_to_json([0, 2]) == [0, 2]
    for bad, pattern in [((3, 1), r"0 <= start < stop"), ([], "layers must be"),
                         (True, "layers must be"), ([1, -1], "layers must be"),
                         ({"start": 1}, "layers must be")]:
        with pytest.raises(ValueError, match=pattern):
            normalize_layers(bad)


@pytest.mark.parametrize("field, value, pattern", [
    ("targets", [], "non-empty list"),
    ("layers", (2, 2), "start < stop"),
    ("backend", "cuda", "backend must be one of"),
    ("hybrid", 1, "True or False"),
    ("deterministic", "no", "True or False"),
    ("cache_dir", 3, "None .* or False"),
    ("max_alpha_l1", 0, r"MixtureBounds\.max_l1"),
])
def test_bad_settings_name_the_field(field, value, pattern):
    with pytest.raises(SVFConfigError, match=pattern) as err:
        SVFConfig(**{field: value})
    assert str(err.value).startswith("SVFConfig.")
    with pytest.raises(SVFConfigError, match=r"T2Config\.") as err:
        T2Config(**{field: value})


def test_t2config_refuses_what_the_vllm_layers_cannot_do():
    for field in ("mix_in_kernel", "keep_dense"):
        with pytest.raises(SVFConfigError, match=f"T2Config.{field}=False: .*patch_model only"):
            T2Config(**{field: False})
    with pytest.raises(SVFConfigError, match="raise max_experts"):
        T2Config(experts=["a", "b"], max_experts=1)
    with pytest.raises(ValueError, match="unknown settings"):
        SVFConfig.from_dict({"layer": 1})


def test_build_and_replace():
    base = SVFConfig(targets="mlp", layers=(0, 2))
    assert SVFConfig.build(base, backend="torch") == dataclasses.replace(base, backend="torch")
    assert SVFConfig.build(base, targets=None, layers=None) == base
    built = SVFConfig.build(None, MixtureBounds(1, 2), layers=[0])
    assert built.mixture_bounds == MixtureBounds(1, 2) and built.layers == [0]
    with pytest.raises(TypeError, match=r"no settings \['bakend'\]"):
        SVFConfig.build(base, bakend="torch")
    with pytest.raises(TypeError, match="config must be a t2fast T2Config"):
        T2Config.build(base)
    with pytest.raises(TypeError, match="mixture_bounds must be"):
        SVFConfig.build(None, (4, 8))


def test_patch_model_takes_a_config_and_keywords_replace_it(svd_cache):
    model = random_tiny_llama(0, num_hidden_layers=2)
    cfg = SVFConfig(targets="mlp", layers=[1], backend="torch", hybrid=False,
                    cache_dir=svd_cache, max_alpha_abs=2.0)
    h = t2fast.patch_model(model, config=cfg, progress=False, layers=(0, 1))
    assert h.config == dataclasses.replace(cfg, layers=(0, 1))
    assert h.targets == [f"model.layers.0.mlp.{p}" for p in ("gate_proj", "up_proj",
                                                             "down_proj")]
    assert h.mixture_bounds == MixtureBounds(2.0, 8.0) and not h.hybrid
    h.restore()
    with pytest.raises(TypeError, match="no settings"):
        t2fast.patch_model(model, config=cfg, progress=False, keep_dence=False)
    assert not any(type(m).__name__ == "SVFLinear" for m in model.modules())


def test_command_line_flags_are_svf_fields():
    from t2fast import cli
    fields = {f.name for f in dataclasses.fields(SVFConfig)}
    assert set(cli.SVF_FLAGS) <= fields
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    seen = 0
    for name, sp in sub.choices.items():
        for action in sp._actions:
            if action.dest in fields:
                seen += 1
                assert action.option_strings == [cli.SVF_FLAGS[action.dest][0]], (name, action)
                if action.dest == "backend":
                    assert tuple(action.choices) == BACKENDS
    assert seen >= 6


@pytest.mark.vllm    # t2fast.serve.cli.vllm_arguments parses vLLM's own flags
def test_serve_flags_reach_the_engine_settings(tmp_path):
    from t2fast.cli import build_parser
    from t2fast.serve.cli import vllm_arguments
    from t2fast.vllm.config import CONFIG_KEY

    args, extra = build_parser().parse_known_args(
        ["serve", "tiny", "--layers", "1:3", "--targets", "q_proj,down_proj", "--backend",
         "torch", "--hybrid", "--svd-cache-dir", str(tmp_path), "--max-alpha-abs", "2",
         "--order-dependent"])
    out = vllm_arguments(args, extra)
    sent = json.loads(out[out.index("--additional-config") + 1])[CONFIG_KEY]
    cfg = T2Config.from_dict(sent)
    assert sent["layers"] == {"start": 1, "stop": 3} and cfg.layers == (1, 3)
    assert cfg == T2Config(targets=["q_proj", "down_proj"], layers=(1, 3), backend="torch",
                           hybrid=True, cache_dir=str(tmp_path), max_alpha_abs=2.0,
                           deterministic=False)
    default = vllm_arguments(*build_parser().parse_known_args(["serve", "tiny"]))
    assert json.loads(default[default.index("--additional-config") + 1])[CONFIG_KEY][
        "deterministic"] is True


def test_backends_defined_once():
    assert t2fast.ops.BACKENDS is BACKENDS
    with pytest.raises(ValueError, match="backend must be one of"):
        t2fast.ops.resolve_backend("cuda", torch.device("cpu"))


@pytest.mark.parametrize("cls", [TrainConfig, CEMConfig], ids=lambda c: c.__name__)
def test_unknown_fields_are_named(cls):
    from t2fast.train.config import ConfigError
    with pytest.raises(ConfigError, match=rf"unknown {cls.__name__} fields: \['learning_rate'\]"):
        cls.from_dict({"learning_rate": 1})
