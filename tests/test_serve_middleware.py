"""The server's HTTP layer without an engine: t2fast's middleware and routes on a FastAPI app
whose completion routes echo the body vLLM would get (a stand-in engine records the RPCs).

Hostile and careless bodies (deep nesting, huge numbers, megabyte names, thousands of fields)
get a 4xx naming the field, with a short text; every answer says which mixture it applied.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import threading
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("vllm")
import httpx  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402

from t2fast.serve.adapt import Adapter  # noqa: E402
from t2fast.serve.config import ServeConfig  # noqa: E402
from t2fast.serve.experts import ServedExperts  # noqa: E402
from t2fast.serve.middleware import STATE_ATTR, T2Server  # noqa: E402
from t2fast.serve.plugin import T2EndpointPlugin  # noqa: E402
from t2fast.messages import cap_text, shown  # noqa: E402
from t2fast.vllm.frontend import FrontEnd  # noqa: E402

from test_serve_experts import FakeEngine  # noqa: E402

EXPERTS = Path(__file__).resolve().parent.parent / "experts"
BANK = ["arith", "strings", "classify"]
#: "no error text longer than a few hundred characters"
MAX_ERROR_BYTES = 500


class Models:
    """vLLM's ``openai_serving_models`` as the plugin uses it."""
    lora_requests: dict = {}

    async def show_available_models(self):
        class Listed:
            def model_dump(self):
                return {"object": "list", "data": [
                    {"id": "tiny", "object": "model", "root": str(EXPERTS.parent / "tiny"),
                     "parent": None}]}
        return Listed()


class PassOne:
    """``engine_client.generate`` for pass 1: answers ``label`` and counts the calls."""

    def __init__(self, label="arith"):
        self.label, self.calls = label, 0

    async def generate(self, prompt, params, request_id):
        self.calls += 1

        class Out:
            outputs = [type("O", (), {"text": self.label})()]
        yield Out()


def make_app(tmp_path, adapt="none", engine=None, restate=False) -> tuple[FastAPI, T2Server]:
    app = FastAPI()
    T2EndpointPlugin().attach_router(app)

    async def echo(request: Request):
        body = await request.json()
        if body.get("prompt") == "vllm-error":   # an error of vLLM's echoing a huge value
            return JSONResponse({"error": {"message": "bad " + "v" * 100_000, "type": "x",
                                           "param": "prompt", "code": 400}}, status_code=400)
        return JSONResponse({"model": body.get("model"), "body": body})

    app.post("/v1/completions")(echo)
    app.post("/v1/chat/completions")(echo)
    fe = FrontEnd(num_layers=4, max_experts=8)
    for n in BANK:
        fe.add(n, "digest")
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    experts = ServedExperts(FakeEngine(BANK), fe, ["tiny"], {}, root)
    cfg = ServeConfig(adapt=adapt, classifier="classify", allow_runtime_loading=True,
                      runtime_loading_root=str(root), restate=restate)
    server = T2Server(experts, Adapter(engine or PassOne(), classifier="classify",
                                       restate=restate), cfg,
                      {"mix": {"arith": 0.5, "strings": 0.5}})
    setattr(app.state, STATE_ATTR, server)
    app.state.openai_serving_models = Models()
    return app, server


def call(app, method, path, body=None, raw: bytes | None = None,
         headers: list | None = None) -> httpx.Response:
    """``body`` as JSON, or ``raw`` bytes, sent as ``application/json`` or with ``headers``."""
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            if raw is None and headers is None:
                return await client.request(method, path, json=body)
            return await client.request(
                method, path, headers=headers or [("content-type", "application/json")],
                content=json.dumps(body).encode() if raw is None else raw)
    return asyncio.run(go())


@pytest.fixture
def app(tmp_path):
    return make_app(tmp_path)[0]


def refused(r, status, param, text):
    assert r.status_code == status, r.text
    assert len(r.content) < MAX_ERROR_BYTES, len(r.content)
    err = r.json()["error"]
    assert err["param"] == param and text in err["message"], err
    return err["message"]


