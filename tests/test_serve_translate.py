"""The server's request forms, without a server: t2 keys, "model": "<expert>", adapt modes."""
from __future__ import annotations

import json

import pytest

from t2fast.mixtures import Mixture
from t2fast.serve.config import ServeConfig
from t2fast.serve.translate import (MAX_BODY_DEPTH, T2HTTPError, check_depth, prompt_text,
                                    set_mixture, t2_keys_in, translate)

EXPERTS, BASE_NAMES = ["arith", "strings"], ["tiny"]


def tr(body, default_adapt="none"):
    return translate(body, EXPERTS, BASE_NAMES, default_adapt)


def test_forms_become_one_t2_json_string():
    plain = {"model": "tiny", "prompt": "x"}
    assert tr(plain).body == plain and tr(plain).spec is None and tr(plain).adapt is None
    out = tr({"model": "arith", "prompt": "x"})
    assert out.body["model"] == "tiny" and out.via_model == "arith"
    assert json.loads(out.body["vllm_xargs"]["t2"]) == {"expert": "arith"}
    out = tr({"model": "tiny", "t2_alpha": {"arith": 0.5}, "vllm_xargs": {"other": 1}})
    assert out.body["vllm_xargs"] == {"other": 1, "t2": json.dumps({"alpha": {"arith": 0.5}})}
    assert "t2_alpha" not in out.body
    out = tr({"model": "tiny", "vllm_xargs": {"t2_expert": "strings"}})
    assert out.spec == {"expert": "strings"}
    out = tr({"model": "tiny", "t2": '{"expert": "arith"}'})
    assert out.body["vllm_xargs"]["t2"] == '{"expert": "arith"}'
    # the key that named the mixture, for error texts
    assert [tr({"model": "tiny", **b}).key for b in (
        {}, {"t2": "arith"}, {"t2_alpha": [1, 0]}, {"vllm_xargs": {"t2_expert": "arith"}},
        {"t2_adapt": "prompt"})] == [None, "t2", "t2_alpha", "vllm_xargs.t2_expert", "t2_adapt"]
    assert tr({"model": "arith"}).key == "model"
    body = {"model": "tiny", "t2_expert": "arith"}
    tr(body)
    assert body == {"model": "tiny", "t2_expert": "arith"}  # the input is not changed


def test_adapt_modes_and_server_default():
    assert tr({"model": "tiny", "t2_adapt": "prompt"}).adapt == "prompt"
    assert tr({"model": "tiny", "t2_adapt": "none"}).adapt is None
    assert tr({"model": "tiny", "t2_adapt": "profile:mix"}).adapt == "profile:mix"
    assert tr({"model": "tiny"}, default_adapt="classifier").adapt == "classifier"
    assert tr({"model": "tiny"}, default_adapt="classifier").adapt_is_default
    assert not tr({"model": "tiny", "t2_adapt": "prompt"}, "classifier").adapt_is_default
    assert not tr({"model": "tiny"}).adapt_is_default
    assert tr({}, default_adapt="prompt").adapt == "prompt"
    # a request naming a mixture, or another model, is not adapted by default
    assert tr({"model": "tiny", "t2_expert": "arith"}, "prompt").adapt is None
    assert tr({"model": "arith"}, "prompt").adapt is None
    assert tr({"model": "other"}, "prompt").adapt is None
    body = tr({"model": "tiny", "t2_adapt": "prompt"}).body
    assert "vllm_xargs" not in body
    set_mixture(body, Mixture(weights=(("strings", 1.0),)))
    assert json.loads(body["vllm_xargs"]["t2"]) == {"alpha": {"strings": 1.0}}
    set_mixture(body, Mixture())
    assert "vllm_xargs" not in body


