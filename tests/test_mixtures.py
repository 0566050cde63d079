"""t2fast.mixtures: the one mixture language (forms, bounds, errors), expert names, z range."""
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from t2fast.mixtures import (MixtureBounds, MixtureError, MixtureTypeError, check_expert_name,
                             check_z, normal_form, parse_mixture, place_normal_form)
from t2fast.safetensors_io import T2FileError

NAMES = ["math", "code"]


@pytest.mark.parametrize("spec, expected", [
    (None, [1, 0, 0]),
    ("base", [1, 0, 0]),
    ("code", [0, 0, 1]),
    ({"math": 0.25, "base": 0.75}, [0.75, 0.25, 0]),
    ({"base": 0}, [0, 0, 0]),                       # all zero, but asked for by naming base
    ([0.5, -0.5], [0, 0.5, -0.5]),
    ((1, 2), [0, 1, 2]),
    (torch.tensor([0.5, 0.5]), [0, 0.5, 0.5]),
    (np.array([0.5, 0.5]), [0, 0.5, 0.5]),
    ({"math": np.float32(0.5), "code": torch.tensor(0.5)}, [0, 0.5, 0.5]),
])
def test_forms(spec, expected):
    a = parse_mixture(spec, NAMES)
    assert a.dtype == torch.float32 and a.tolist() == expected


def test_per_layer_forms_agree():
    by_rows = parse_mixture([[1, 0], [0.5, 0.5]], NAMES, num_layers=2)
    by_name = parse_mixture({"math": [1, 0.5], "code": [0, 0.5]}, NAMES, num_layers=2)
    assert by_rows.shape == (2, 3) and torch.equal(by_rows, by_name)
    assert parse_mixture("math", NAMES, num_layers=3).tolist() == [[0, 1, 0]] * 3


def test_normal_form_round_trip():
    for spec in [{"math": 0.3}, [[1, 0], [0.5, 0.5]], {"base": 0}, {"base": 0.5, "code": 0.1}]:
        a = parse_mixture(spec, NAMES, num_layers=2, dtype=torch.float64)
        normal = normal_form(a, NAMES)
        assert torch.equal(parse_mixture(normal, NAMES, num_layers=2, dtype=torch.float64), a)
    assert normal_form(parse_mixture(None, NAMES), NAMES) is None
    assert normal_form(parse_mixture({"math": 0.3, "code": 0}, NAMES, dtype=torch.float64),
                       NAMES) == {"math": 0.3}


@pytest.mark.parametrize("spec, error, pattern", [
    ({"math": True}, MixtureTypeError, r"alpha\['math'\] must be a number, got True"),
    ([1, "0.5"], MixtureTypeError, r"alpha\[1\] must be a number, got '0.5'"),
    (3.0, MixtureTypeError, r"a mixture must be None"),
    ({1: 1.0}, MixtureTypeError, r"expert names must be strings, got 1"),
    ({"math": math.nan}, MixtureError, r"alpha\['math'\] must be finite, got nan"),
    ([math.inf, 0], MixtureError, r"alpha\[0\] must be finite, got inf"),
    ({"math": 1e30}, MixtureError, r"alpha\['math'\] = 1e\+30 is outside the bound \|α\| ≤ 4"),
    ({"base": -4.5}, MixtureError, r"alpha\['base'\] = -4.5 is outside"),
    ([3, 3], MixtureError, r"Σ\|α\| = 6 is outside the bound Σ\|α\| ≤ 5"),
    ({}, MixtureError, r"all zero.*'base'"),
    ([0, 0], MixtureError, r"all zero"),
    ({"math": 0.0}, MixtureError, r"all zero"),
    ("physics", MixtureError, r"unknown expert 'physics'; loaded experts: \['math', 'code'\]"),
    ([1], MixtureError, r"alpha has 1 weights; expected 2"),
    ([[1, 0]], MixtureError, r"per-layer mixtures are not available here"),
    ({"math": [1, 0]}, MixtureError, r"per-layer weights.*not available here"),
])
def test_errors_name_the_value_and_bound(spec, error, pattern):
    with pytest.raises(error, match=pattern) as info:
        parse_mixture(spec, NAMES, bounds=MixtureBounds(max_abs=4, max_l1=5))
    assert isinstance(info.value, ValueError)


def test_per_layer_errors_and_bounds():
    with pytest.raises(MixtureError, match=r"shape \(2, 2\).*got 3 rows"):
        parse_mixture([[1, 0]] * 3, NAMES, num_layers=2)
    with pytest.raises(MixtureError, match=r"2 decoder layers"):
        parse_mixture({"math": [1, 0, 0]}, NAMES, num_layers=2)
    with pytest.raises(MixtureError, match=r"Σ\|α\| = 7 \(layer 1\)"):
        parse_mixture([[1, 0], [3.5, 3.5]], NAMES, num_layers=2, bounds=MixtureBounds(4, 6))
    with pytest.raises(MixtureError, match=r"all zero in layer 1"):
        parse_mixture([[1, 0], [0, 0]], NAMES, num_layers=2)
    assert parse_mixture([3.9, -3.9], NAMES, bounds=MixtureBounds(4, 8)).tolist() == \
        pytest.approx([0, 3.9, -3.9])
    assert parse_mixture([10, 0], NAMES, bounds=MixtureBounds(max_abs=16, max_l1=16))[1] == 10