def nested(depth: int, inner="0") -> str:
    return "[" * depth + inner + "]" * depth


# ---- bodies ------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, param", [
    (f'{{"model": "tiny", "prompt": {nested(1000)}}}', None),            # too deep to parse
    (f'{{"model": "tiny", "prompt": "x", "extra": {nested(200)}}}', "extra"),
    (f'{{"model": "tiny", "prompt": "x", "t2": {{"alpha": {nested(200)}}}}}', "t2"),
    (f'{{"model": "tiny", "prompt": "x", "vllm_xargs": {{"t2": {nested(1000)}}}}}', None),
    ('{"model": "tiny", "prompt": "x", "t2": {"alpha": ' + nested(5, "1") + '}}', "t2"),
    ('{"model": "tiny", "prompt": "x", "t2": "{\\"alpha\\": ' + nested(5000) + '}"}', "t2"),
])
def test_deep_json_is_a_400_naming_the_problem(app, raw, param):
    r = call(app, "POST", "/v1/completions", raw=raw.encode())
    refused(r, 400, param, "nested")


@pytest.mark.parametrize("fields, param", [
    ({"t2_alpha": [10 ** 400, 0, 0]}, "t2_alpha"),
    ({"t2_alpha": {"arith": -10 ** 400}}, "t2_alpha"),
    ({"vllm_xargs": {"t2_alpha": [0, 10 ** 400, 0]}}, "vllm_xargs.t2_alpha"),
    ({"t2": {"alpha": {"strings": 10 ** 400}}}, "t2"),
])
def test_integer_too_large_for_a_float_names_the_field(app, fields, param):
    r = call(app, "POST", "/v1/completions", {"model": "tiny", "prompt": "x", **fields})
    message = refused(r, 400, param, "too large for a float")
    assert message.startswith(param)


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"model": "tiny", "t2_expert": "x" * 1_000_000}, "t2_expert"),
    ("/v1/completions", {"model": "tiny", "t2": {"alpha": {"y" * 1_000_000: 1}}}, "t2"),
    ("/v1/completions", {"model": "tiny", "t2": {f"k{i}": 1 for i in range(10_000)}}, "t2"),
    ("/v1/completions", {"model": "tiny", "t2_" + "z" * 1_000_000: 1},
     cap_text("t2_" + "z" * 1_000_000, 80)),
    ("/v1/completions", {"model": "tiny", "t2_adapt": "q" * 1_000_000}, "t2_adapt"),
    ("/v1/completions", {"model": "m" * 1_000_000}, "model"),
    ("/v1/responses", {"input": "x", **{f"t2_{i}": 1 for i in range(10_000)}}, "t2_0"),
    ("/v1/t2/experts", {"name": "a", "path": "a", **{f"f{i}": 1 for i in range(10_000)}},
     "f0"),
    ("/v1/t2/experts", {"name": "a", "path": "p" * 1_000_000}, "path"),
    ("/v1/t2/experts", {"name": "n" * 1_000_000, "path": "a"}, "name"),
])
def test_errors_never_echo_unbounded_input(app, path, body, param):
    r = call(app, "POST", path, body)
    assert 400 <= r.status_code < 500
    refused(r, r.status_code, param, "")


def test_errors_of_vllm_are_capped_too(app):
    r = call(app, "POST", "/v1/completions", {"model": "tiny", "prompt": "vllm-error"})
    assert refused(r, 400, "prompt", "bad vvv").endswith("more characters)")
    r = call(app, "DELETE", "/v1/t2/experts/" + "d" * 30_000)
    refused(r, 404, "name", "is not loaded")


