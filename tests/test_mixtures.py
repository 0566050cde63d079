"""t2fast.mixtures: the one mixture language (forms, bounds, errors), expert names, z range."""
import math
import re
from fractions import Fraction

import numpy as np
import pytest
import torch

from t2fast.mixtures import (Mixture, MixtureBounds, MixtureError, MixtureTypeError,
                             check_expert_name, check_z, normal_form, parse_mixture)
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
    for spec in [{"math": 0.3}, [[1, 0], [0.5, 0.5]], {"base": 0}, {"base": 0.5, "code": 0.1},
                 {"base": 0, "math": [1.0, 0.0]}]:   # layer 1 zero: allowed as 'base' is named
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
    """The same α from SVFHandle.alpha and from the vLLM front end, its envelope read back by
    the worker and placed in bank columns, or the same error message."""
    from t2fast.vllm.frontend import T2RequestError, parse_request, worker_mixture

    assert handle.num_layers == LAYERS and handle.expert_names == NAMES
    hf_error = vllm_error = None
    try:
        hf = handle.alpha(spec)
    except MixtureError as exc:
        hf_error = str(exc)
    try:
        mixture = parse_request(request_t2, NAMES, LAYERS, handle.mixture_bounds)
    except T2RequestError as exc:
        vllm_error = str(exc)
    assert (hf_error is None) == (vllm_error is None), (hf_error, vllm_error)
    if hf_error is not None:
        assert vllm_error.startswith(f"extra_args['t2']: {hf_error}"), vllm_error
        return
    if not mixture.is_base:
        mixture = worker_mixture(mixture.envelope(), LAYERS, handle.mixture_bounds)
    rows = {"math": 2, "code": 1}          # the engine's bank rows need not follow bank order
    placed, missing = mixture.place(rows, LAYERS, 4)
    assert missing == []
    assert torch.equal(placed[:, [0, 2, 1]], hf)
    assert placed[:, 3].abs().sum() == 0
    assert torch.equal(handle.alpha(mixture), hf)    # a Mixture is a spec too


# --------------------------------------------------------------------------------------------
# The Mixture value
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [None, "base", {"base": 1.0}, {"base": 1, "math": 0}])
def test_mixture_of_the_base_model(spec):
    m = Mixture.parse(spec, NAMES)
    assert m == Mixture() and m.is_base and m.normal is None and m.key is None
    assert m.names == () and m.envelope() is None
    alpha, missing = m.place({}, 2, 3)
    assert alpha.tolist() == [[1, 0, 0]] * 2 and missing == []


def test_mixture_normal_form_key_and_names():
    forms = [{"expert": "math"}, "math", {"alpha": {"math": 1.0, "code": 0}},
             {"alpha": [1, 0]}, {"alpha": [[1, 0], [1, 0]]}, '{"alpha": {"math": 1}}']
    same = {Mixture.from_request(f, NAMES, 2) for f in forms}
    assert same == {Mixture((("math", 1.0),))}              # equal values hash equal
    m = Mixture.parse({"math": [1, 0.5], "code": 0.25, "base": 0}, NAMES, 2)
    assert m.normal == {"code": 0.25, "math": [1.0, 0.5]}
    assert m.key == '{"code":0.25,"math":[1.0,0.5]}' and m.names == ("code", "math")
    # the normal form parses back to the same value, in any bank order
    assert Mixture.parse(m.normal, ["code", "math"], 2) == m
    assert Mixture.parse(m, NAMES, 2) == m
    zero = Mixture.parse({"base": 0}, NAMES)
    assert zero.normal == {"base": 0.0} and zero.names == () and not zero.is_base
    assert Mixture.parse({"math": 0.5, "base": 0.5}, NAMES).names == ("math",)
    with pytest.raises(MixtureError, match="no layer count"):
        Mixture.parse(m, NAMES)                 # per-layer weights need the layer count
    with pytest.raises(MixtureError, match="unknown expert 'math'"):
        Mixture.parse(m, ["code"], 2)           # checked again against the bank it meets
    with pytest.raises(MixtureError, match="max_abs"):
        Mixture.parse(m, NAMES, 2, MixtureBounds(max_abs=0.75, max_l1=5))