@pytest.mark.parametrize("body, param, msg", [
    ({"vllm_xargs": {"t2_experts": "arith"}}, "vllm_xargs.t2_experts", "unknown t2fast key"),
    ({"t2_exper": "arith"}, "t2_exper", "unknown t2fast key"),
    ({"T2-alpha": [1, 0]}, "T2-alpha", "unknown t2fast key"),
    ({"expert": "arith"}, "expert", "unknown field 'expert'"),
    ({"alpha": [1, 0]}, "alpha", "unknown field 'alpha'"),
    ({"vllm_xargs": {"expert": "arith"}}, "vllm_xargs.expert",
     "unknown field 'vllm_xargs.expert'"),
    ({"vllm_xargs": {"adapt": "prompt"}}, "vllm_xargs.adapt", "unknown field"),
    ({"t2_expert": "arith", "vllm_xargs": {"t2_expert": "arith"}}, "t2_expert", "both"),
    ({"t2_expert": "arith", "t2_alpha": [1, 0]}, "t2_alpha", "one mixture"),
    ({"model": "arith", "t2_alpha": [1, 0]}, "t2_alpha", "one mixture"),
    ({"t2_adapt": "prompt", "t2": {"expert": "arith"}}, "t2_adapt", "one mixture"),
    ({"t2_adapt": "always"}, "t2_adapt", "must be one of"),
    ({"t2_adapt": "profile:"}, "t2_adapt", "must be one of"),
])
def test_refused_with_400_naming_the_key(body, param, msg):
    with pytest.raises(T2HTTPError, match=msg) as err:
        tr({"model": "tiny", **body})
    assert err.value.param == param and int(err.value.status) == 400
    payload = err.value.payload()["error"]
    assert payload["code"] == 400 and payload["type"] == "BadRequestError"


def test_bodies_that_are_not_t2_requests_pass_through():
    assert tr([1, 2]).body == [1, 2]
    assert tr({"model": "tiny", "vllm_xargs": "junk"}).body["vllm_xargs"] == "junk"
    assert t2_keys_in({"input": "x", "t2_expert": "a", "vllm_xargs": {"t2": "b", "k": 1}}) == [
        "t2_expert", "vllm_xargs.t2"]
    assert t2_keys_in({"input": "x"}) == [] and t2_keys_in("x") == []
    generate = {"token_ids": [1], "sampling_params": {"extra_args": {"t2": "a", "T2-alpha": 1,
                                                                     "k": 1}}}
    assert t2_keys_in(generate) == ["sampling_params.extra_args.t2",
                                    "sampling_params.extra_args.T2-alpha"]
    assert t2_keys_in({"sampling_params": {"extra_args": ["t2"]}}) == []
    assert t2_keys_in({"sampling_params": "t2"}) == []


def deep(depth: int):
    value = 0
    for _ in range(depth):
        value = [value]
    return value


def test_depth_of_bodies_is_bounded_without_recursion():
    check_depth({"prompt": deep(MAX_BODY_DEPTH - 1), "messages": [{"content": "x"}]})
    check_depth(deep(MAX_BODY_DEPTH))
    for body, param in [({"prompt": "x", "extra": deep(MAX_BODY_DEPTH)}, "extra"),
                        ({"vllm_xargs": {"t2": deep(100_000)}}, "vllm_xargs"),
                        (deep(MAX_BODY_DEPTH + 1), None)]:
        with pytest.raises(T2HTTPError, match=f"more than {MAX_BODY_DEPTH} levels") as err:
            check_depth(body)
        assert err.value.param == param and int(err.value.status) == 400


def test_error_texts_are_bounded():
    for body in [{"t2_" + "x" * 1_000_000: 1}, {"t2_adapt": "y" * 1_000_000}]:
        with pytest.raises(T2HTTPError) as err:
            tr({"model": "tiny", **body})
        assert len(json.dumps(err.value.payload())) < 500
    assert len(T2HTTPError("z" * 10_000).message) <= 300


def test_prompt_text_for_pass_one():
    assert prompt_text("/v1/completions", {"prompt": "Q: 1+1=?\nA: "}) == "Q: 1+1=?\nA: "
    assert prompt_text("/v1/completions", {"prompt": ["only one"]}) == "only one"
    chat = {"messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": "first"},
                         {"role": "assistant", "content": "ok"},
                         {"role": "user", "content": [{"type": "text", "text": "last"}]}]}
    assert prompt_text("/v1/chat/completions", chat) == "last"
    for path, body in [("/v1/completions", {"prompt": ["a", "b"]}),
                       ("/v1/completions", {"prompt": [1, 2, 3]}),
                       ("/v1/chat/completions", {"messages": [{"role": "system",
                                                               "content": "x"}]})]:
        with pytest.raises(T2HTTPError, match="t2_adapt needs"):
            prompt_text(path, body)