def test_the_token_in_route_refuses_a_mixture_in_its_sampling_params(app):
    body = {"token_ids": [1, 2], "sampling_params": {"extra_args": {"t2": {"expert": "arith"}}}}
    r = call(app, "POST", "/inference/v1/generate", body)
    refused(r, 400, "sampling_params.extra_args.t2", "does not serve t2fast mixtures")
    body["sampling_params"]["extra_args"] = {"seed_note": 1}
    assert call(app, "POST", "/inference/v1/generate", body).status_code != 400


@pytest.mark.parametrize("headers", [
    [("content-type", "Application/JSON")],
    [("content-type", "application/json; charset=utf-8")],
    [("content-type", "application/json"), ("content-type", "text/plain")],
])
def test_another_route_refuses_a_mixture_however_its_content_type_is_written(app, headers):
    """The server reads the first content-type, in any case: so does the check (a mixed-case
    type, or a second header, let the base model answer a request that named an expert)."""
    r = call(app, "POST", "/v1/responses", {"model": "tiny", "input": "x", "t2_expert": "arith"},
             headers=headers)
    refused(r, 400, "t2_expert", "does not serve t2fast mixtures")


def test_a_deep_body_on_another_route_is_left_to_vllm(app):
    r = call(app, "POST", "/v1/t2/experts", raw=nested(1000).encode())
    refused(r, 400, None, "nested")


# ---- which mixture ------------------------------------------------------------------------
@pytest.mark.parametrize("fields, mixture, expert", [
    ({}, "base", None),
    ({"model": "arith"}, '{"arith":1.0}', "arith"),
    ({"t2_expert": "strings"}, '{"strings":1.0}', None),
    ({"t2_expert": "base"}, "base", None),
    ({"t2_alpha": [0.5, 0.25, 0]}, '{"arith":0.5,"strings":0.25}', None),
    ({"t2_alpha": {"base": 0.5, "arith": 0.5}}, '{"arith":0.5,"base":0.5}', None),
    ({"t2": '{"expert": "arith"}'}, '{"arith":1.0}', None),
    ({"vllm_xargs": {"t2_expert": "classify"}}, '{"classify":1.0}', None),
    ({"t2_adapt": "prompt"}, '{"arith":1.0}', "arith"),
    ({"t2_adapt": "classifier"}, '{"arith":1.0}', "arith"),
    ({"t2_adapt": "profile:mix"}, '{"arith":0.5,"strings":0.5}', None),
    ({"t2_adapt": "none"}, "base", None),
])
def test_every_response_names_its_mixture(app, fields, mixture, expert):
    r = call(app, "POST", "/v1/completions", {"model": "tiny", "prompt": "Q: 1+1=?", **fields})
    assert r.status_code == 200, r.text
    assert r.headers["x-t2-mixture"] == mixture
    assert r.headers.get("x-t2-expert") == expert
    sent = r.json()["body"].get("vllm_xargs", {}).get("t2")   # by name: what was checked
    assert (None if sent is None else json.loads(sent)) == \
        (None if mixture == "base" else {"alpha": json.loads(mixture)})
    if "model" in fields:
        assert r.json()["model"] == "arith"


def test_beam_search_cannot_carry_a_mixture(tmp_path):
    """vLLM's beam search rebuilds each step's sampling parameters without the request's
    extra arguments: a mixture would be named in x-t2-mixture and not applied."""
    app, _ = make_app(tmp_path, adapt="classifier")
    beams = {"model": "tiny", "prompt": "Q: 1+1=?", "use_beam_search": True}
    for fields in ({"t2_expert": "arith"}, {"model": "arith"}, {"t2_adapt": "prompt"}):
        refused(call(app, "POST", "/v1/completions", {**beams, **fields}), 400,
                "use_beam_search", "cannot carry a mixture")
    r = call(app, "POST", "/v1/completions", {**beams, "t2_expert": "base"})
    assert r.status_code == 200 and r.headers["x-t2-mixture"] == "base"
    r = call(app, "POST", "/v1/completions", beams)       # the server's default adapt: skipped
    assert r.status_code == 200 and r.headers["x-t2-mixture"] == "base"
    assert "cannot carry a mixture" in r.headers["x-t2-adapt-skipped"]