def test_mixture_key_is_the_salt_key_of_before():
    """The key (and so the prefix-cache salt) of a mixture is the JSON of its normal form with
    sorted keys and no spaces, as the salts of earlier versions."""
    m = Mixture.from_request({"alpha": [0.3, 0.7]}, NAMES)
    assert m.key == '{"code":0.7,"math":0.3}'
    from t2fast.vllm.frontend import FrontEnd

    fe = FrontEnd(num_layers=2, max_experts=4)
    fe.add("math", "d1")
    fe.add("code", "d2")
    import hashlib
    import json

    h = hashlib.sha256(m.key.encode())
    h.update(json.dumps({"code": "d2", "math": "d1"}, sort_keys=True).encode())
    assert fe.salt(fe.parse({"alpha": [0.3, 0.7]})) == "t2fast-" + h.hexdigest()[:32]


def test_mixture_place_reports_missing_experts():
    m = Mixture.parse({"base": 0.5, "gone": 1.0, "math": [0.1, 0.2]}, ["math", "gone"], 2)
    alpha, missing = m.place({"math": 1}, 2, 3)
    assert missing == ["gone"]
    assert alpha.dtype == torch.float32 and torch.equal(
        alpha, torch.tensor([[0.5, 0.1, 0], [0.5, 0.2, 0]]))


def test_worker_serves_a_request_whose_expert_is_gone_with_the_base_model(caplog):
    """A vLLM worker never serves a mixture with one weight dropped (a lone expert would make
    z' = 0): a request whose expert was unloaded gets the base model, and the log says so."""
    pytest.importorskip("vllm")
    from types import SimpleNamespace

    from t2fast.vllm.config import T2Config
    from t2fast.vllm.runner import T2Runtime
    vc = SimpleNamespace(
        scheduler_config=SimpleNamespace(max_num_seqs=3, max_num_batched_tokens=64),
        model_config=SimpleNamespace(hf_config=SimpleNamespace(num_hidden_layers=2)),
        device_config=SimpleNamespace(device="cpu"))
    rt = T2Runtime(vc, T2Config(backend="torch", max_experts=2))
    assert rt.place_request(Mixture.parse({"base": 0.5, "gone": 0.5}, ["gone"], 2)) is None
    assert rt.place_request(Mixture.parse("gone", ["gone"], 2)) is None
    assert "'gone', which is no longer loaded; it is served with the base model" in caplog.text


def test_envelope_round_trip_and_forgeries():
    """The workers read only the front end's envelope, and bound its weights again: a value
    that skipped the front end never places an unchecked α."""
    m = Mixture.parse({"math": [1, 0.5], "code": 0.25}, NAMES, 2)
    env = m.envelope()
    assert env == {"alpha": {"code": 0.25, "math": [1.0, 0.5]}, "v": 1}
    assert Mixture.from_envelope(env, 2) == m
    assert Mixture.from_envelope({"alpha": {"other": 1.0}, "v": 1}, 2).names == ("other",)
    bounds = MixtureBounds(max_abs=4, max_l1=5)
    for bad, msg in [({"expert": "math"}, "not a mixture checked by the front end"),
                     ("math", "not a mixture checked by the front end"),
                     ({"alpha": [1, 0], "v": 1}, "not a mixture checked"),
                     ({"alpha": {}, "v": 1}, "not a mixture checked"),
                     ({"alpha": {"math": 1.0}}, "not a mixture checked"),
                     ({"alpha": {"math": 1.0}, "v": 1, "x": 0}, "not a mixture checked"),
                     ({"alpha": {"math": 1.0}, "v": 2}, "envelope version 2"),
                     ({"alpha": {"math": 1e9}, "v": 1}, "max_abs"),
                     ({"alpha": {"math": 3.0, "code": 3.0}, "v": 1}, "max_l1"),
                     ({"alpha": {"math": [1.0, 9.0]}, "v": 1}, "max_abs"),
                     ({"alpha": {"math": [1.0]}, "v": 1}, "2 decoder layers"),
                     ({"alpha": {"math": math.nan}, "v": 1}, "finite"),
                     ({"alpha": {"math": "1"}, "v": 1}, "number"),
                     ({"alpha": {"math": True}, "v": 1}, "number"),
                     ({"alpha": {"math": 0.0}, "v": 1}, "all zero"),
                     ({"alpha": {"m" * 10_000: 1.0}, "v": 1}, "is not valid"),
                     ({"alpha": {1: 1.0}, "v": 1}, "must be a string")]:
        with pytest.raises(MixtureError, match=re.escape(msg)) as err:
            Mixture.from_envelope(bad, 2, bounds)
        assert len(str(err.value)) < 400
    from t2fast.vllm.frontend import T2RequestError, worker_mixture

    with pytest.raises(T2RequestError, match=r"^extra_args\['t2'\]: .*not a mixture checked"):
        worker_mixture({"expert": "math"}, 2, bounds)