def test_bounds_argument_type():
    with pytest.raises(TypeError, match="bounds must be a MixtureBounds"):
        parse_mixture("math", NAMES, bounds={"max_abs": 4})


@pytest.mark.parametrize("kwargs", [dict(max_abs=0), dict(max_l1=math.inf),
                                    dict(max_abs=True), dict(max_l1="8"), dict(max_abs=10 ** 400)])
def test_bounds_are_checked(kwargs):
    with pytest.raises(ValueError, match="MixtureBounds"):
        MixtureBounds(**kwargs)


@pytest.mark.parametrize("weight, shown", [
    (10 ** 400, r"an integer of about 401 digits"),
    (-10 ** 5000, r"an integer of about 5001 digits"),          # beyond Python's str() limit
    (Fraction(10 ** 400, 3), r"Fraction\(1000\d+\.\.\. \(\d+ more characters\)"),
    (float("inf"), r"inf"),
], ids=["10**400", "-10**5000", "Fraction", "inf"])
def test_weights_beyond_float_are_mixture_errors_naming_the_value(weight, shown):
    for spec, where in (([weight, 0], r"alpha\[0\]"), ({"code": weight}, r"alpha\['code'\]"),
                        ([[0, weight]], r"alpha\[0\]\[1\]"), ({"math": [weight]}, r"\[0\]")):
        with pytest.raises(MixtureError, match=rf"{where} must be finite, got {shown}$") as info:
            parse_mixture(spec, NAMES, num_layers=1)
        assert not isinstance(info.value, OverflowError)


@pytest.mark.parametrize("weights", [
    [np.float32(0.1), np.float32(0.7)], [np.float16(0.5), np.int8(1)], np.array([0.1, 0.7]),
    [torch.tensor(0.1), torch.tensor(0.7, dtype=torch.float64)], [np.array(0.1), 0.7],
])
def test_numpy_and_tensor_scalars_read_like_python_numbers(weights):
    expected = parse_mixture([float(w) for w in weights], NAMES)
    assert torch.equal(parse_mixture(weights, NAMES), expected)
    as_dict = dict(zip(NAMES, weights))
    assert torch.equal(parse_mixture(as_dict, NAMES), expected)
    assert torch.equal(parse_mixture([list(weights)] * 2, NAMES, num_layers=2),
                       expected.expand(2, 3))
    with pytest.raises(MixtureTypeError, match=r"alpha\[0\] must be a number, got True"):
        parse_mixture([np.bool_(True), 0.5], NAMES)


@pytest.mark.parametrize("spec", [
    {"x" * 10 ** 6: 1}, {"math": "y" * 10 ** 6}, ["z" * 10 ** 6, 1], "w" * 10 ** 6,
    3.5 + 10 ** 6 * 1j, {"math": [1] * 10 ** 5},
], ids=["name", "string weight", "string in list", "long name", "complex", "long list"])
def test_messages_stay_short_whatever_the_input(spec):
    with pytest.raises(MixtureError) as info:
        parse_mixture(spec, NAMES, num_layers=2)
    assert len(str(info.value)) < 400, str(info.value)[:500]


@pytest.mark.parametrize("name", ["math", "arith-v2", "a.b_c", "0x"])
def test_valid_names(name):
    assert check_expert_name(name) == name


@pytest.mark.parametrize("name, pattern", [
    ("base", "reserved"), ("../../etc/passwd", "not valid"), ("", "not valid"),
    ("a b", "not valid"), ("-x", "not valid"), ("x" * 65, "not valid"), (3, "string"),
])
def test_invalid_names(name, pattern):
    with pytest.raises(MixtureError, match=pattern):
        check_expert_name(name)


def test_check_z():
    check_z("q", torch.tensor([0.5, 1.0, -8.0]))
    for z, pattern in [(torch.tensor([1.0, math.nan]), "NaN or Inf"),
                       (torch.tensor([1e30]), r"\|z\| = 1e\+30, outside the allowed range "
                                              r"\[-8, 8\]"),
                       (torch.ones(2, 2), "1-D float tensor"),
                       (torch.ones(3, dtype=torch.int64), "1-D float tensor")]:
        with pytest.raises(T2FileError, match=pattern):
            check_z("model.layers.0.mlp.down_proj", z, where="expert file 'x'")
    with pytest.raises(T2FileError, match=r"\[-2, 2\]"):
        check_z("q", torch.tensor([3.0]), bound=2)