def test_unknown_model_404_lists_base_model_and_experts(tmp_path):
    app, server = make_app(tmp_path)
    message = refused(call(app, "POST", "/v1/completions", {"model": "nope", "prompt": "x"}),
                      404, "model", "does not exist")
    assert "tiny (base model)" in message
    assert all(f"{n} (expert)" in message for n in BANK)
    for i in range(60):   # a large bank: the list stops, the text stays short
        server.experts.frontend.max_experts += 1
        server.experts.frontend.add(f"expert-number-{i:02d}", "d")
    message = refused(call(app, "POST", "/v1/chat/completions",
                           {"model": "nope", "messages": []}), 404, "model", "more (GET")
    Models.lora_requests = {"my-lora": None}
    try:   # vLLM's own LoRA adapters are vLLM's to serve
        assert call(app, "POST", "/v1/completions",
                    {"model": "my-lora", "prompt": "x"}).status_code == 200
    finally:
        Models.lora_requests = {}


# ---- a server-wide default adapt mode ----------------------------------------------------
def test_server_default_adapt_skips_requests_it_cannot_serve(tmp_path):
    app, server = make_app(tmp_path, adapt="classifier")
    r = call(app, "POST", "/v1/completions", {"model": "tiny", "prompt": ["a", "b"]})
    assert r.status_code == 200, r.text
    assert r.headers["x-t2-mixture"] == "base" and r.headers["x-t2-adapt"] == "none"
    assert "one text prompt" in r.headers["x-t2-adapt-skipped"]
    assert "vllm_xargs" not in r.json()["body"] and server.adapter.engine_client.calls == 0
    for model in ({"model": "tiny"}, {"model": ""}, {}):   # vLLM serves "" as the base model
        r = call(app, "POST", "/v1/completions", {**model, "prompt": "Q: 1+1=?"})
        assert r.headers["x-t2-expert"] == "arith" and "x-t2-adapt-skipped" not in r.headers
    # a request that asks for adaptation itself still hears why it cannot have it
    r = call(app, "POST", "/v1/completions", {"model": "tiny", "prompt": ["a", "b"],
                                               "t2_adapt": "classifier"})
    refused(r, 400, "t2_adapt", "needs one text prompt")


def test_server_default_adapt_skips_a_choice_that_is_gone(tmp_path):
    """A default adapt whose pass 1 names an expert no longer loaded (a profile's, here) is
    skipped like any other it cannot serve; a request asking for it hears why."""
    app, server = make_app(tmp_path, adapt="profile:mix")
    asyncio.run(server.experts.unload("arith"))
    r = call(app, "POST", "/v1/completions", {"model": "tiny", "prompt": "Q: 1+1=?\nA: "})
    assert r.status_code == 200, r.text
    assert r.headers["x-t2-mixture"] == "base" and r.headers["x-t2-adapt"] == "none"
    assert "unknown expert 'arith'" in r.headers["x-t2-adapt-skipped"]
    assert "vllm_xargs" not in r.json()["body"]
    r = call(app, "POST", "/v1/completions", {"model": "tiny", "prompt": "Q: 1+1=?\nA: ",
                                               "t2_adapt": "profile:mix"})
    refused(r, 400, "t2_adapt", "unknown expert 'arith'")