def test_request_vocabulary_helpers():
    from t2fast.mixtures import (check_request_keys, extract_spec, looks_like_request_key,
                                 profile_name, request_spec, xargs_value)

    assert [looks_like_request_key(k) for k in ("t2", "T2-Alpha", "t2_x", "alpha", 2)] == \
        [True, True, True, False, False]
    assert request_spec("t2", "math") == "math"
    assert request_spec("t2_alpha", [1, 0]) == {"alpha": [1, 0]}
    assert extract_spec({"t2_expert": "math"}) == (True, {"expert": "math"})
    assert extract_spec({"t2": "x", "other": 1}) == (True, "x") and extract_spec({}) == (
        False, None)
    assert profile_name("profile:fast") == "fast"
    assert [profile_name(v) for v in ("profile:", "prompt", None, 3)] == [None] * 4
    assert xargs_value({"alpha": {"math": 1}}) == '{"alpha": {"math": 1}}'
    assert xargs_value('{"x": 1}') == '{"x": 1}'
    with pytest.raises(MixtureError, match="t2_adapt is served by `t2fast serve`"):
        check_request_keys({"t2_adapt": "prompt"})
    for key in ("expert", "alpha"):         # a spec's field without its "t2" key
        with pytest.raises(MixtureError, match=f"'{key}' is read only inside 't2': give "
                                               f"{{'t2': {{'{key}': ...}}}} or {{'t2_{key}'"):
            check_request_keys({key: "math", "seed": 1})


#: The request vocabulary, spelled only in t2fast/mixtures.py.
VOCABULARY = {"t2", "t2_expert", "t2_alpha", "t2_adapt", "profile:", "profile", "v"}
#: Its fields, spelled only in t2fast/mixtures.py among the serving modules (a profile file's
#: own "alpha" field is another format's).
FIELDS = {"expert", "alpha", "adapt"}
#: The same spelling naming something else: (file, string).
NOT_VOCABULARY = {("vllm/layers.py", "t2_alpha")}    # the SVF layers' α-table buffer


def test_request_vocabulary_is_spelled_once():
    """No string constant of the package outside t2fast/mixtures.py is a request key, the
    profile prefix, or (in the vLLM and serving modules) a request field."""
    import ast
    from pathlib import Path

    import t2fast

    root = Path(t2fast.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel == "mixtures.py":
            continue
        words = VOCABULARY | (FIELDS if rel.startswith(("vllm/", "serve/")) and
                              rel != "serve/profiles.py" else set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                    (node.value in words or node.value.startswith("profile:")) and \
                    (rel, node.value) not in NOT_VOCABULARY:
                found.append(f"{rel}:{node.lineno}: {node.value!r}")
    assert len(list(root.rglob("*.py"))) > 20
    assert found == []