def test_profiles_save_load_and_errors(tmp_path):
    from t2fast.serve.profiles import load_profile, profile_alpha, save_profile

    assert profile_alpha([0.5, 0.25], ["a", "b"]) == {"a": 0.5, "b": 0.25}
    assert profile_alpha([[1, 0], [0.5, 2]], ["a", "b"]) == {"a": [1.0, 0.5], "b": [0.0, 2.0]}
    with pytest.raises(ValueError, match="2 experts"):
        profile_alpha([1, 2, 3], ["a", "b"])
    path = save_profile(tmp_path / "p.json", [0.5, 0.25], ["a", "b"], task="arith")
    assert load_profile(path) == {"a": 0.5, "b": 0.25}
    assert json.loads(path.read_text())["meta"] == {"task": "arith"}
    bad = tmp_path / "bad.json"
    for text, msg in [("{", "not JSON"), ('{"format": "x"}', "not a t2fast profile"),
                      ('{"format": "t2fast-profile", "version": 9, "alpha": {"a": 1}}',
                       "version 9"),
                      ('{"format": "t2fast-profile", "version": 1, "alpha": []}', "alpha")]:
        bad.write_text(text)
        with pytest.raises(ValueError, match=msg):
            load_profile(bad)
    with pytest.raises(ValueError, match="cannot be read"):
        load_profile(tmp_path / "missing.json")


def test_serve_config():
    cfg = ServeConfig.from_dict({"adapt": "prompt", "named_experts": {"a": "a.safetensors"}})
    assert ServeConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown settings"):
        ServeConfig.from_dict({"adapt_mode": "prompt"})
    with pytest.raises(ValueError, match="adapt must be one of"):
        ServeConfig(adapt="sometimes")
    with pytest.raises(ValueError, match="needs a classifier"):
        ServeConfig(adapt="classifier")
    with pytest.raises(ValueError, match="adapt_template"):
        ServeConfig(adapt_template="chatml")


@pytest.mark.vllm    # t2fast.serve.cli.vllm_arguments parses vLLM's own flags
def test_serve_command_line_parses_and_refuses_owned_vllm_options(tmp_path):
    from t2fast.cli import build_parser
    from t2fast.serve.cli import _named, vllm_arguments, vllm_parser

    f = tmp_path / "math.safetensors"
    f.write_bytes(b"")
    assert _named(str(f)) == (None, str(f.resolve()))
    assert _named(f"m2={f}") == ("m2", str(f.resolve()))
    args, extra = build_parser().parse_known_args(
        ["serve", "tiny", "--experts", str(f), "--enforce-eager", "--max-model-len=256"])
    assert args.model == "tiny" and args.experts == [str(f)] and args.port == 8000
    assert extra == ["--enforce-eager", "--max-model-len=256"]
    with pytest.raises(ValueError, match="sets --hf-overrides itself"):
        vllm_arguments(args, ["--hf-overrides={}"])
    # vLLM's other spellings replace t2fast's value just as well (its parser appends the
    # dotted keys as one JSON value after every other), so they are refused too
    known = vllm_parser()._option_string_actions
    for spelling in (["--hf_overrides", "{}"], ["--hf-overrides.rope_theta", "1e4"],
                     ["--additional-conf", "{}"], ["--worker_extension_cls=x"]):
        with pytest.raises(ValueError, match=f"itself \\(given as '{spelling[0]}'\\)"):
            vllm_arguments(args, spelling, known)
    # a prefix of several vLLM options names none of them (vLLM refuses it as ambiguous)
    bare, _ = build_parser().parse_known_args(["serve", "tiny"])
    assert vllm_arguments(bare, ["--worker", "x"], known)[-2:] == ["--worker", "x"]
    args, extra = build_parser().parse_known_args(
        ["serve", "tiny", "--allow-runtime-loading", "--runtime-loading-root", str(tmp_path)])
    argv = vllm_arguments(args, extra)
    serve_cfg = json.loads(argv[argv.index("--additional-config") + 1])["t2fast_serve"]
    assert serve_cfg["runtime_loading_root"] == str(tmp_path.resolve())
    args, extra = build_parser().parse_known_args(["serve", "tiny", "--allow-runtime-loading"])
    with pytest.raises(ValueError, match="needs a root folder"):
        vllm_arguments(args, extra)