@pytest.mark.parametrize("text", [None, 5, ["a"]])
def test_a_chat_text_part_that_is_not_a_string_is_a_400(tmp_path, text):
    app, _ = make_app(tmp_path)
    body = {"model": "tiny", "t2_adapt": "prompt",
            "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}]}
    refused(call(app, "POST", "/v1/chat/completions", body), 400, "messages",
            "'text' must be a string")


class Holding:
    """``engine_client.generate`` for pass 1 that answers ``arith`` only once ``go`` is set
    (``entered`` says it was called)."""

    def __init__(self):
        self.entered, self.go = asyncio.Event(), asyncio.Event()

    async def generate(self, prompt, params, request_id):
        self.entered.set()
        await self.go.wait()

        class Out:
            outputs = [type("O", (), {"text": "arith"})()]
        yield Out()


def test_an_unload_waits_for_pass_1_on_the_classifier(tmp_path):
    """Pass 1's classification counts as a request on the classification expert: unloading it
    (or replacing it) waits until the classification is done, never pulling it from under it."""
    engine = Holding()
    app, server = make_app(tmp_path, engine=engine)
    experts = server.experts

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            request = asyncio.create_task(client.post(
                "/v1/completions", json={"model": "tiny", "prompt": "Q: 1+1=?\nA: ",
                                         "t2_adapt": "classifier"}))
            await engine.entered.wait()
            assert experts.in_flight["classify"] == 1
            unload = asyncio.create_task(experts.unload("classify"))
            await asyncio.sleep(0.05)
            assert not unload.done()
            assert "t2_unload_experts" not in experts.engine_client.calls
            engine.go.set()
            r = await request
            await unload
            return r
    r = asyncio.run(go())
    assert r.status_code == 200 and r.headers["x-t2-expert"] == "arith"
    assert experts.in_flight["classify"] == 0 and "classify" not in experts.names
    assert experts.engine_client.calls == ["t2_unload_experts"]


# ---- restatement (--restate) -------------------------------------------------------------
class Restating:
    """``engine_client.generate`` of a model that restates: ``step by step: what is 147 plus
    8?`` -> ``147+8=?``, nothing for other step questions; classifies everything ``arith``.
    Records (prompt, extra_args) of every call."""

    def __init__(self):
        self.seen, self.stops = [], []

    async def generate(self, prompt, params, request_id):
        self.seen.append((prompt, params.extra_args))
        self.stops.append((params.stop, params.include_stop_str_in_output))
        text = ("147+8=?\nA: 155" if "step by step: what is 147 plus 8?" in prompt else
                "no steps" if "step by step:" in prompt else "arith")

        class Out:
            outputs = [type("O", (), {"text": text})()]
        yield Out()


@pytest.mark.parametrize("route, body, asked", [
    ("/v1/completions", {"prompt": "Q: what is 147 plus 8?\nA: "}, "Q: 147+8=?\nA: "),
    ("/v1/completions", {"prompt": ["what is 147 plus 8?"]}, ["147+8=?"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"},
                                           {"role": "assistant", "content": "hello"},
                                           {"role": "user", "content": "what is 147 plus 8?"}]},
     [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
      {"role": "user", "content": "147+8=?"}]),
])
@pytest.mark.parametrize("adapt", ["classifier", "profile:mix"])
def test_restate_asks_the_restated_question(tmp_path, route, body, asked, adapt):
    """--restate: the base weights (no extra_args) restate the question; pass 1 picks for the
    restated question and the request asks it, in the form it was sent in."""
    engine = Restating()
    app, _ = make_app(tmp_path, engine=engine, restate=True)
    r = call(app, "POST", route, {"model": "tiny", **body, "t2_adapt": adapt})
    assert r.status_code == 200, r.text
    assert r.headers["x-t2-restated"] == "147+8=?" and float(r.headers["x-t2-restate-ms"]) >= 0
    sent = r.json()["body"]
    assert sent.get("prompt", sent.get("messages")) == asked
    assert engine.seen[0] == ("Q: step by step: what is 147 plus 8?\nA: ", None)
    assert engine.stops[0] == (["\nA:"], True)             # ends at the step's separator
    if adapt == "classifier":
        assert "147+8=?" in engine.seen[1][0] and engine.seen[1][1] == {"t2": {"expert":
                                                                               "classify"}}
        assert r.headers["x-t2-expert"] == "arith"
    else:
        assert len(engine.seen) == 1 and r.headers["x-t2-adapt"] == "profile:mix"
        assert r.headers["x-t2-mixture"] == '{"arith":0.5,"strings":0.5}'