def test_bounds_travel_to_the_vllm_settings():
    from t2fast.vllm.config import CONFIG_KEY, T2Config
    from t2fast.vllm.llm import engine_args
    args = engine_args("m", hf_overrides={"architectures": ["LlamaForCausalLM"]},
                       mixture_bounds=MixtureBounds(max_abs=2, max_l1=3))
    cfg = T2Config.from_dict(args["additional_config"][CONFIG_KEY])
    assert cfg.mixture_bounds == MixtureBounds(2, 3)
    with pytest.raises(ValueError, match=r"max_alpha_abs / max_alpha_l1: MixtureBounds\.max_abs"):
        T2Config(max_alpha_abs=-1)


# ---- every front end speaks the same language ----------------------------------------------
LAYERS = 2
#: (spec as given to SVFHandle.set_mixture, the same as a vLLM request's extra_args["t2"]).
FRONT_END_FORMS = [
    (None, None),
    ("base", {"expert": "base"}),
    ("code", {"expert": "code"}),
    ("code", "code"),
    ({"math": 0.25, "base": 0.75}, {"alpha": {"math": 0.25, "base": 0.75}}),
    ({"base": 0}, {"alpha": {"base": 0}}),
    ([0.5, -0.5], {"alpha": [0.5, -0.5]}),
    ((1, 2), {"alpha": [1, 2]}),
    (torch.tensor([0.3, 0.7]), {"alpha": [0.3, 0.7]}),
    ([[1, 0], [0.5, 0.5]], {"alpha": [[1, 0], [0.5, 0.5]]}),
    ({"math": [1, 0.5], "code": 0.2}, {"alpha": {"math": [1, 0.5], "code": 0.2}}),
    ({"math": True}, {"alpha": {"math": True}}),
    ([1, "0.5"], {"alpha": [1, "0.5"]}),
    ({1: 1.0}, {"alpha": {1: 1.0}}),
    ({"math": math.nan}, {"alpha": {"math": math.nan}}),
    ({"math": 1e30}, {"alpha": {"math": 1e30}}),
    ([3, 3], {"alpha": [3, 3]}),
    ({}, {"alpha": {}}),
    ([0, 0], {"alpha": [0, 0]}),
    ("physics", {"expert": "physics"}),
    ([1], {"alpha": [1]}),
    ([[1, 0]] * 3, {"alpha": [[1, 0]] * 3}),
    ({"math": [1, 0, 0]}, {"alpha": {"math": [1, 0, 0]}}),
    ([[1, 0], [0, 0]], {"alpha": [[1, 0], [0, 0]]}),
]


@pytest.fixture(scope="module")
def handle(tmp_path_factory):
    import t2fast
    from t2fast.experts import Expert
    from t2fast.models import random_tiny_llama

    model = random_tiny_llama(0, num_hidden_layers=LAYERS)
    h = t2fast.patch_model(model, targets="mlp", backend="torch", progress=False,
                           cache_dir=tmp_path_factory.mktemp("svd"),
                           mixture_bounds=MixtureBounds(max_abs=4, max_l1=5))
    h.add_experts([Expert.random(n, h.decomposition.factors, seed=i)
                   for i, n in enumerate(NAMES)])
    return h


@pytest.mark.parametrize("spec, request_t2", FRONT_END_FORMS,
                         ids=[repr(s)[:40] for s, _ in FRONT_END_FORMS])
def test_hf_handle_and_vllm_front_end_agree(handle, spec, request_t2):
    """The same α from SVFHandle.alpha and from the vLLM front end + the runner's placement in
    bank columns, or the same error message."""
    from t2fast.vllm.requests import T2RequestError, normalize_spec

    assert handle.num_layers == LAYERS and handle.expert_names == NAMES
    hf_error = vllm_error = None
    try:
        hf = handle.alpha(spec)
    except MixtureError as exc:
        hf_error = str(exc)
    try:
        normal = normalize_spec(request_t2, NAMES, LAYERS, handle.mixture_bounds)
    except T2RequestError as exc:
        vllm_error = str(exc)
    assert (hf_error is None) == (vllm_error is None), (hf_error, vllm_error)
    if hf_error is not None:
        assert vllm_error.startswith(f"extra_args['t2']: {hf_error}"), vllm_error
        return
    rows = {"math": 2, "code": 1}          # the engine's bank rows need not follow bank order
    placed, missing = place_normal_form(None if normal is None else normal["alpha"], rows,
                                        LAYERS, 4)
    assert missing == []
    assert torch.equal(placed[:, [0, 2, 1]], hf)
    assert placed[:, 3].abs().sum() == 0


def test_place_normal_form_reports_missing_experts():
    alpha, missing = place_normal_form({"base": 0.5, "gone": 1.0, "math": [0.1, 0.2]},
                                       {"math": 1}, 2, 3)
    assert missing == ["gone"]
    assert alpha.dtype == torch.float32 and torch.equal(
        alpha, torch.tensor([[0.5, 0.1, 0], [0.5, 0.2, 0]]))
    assert place_normal_form(None, {}, 1, 2)[0].tolist() == [[1, 0]]