@pytest.mark.vllm    # vllm_arguments parses vLLM's own flags
@pytest.mark.parametrize("given, files, named, classifier", [
    (["arith", "strings"], ["arith", "strings", "classify"], {}, "classify"),
    (["s=strings", "arith"], [], {"s": "strings", "arith": "arith", "classify": "classify"},
     "classify"),
    (["arith", "s=strings", "choice"], ["arith"],
     {"s": "strings", "choice": "choice", "classify": "classify"}, "classify"),
])
def test_serve_loads_the_bank_in_the_order_given(given, files, named, classifier):
    """α lists index the bank: the experts are loaded in the order given, a NAME= entry
    where it stands (it came after every unnamed file), the classifier file last; the bank
    holds them all, however many are named."""
    from t2fast.cli import build_parser
    from t2fast.serve.cli import vllm_arguments

    def path(entry):
        name, _, stem = entry.rpartition("=")
        return (f"{name}=" if name else "") + f"experts/{stem}.safetensors"

    args, extra = build_parser().parse_known_args(
        ["serve", "tiny", "--experts", *map(path, given), "--classifier", path("classify"),
         "--max-experts", "1"])
    argv = vllm_arguments(args, extra)
    config = json.loads(argv[argv.index("--additional-config") + 1])
    stem = lambda p: p.rsplit("/", 1)[-1].removesuffix(".safetensors")  # noqa: E731
    assert [stem(p) for p in config["t2fast"]["experts"]] == files
    served = config["t2fast_serve"]
    assert {n: stem(p) for n, p in served["named_experts"].items()} == named
    assert list(served["named_experts"]) == list(named)
    assert served["classifier"] == classifier
    assert config["t2fast"]["max_experts"] == len(files) + len(named)


@pytest.mark.vllm
def test_owned_and_sized_options_are_no_prefix_of_another_vllm_option():
    """``option_given`` reads a prefix of an option as that option (argparse's abbreviation):
    sound only while no vLLM option is itself such a prefix."""
    from t2fast.serve.cli import OWNED_VLLM_OPTIONS, vllm_parser
    from t2fast.vllm.environment import KV_OPTIONS

    names = vllm_parser()._option_string_actions
    for option in (*OWNED_VLLM_OPTIONS, *KV_OPTIONS, "--dtype"):
        assert option in names
        assert [n for n in names if n != option and option.startswith(n)] == []


@pytest.mark.parametrize("raw, msg", [
    ({"alpha": [10 ** 400, 0]}, r"alpha\[0\] is an integer too large for a float \(401 digits"),
    ({"alpha": {"arith": -10 ** 400}}, r"alpha\['arith'\] is an integer too large"),
    ({"alpha": [[[1, 0]]]}, r"alpha\[0\]\[0\] is nested too deep"),
    ({"alpha": deep(100_000)}, "nested too deep"),
    ('{"alpha": ' + "[" * 100_000 + "]" * 100_000 + "}", "JSON string nested too deep"),
    ({"expert": "x" * 1_000_000}, "expert names have at most 64 characters"),
    ({"alpha": {"y" * 1_000_000: 1}}, "expert names have at most 64 characters"),
    ({f"k{i}": 1 for i in range(10_000)}, r"unknown key\(s\) 'k0', 'k1', 'k10' and 9997 more"),
    ([0.5] * 100_000, "got list of 100000 item"),
])
def test_engine_front_end_errors_name_the_entry_in_a_short_text(raw, msg):
    """The engine's own parser (``LLM`` and every server): the same bounded errors."""
    from t2fast.messages import MAX_MESSAGE_CHARS
    from t2fast.vllm.frontend import T2RequestError, parse_request

    with pytest.raises(T2RequestError, match=msg) as err:
        parse_request(raw, EXPERTS, 4)
    assert len(str(err.value)) <= MAX_MESSAGE_CHARS and isinstance(err.value, ValueError)