def test_restate_leaves_other_requests_as_sent(tmp_path):
    """A question without a first step is asked as sent (x-t2-restated: none); a request that
    names its mixture is not restated; a default adapt that cannot run skips the restatement
    too; a server without --restate never restates."""
    engine = Restating()
    app, _ = make_app(tmp_path, adapt="classifier", engine=engine, restate=True)
    r = call(app, "POST", "/v1/completions", {"model": "tiny", "prompt": "Q: hi\nA: "})
    assert r.headers["x-t2-restated"] == "none" and r.json()["body"]["prompt"] == "Q: hi\nA: "
    assert r.headers["x-t2-expert"] == "arith" and len(engine.seen) == 2
    r = call(app, "POST", "/v1/completions", {"model": "tiny", "prompt": "what is 147 plus 8?",
                                               "t2_expert": "strings"})
    assert "x-t2-restated" not in r.headers and len(engine.seen) == 2
    r = call(app, "POST", "/v1/completions", {"model": "tiny", "prompt": ["a", "b"]})
    assert r.json()["body"]["prompt"] == ["a", "b"] and "x-t2-restated" not in r.headers
    assert "one text prompt" in r.headers["x-t2-adapt-skipped"] and len(engine.seen) == 2
    engine = Restating()
    app, _ = make_app(tmp_path, engine=engine)
    r = call(app, "POST", "/v1/completions", {"model": "tiny", "prompt": "what is 147 plus 8?",
                                               "t2_adapt": "classifier"})
    assert "x-t2-restated" not in r.headers and r.json()["body"]["prompt"] == \
        "what is 147 plus 8?"
    assert len(engine.seen) == 1 and "step by step" not in engine.seen[0][0]


class TooLong:
    """``engine_client.generate`` refusing every prompt as vLLM refuses one longer than the
    model's context."""

    async def generate(self, prompt, params, request_id):
        from vllm.exceptions import VLLMValidationError
        raise VLLMValidationError("This model's maximum context length is 256 tokens. However, "
                                  "your prompt contains at least 257 input tokens",
                                  parameter="input_tokens", value=257)
        yield  # an async generator, as the engine's


@pytest.mark.parametrize("restate, purpose", [(False, "classification"),
                                              (True, "restatement")])
def test_a_pass1_prompt_the_engine_refuses_is_a_400_that_says_so(tmp_path, restate, purpose):
    """A question that fits the model alone but not inside pass 1's template: a 400 naming
    t2_adapt and which of pass 1's prompts was refused; the server's default adapt is skipped
    for it instead (the base model answers, x-t2-adapt-skipped says why)."""
    app, _ = make_app(tmp_path, engine=TooLong(), restate=restate)
    r = call(app, "POST", "/v1/completions", {"model": "tiny", "prompt": "Q: 1+1=?\nA: ",
                                               "t2_adapt": "classifier"})
    refused(r, 400, "t2_adapt", f"the engine refused pass 1's {purpose} prompt")
    assert "maximum context length is 256" in r.json()["error"]["message"]
    app, _ = make_app(tmp_path, adapt="classifier", engine=TooLong(), restate=restate)
    r = call(app, "POST", "/v1/completions", {"model": "tiny", "prompt": "Q: 1+1=?\nA: "})
    assert r.status_code == 200 and r.headers["x-t2-mixture"] == "base"
    assert f"refused pass 1's {purpose} prompt" in r.headers["x-t2-adapt-skipped"]
    assert r.json()["body"]["prompt"] == "Q: 1+1=?\nA: "


def test_restate_needs_the_tiny_template():
    with pytest.raises(ValueError, match="--adapt-template tiny"):
        ServeConfig(restate=True, adapt_template="paper")
    with pytest.raises(ValueError, match="'tiny' adapt template"):
        Adapter(PassOne(), "paper", restate=True)


def test_profiles_are_served_as_they_were_searched(tmp_path):
    """A profile from t2fast adapt --restate needs a --restate server; any other one a server
    without it."""
    from t2fast.serve.profiles import check_restated, read_profile, save_profile
    plain = read_profile(save_profile(tmp_path / "a.json", [1.0], ["arith"], task="x"))[1]
    restated = read_profile(save_profile(tmp_path / "b.json", [1.0], ["arith"], restated=True))[1]
    check_restated(plain, False)
    check_restated(restated, True)
    with pytest.raises(ValueError, match="serve it with --restate"):
        check_restated(restated, False)
    with pytest.raises(ValueError, match="this server restates them"):
        check_restated(plain, True)


# ---- run-time loading --------------------------------------------------------------------
def test_runtime_loading_is_confined_to_the_root(tmp_path):
    app, server = make_app(tmp_path)
    root = server.experts.root
    shutil.copy(EXPERTS / "strings.safetensors", root / "strings.safetensors")
    (root / "sub").mkdir()
    (root / "sub" / "inside.safetensors").symlink_to(root / "strings.safetensors")
    (root / "escape.safetensors").symlink_to(EXPERTS / "arith.safetensors")
    (root / "junk.safetensors").write_bytes(b"not an expert")
    outside = str(EXPERTS / "arith.safetensors")
    texts = set()
    for path in [outside, "../root/../../x", "escape.safetensors", "missing.safetensors",
                 str(root / "missing.safetensors"), "/etc/passwd", "a\0b"]:
        message = refused(call(app, "POST", "/v1/t2/experts", {"name": "new", "path": path}),
                          400, "path", "names no expert file or folder inside")
        texts.add(message.replace(shown(path), "PATH"))
    assert len(texts) == 1, texts   # one text: whether a file exists is not revealed
    junk = refused(call(app, "POST", "/v1/t2/experts",
                        {"name": "new", "path": "junk.safetensors"}), 400, "path", "junk")
    assert str(root) not in junk and str(tmp_path) not in junk
    assert server.experts.names == BANK   # nothing a failed load touched changed
    for name, path in [("s1", "strings.safetensors"), ("s2", "sub/inside.safetensors"),
                       ("s3", str(root / "strings.safetensors"))]:
        r = call(app, "POST", "/v1/t2/experts", {"name": name, "path": path})
        assert r.status_code == 200, r.text
        assert r.json()["root"] == name
    assert server.experts.names == [*BANK, "s1", "s2", "s3"]
    listed = call(app, "GET", "/v1/models").text + call(app, "GET", "/v1/t2/experts").text
    assert str(tmp_path) not in listed and str(EXPERTS.parent) not in listed


def test_files_are_read_off_the_event_loop(tmp_path, monkeypatch):
    import t2fast.experts

    app, server = make_app(tmp_path)
    shutil.copy(EXPERTS / "strings.safetensors", server.experts.root / "s.safetensors")
    threads, load = [], t2fast.experts.load_expert
    monkeypatch.setattr(t2fast.experts, "load_expert",
                        lambda p: threads.append(threading.current_thread()) or load(p))
    r = call(app, "POST", "/v1/t2/experts", {"name": "s", "path": "s.safetensors"})
    assert r.status_code == 200, r.text
    assert threads and threads[0] is not threading.main_thread()


def test_runtime_loading_needs_a_root(tmp_path):
    with pytest.raises(ValueError, match="--runtime-loading-root"):
        ServeConfig(allow_runtime_loading=True)
    with pytest.raises(ValueError, match="not a folder"):
        ServeConfig(allow_runtime_loading=True, runtime_loading_root=str(tmp_path / "no"))
    with pytest.raises(ValueError, match="without --allow-runtime-loading"):
        ServeConfig(runtime_loading_root=str(tmp_path))
    cfg = ServeConfig(allow_runtime_loading=True, runtime_loading_root=str(tmp_path))
    assert ServeConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
