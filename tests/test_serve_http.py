"""``t2fast serve`` over real HTTP on 127.0.0.1: the bundled tiny model, the shipped experts.

One server (module scope) serves every test: start-ups are the slow part on a CPU. It runs with
t2fast's defaults (factored path for every token, CPU KV-cache sizing) in eager mode, with the
classification expert and run-time loading on. Requests go through ``httpx`` (headers, errors)
and the ``openai`` client (``extra_body``, model list). Token-level comparisons are greedy.
"""
from __future__ import annotations

import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

try:
    import httpx
    import openai
    import vllm  # noqa: F401
    _MISSING = None
except Exception as exc:  # noqa: BLE001 - any import failure means "cannot run a server here"
    _MISSING = f"{type(exc).__name__}: {exc}"

pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(_MISSING is not None, reason=f"needs vllm, httpx, openai "
                                                              f"({_MISSING})")]

ROOT = Path(__file__).resolve().parent.parent
EXPERTS = ROOT / "experts"
BANK = ["arith", "strings", "choice", "classify"]          # bank order (--experts, then classifier)
MAX_TOKENS = 8
# ARITH: a question the arith expert answers differently from the base model
ARITH, STRINGS, CHOICE = ("Q: 4+64=?\nA: ", "Q: rotate('exu')\nA: ",
                          "Q: Which is largest? A)347 B)712 C)128 D)550\nA: ")
OTHER = "Q: tell me about the quiet river\nA: "
# (prompt, t2 fields): base, each expert, α by name and in bank order — the issue's
# "80-14 with α [0.5, 0.5, 0]" among them.
MIXED = [
    (ARITH, {}),
    (ARITH, {"t2_expert": "arith"}),
    (STRINGS, {"t2_expert": "strings"}),
    (CHOICE, {"t2_alpha": {"choice": 0.7, "arith": 0.3}}),
    ("Q: 80-14=?\nA: ", {"t2_alpha": [0.5, 0.5, 0, 0]}),
    (STRINGS, {"vllm_xargs": {"t2_alpha": [0.25, 1.0, 0, 0]}}),
    ("Q: 115+9=?\nA: ", {"t2": {"alpha": {"arith": 1.5, "base": -0.5}}}),
    (OTHER, {}),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from t2fast.serve.launch import ServerProcess, t2fast_serve_command

    from t2fast.serve.profiles import save_profile

    log = tmp_path_factory.mktemp("serve") / "server.log"
    profile = save_profile(log.parent / "mix.json", [0.7, 0.0, 0.3], BANK[:3], task="demo")
    cmd = t2fast_serve_command(
        "tiny", "--experts", *(str(EXPERTS / f"{n}.safetensors") for n in BANK[:3]),
        "--classifier", str(EXPERTS / "classify.safetensors"), "--allow-runtime-loading",
        "--runtime-loading-root", str(EXPERTS),
        "--profiles", f"mix={profile}",
        "--svd-cache-dir", str(log.parent / "svd"), "--enforce-eager",
        "--max-num-seqs=16", "--seed=0")
    # TRITON_INTERPRET (set for the kernel tests) would make "auto" pick the interpreter.
    proc = ServerProcess(cmd, log, env={"VLLM_DISABLE_COMPILE_CACHE": "1",
                                        "TOKENIZERS_PARALLELISM": "false",
                                        "TRITON_INTERPRET": None}).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def complete(http, prompt: str, fields: dict, model: str = "tiny"):
    return http.post("/v1/completions", json={"model": model, "prompt": prompt,
                                              "max_tokens": MAX_TOKENS, "temperature": 0,
                                              "return_token_ids": True, **fields})


def tokens(resp) -> list[int]:
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["token_ids"]


def concurrently(fn, items):
    with ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(fn, items))


@pytest.fixture(scope="module")
def alone(http):
    """Each request of MIXED sent on its own (nothing else in flight)."""
    return [tokens(complete(http, p, f)) for p, f in MIXED]


def hf_reference(requests) -> list[str]:
    """Greedy texts from the Hugging Face tiny model patched by t2fast.patch_model, one request
    at a time, factored path (the server's)."""
    import t2fast
    from t2fast.models import load_tiny
    from t2fast.train.rollout import generate_texts

    model, tok = load_tiny()
    handle = t2fast.patch_model(model, [EXPERTS / f"{n}.safetensors" for n in BANK],
                                backend="torch", hybrid=False, progress=False, cache_dir=False)
    out = []
    for prompt, spec in requests:
        handle.set_mixture(spec)
        out += generate_texts(model, tok, [prompt], max_new_tokens=MAX_TOKENS)
    return out


# ------------------------------------------------------------------------------------------
def test_models_lists_base_and_experts_openai_client(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    models = {m.id: m for m in client.models.list().data}
    assert list(models) == ["tiny", *BANK]
    assert all(models[n].parent == "tiny" for n in BANK)
    # extra_body puts t2 keys at the top level of the body.
    a = client.completions.create(model="tiny", prompt=ARITH, max_tokens=MAX_TOKENS,
                                  temperature=0, extra_body={"t2_expert": "arith"})
    b = client.completions.create(model="arith", prompt=ARITH, max_tokens=MAX_TOKENS,
                                  temperature=0)
    base = client.completions.create(model="tiny", prompt=ARITH, max_tokens=MAX_TOKENS,
                                     temperature=0)
    assert a.choices[0].text == b.choices[0].text
    assert a.choices[0].text != base.choices[0].text    # the arith expert answers ARITH its way
    messages = [{"role": "user", "content": "reverse('yek')"}]
    chat = client.chat.completions.create(model="strings", max_tokens=MAX_TOKENS,
                                          temperature=0, messages=messages)
    named = client.chat.completions.create(model="tiny", max_tokens=MAX_TOKENS, temperature=0,
                                           messages=messages,
                                           extra_body={"t2_expert": "strings"})
    assert chat.choices[0].message.content == named.choices[0].message.content
    assert chat.model == "strings" and named.model == "tiny"
    assert [m.id for m in client.models.list().data] == ["tiny", *BANK]
    for route in ("/v1/models", "/v1/t2/experts"):   # no server paths in any response
        text = httpx.get(server.url + route).text
        assert str(ROOT) not in text and "safetensors" not in text, route


def test_concurrent_mixed_experts_equal_alone_and_reference(http, alone):
    batched = concurrently(lambda r: tokens(complete(http, *r)), MIXED)
    assert batched == alone, "a request's greedy answer changed with its batch"
    # the experts change answers (the same prompt with base and arith)
    assert alone[0] != alone[1]
    texts = [r.json()["choices"][0]["text"]
             for r in concurrently(lambda r: complete(http, *r), MIXED)]
    specs = [None, "arith", "strings", {"choice": 0.7, "arith": 0.3}, [0.5, 0.5, 0, 0],
             [0.25, 1.0, 0, 0], {"arith": 1.5, "base": -0.5}, None]
    assert texts == hf_reference([(p, s) for (p, _), s in zip(MIXED, specs)])


def test_model_name_selects_expert(server, http, alone):
    r = complete(http, ARITH, {}, model="arith")
    assert tokens(r) == alone[1] and r.headers["x-t2-expert"] == "arith"
    assert r.headers["x-t2-mixture"] == '{"arith":1.0}'
    assert r.json()["model"] == "arith"  # as vLLM answers for a LoRA adapter
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    chunks = list(client.chat.completions.create(
        model="strings", max_tokens=MAX_TOKENS, temperature=0, stream=True,
        messages=[{"role": "user", "content": "reverse('yek')"}]))
    assert chunks and {c.model for c in chunks} == {"strings"}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat.completions.create(
        model="tiny", max_tokens=MAX_TOKENS, temperature=0, extra_body={"t2_expert": "strings"},
        messages=[{"role": "user", "content": "reverse('yek')"}])
    assert text == whole.choices[0].message.content and whole.model == "tiny"


BAD = [
    ({"vllm_xargs": {"t2_experts": "arith"}}, 400, "unknown t2fast key"),
    ({"t2_exper": "arith"}, 400, "unknown t2fast key"),
    ({"expert": "arith"}, 400, "unknown field 'expert'"),
    ({"t2_alpha": [1e30, 0, 0, 0]}, 400, "bound"),
    ({"t2_alpha": [-4.5, 0, 0, 0]}, 400, "bound"),
    ({"t2_alpha": [4, 4, 4, 0]}, 400, "bound"),
    ({"t2_alpha": [1, 0]}, 400, "4"),
    ({"t2_expert": "nope"}, 400, "unknown expert 'nope'"),
    ({"t2_expert": "arith", "t2_alpha": [1, 0, 0, 0]}, 400, "one mixture"),
    ({"t2": {"expert": "arith"}, "vllm_xargs": {"t2": "arith"}}, 400, "both"),
    ({"t2_adapt": "sometimes"}, 400, "t2_adapt"),
    ({"t2": {"experts": "arith"}}, 400, "unknown key"),
]


def test_bad_requests_are_4xx_and_change_nothing(http, alone):
    for fields, status, msg in BAD:
        r = complete(http, ARITH, fields)
        assert r.status_code == status, (fields, r.text)
        assert msg in r.json()["error"]["message"], (fields, r.text)
    raw = ('{"model": "tiny", "prompt": "x", "max_tokens": 2, "t2_alpha": [NaN, 0, 0, 0]}')
    r = http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    r = http.post("/v1/responses", json={"model": "tiny", "input": "x", "t2_expert": "arith"})
    assert r.status_code == 400 and "does not serve t2fast mixtures" in r.text
    r = complete(http, "x", {}, model="nope")
    assert r.status_code == 404 and all(n in r.json()["error"]["message"] for n in BANK)
    assert concurrently(lambda r: tokens(complete(http, *r)), MIXED) == alone


def test_every_form_says_which_mixture_served_it(http, alone):
    want = [("base", alone[0]), ('{"arith":1.0}', alone[1]), ('{"strings":1.0}', alone[2]),
            ('{"arith":0.3,"choice":0.7}', alone[3]), ('{"arith":0.5,"strings":0.5}', alone[4]),
            ('{"arith":0.25,"strings":1.0}', alone[5]), ('{"arith":1.5,"base":-0.5}', alone[6]),
            ("base", alone[7])]
    got = concurrently(lambda r: complete(http, *r), MIXED)
    assert [(r.headers["x-t2-mixture"], tokens(r)) for r in got] == want


def test_hostile_bodies_are_short_4xx_and_change_nothing(server, http, alone):
    tracebacks = server.tail(10 ** 7).count("Traceback")
    deep = "[" * 1000 + "]" * 1000
    for raw in [f'{{"model": "tiny", "prompt": {deep}, "max_tokens": 2}}',
                f'{{"model": "tiny", "prompt": "x", "vllm_xargs": {{"t2": {deep}}}}}',
                f'{{"model": "tiny", "prompt": "x", "t2": {{"alpha": {deep[:300]}{deep[-300:]}}}}}']:
        r = http.post("/v1/completions", content=raw,
                      headers={"content-type": "application/json"})
        assert r.status_code == 400 and "nested" in r.json()["error"]["message"], r.text
    r = complete(http, ARITH, {"t2_alpha": [10 ** 400, 0, 0, 0]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "t2_alpha", r.text
    assert "too large for a float" in r.json()["error"]["message"]
    for fields in [{"t2_expert": "x" * 1_000_000}, {"max_tokens": "y" * 1_000_000},
                   {"t2": {f"k{i}": 1 for i in range(10_000)}}]:
        r = complete(http, ARITH, fields)
        assert r.status_code == 400 and len(r.content) < 500, (r.status_code, len(r.content))
    r = http.post("/v1/t2/experts", json={"name": "a", "path": "a",
                                          **{f"f{i}": 1 for i in range(10_000)}})
    assert r.status_code == 400 and len(r.content) < 500
    time.sleep(0.5)
    assert server.tail(10 ** 7).count("Traceback") == tracebacks
    assert concurrently(lambda r: tokens(complete(http, *r)), MIXED) == alone


def readme_examples() -> list[tuple[str, dict, dict]]:
    """(route, body, headers) of the README's curl examples with a ``# -> headers`` line."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Serving\n", 1)[1].split("\n## ", 1)[0]
    out = []
    for route, body, said in re.findall(r"curl -si 127\.0\.0\.1:8000(\S+) [^\n]*\n\s*"
                                        r"-d '([^']*)'\n# -> ([^\n]*)\n", section):
        headers = dict(h.split(": ", 1) for h in re.split(r",\s+(?=x-t2-)", said))
        out.append((route, json.loads(body), headers))
    return out


def test_readme_examples_answer_as_the_readme_says(http):
    examples = readme_examples()
    assert len(examples) >= 4
    for route, body, headers in examples:
        r = http.post(route, json=body)
        assert r.status_code == 200, r.text
        assert {k: r.headers.get(k) for k in headers} == headers, body


def test_largest_alpha_leaves_other_requests_unchanged(http, alone):
    extreme = [(ARITH, {"t2_alpha": [4.0, -4.0, 0, 0]}), (OTHER, {"t2_alpha": [0, 0, 4, 4]}),
               (STRINGS, {"t2_alpha": {"strings": 4.0, "base": -4.0}})]
    results = concurrently(lambda r: complete(http, *r), extreme + MIXED)
    for r in results[:len(extreme)]:
        assert r.status_code == 200, r.text  # served (garbage for itself, maybe)
    assert [tokens(r) for r in results[len(extreme):]] == alone
    # KV blocks freed by the extreme requests are reused by the next ones
    assert [tokens(complete(http, *r)) for r in MIXED] == alone


def test_load_request_unload_then_404(http, alone):
    path = "arith.safetensors"   # relative to the run-time loading root
    r = http.post("/v1/t2/experts", json={"name": "arith-copy", "path": path})
    assert r.status_code == 200, r.text
    assert r.json()["parent"] == "tiny"
    assert "arith-copy" in [m["id"] for m in http.get("/v1/models").json()["data"]]
    assert tokens(complete(http, ARITH, {}, model="arith-copy")) == alone[1]
    assert tokens(complete(http, ARITH, {"t2_expert": "arith-copy"})) == alone[1]
    again = http.post("/v1/t2/experts", json={"name": "arith-copy", "path": path})
    assert again.status_code == 409 and "replace" in again.json()["error"]["message"]
    swap = http.post("/v1/t2/experts", json={"name": "arith-copy", "replace": True,
                                             "path": str(EXPERTS / "strings.safetensors")})
    assert swap.json()["root"] == "arith-copy"
    assert swap.status_code == 200
    assert tokens(complete(http, STRINGS, {}, model="arith-copy")) == alone[2]
    for body, status in [({"name": "../x", "path": path}, 400),
                         ({"name": "a/b", "path": path}, 400),
                         ({"name": "x" * 65, "path": path}, 400),
                         ({"name": "base", "path": path}, 400),
                         ({"name": "tiny", "path": path}, 400),
                         ({"name": "ok", "path": str(EXPERTS / "missing.safetensors")}, 400),
                         ({"name": "ok", "path": path, "replace": "yes"}, 400),
                         ({"name": "ok", "path": path, "force": True}, 400)]:
        r = http.post("/v1/t2/experts", json=body)
        assert r.status_code == status, (body, r.text)
    # outside the root and missing: one answer, whether the file exists or not
    texts = {http.post("/v1/t2/experts", json={"name": "ok", "path": p}).json()["error"][
        "message"].replace(repr(p), "P") for p in ["../README.md", "../nothing", "/etc/hostname"]}
    assert len(texts) == 1 and "inside the server's run-time loading root" in texts.pop()
    assert http.delete("/v1/t2/experts/arith-copy").status_code == 200
    assert complete(http, ARITH, {}, model="arith-copy").status_code == 404
    r = complete(http, ARITH, {"t2_expert": "arith-copy"})
    assert r.status_code == 400 and "unknown expert" in r.text
    assert http.delete("/v1/t2/experts/arith-copy").status_code == 404
    assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["tiny", *BANK]
    assert concurrently(lambda r: tokens(complete(http, *r)), MIXED) == alone


def test_automatic_adaptation_picks_the_labelled_expert(http):
    # The tiny base model's own pass 1 ("prompt") labels most arith questions with the
    # pre-training habit's label, the next in the cycle arith -> strings (results/README.md,
    # section 3), so the strings expert answers ARITH; the classification expert names the family.
    cases = [ARITH, STRINGS, CHOICE]
    want = {"prompt": ["strings", "strings", "choice"],
            "classifier": ["arith", "strings", "choice"]}
    for mode in ("prompt", "classifier"):
        got = concurrently(lambda p: complete(http, p, {"t2_adapt": mode}), cases)
        for prompt, expert, r in zip(cases, want[mode], got):
            assert r.status_code == 200, r.text
            assert r.headers["x-t2-adapt"] == mode
            assert r.headers["x-t2-expert"] == expert, (mode, prompt)
            assert float(r.headers["x-t2-pass1-ms"]) > 0
            fields = {} if expert == "base" else {"t2_expert": expert}
            assert tokens(r) == tokens(complete(http, prompt, fields))
    r = complete(http, ARITH, {"t2_adapt": "profile:mix"})
    assert tokens(r) == tokens(complete(http, ARITH, {"t2_alpha": {"arith": 0.7, "choice": 0.3}}))
    assert r.headers["x-t2-adapt"] == "profile:mix"
    assert json.loads(r.headers["x-t2-alpha"]) == {"arith": 0.7, "strings": 0.0, "choice": 0.3}
    r = complete(http, ARITH, {"t2_adapt": "profile:nope"})
    assert r.status_code == 400 and "unknown profile 'nope'" in r.text
    chat = http.post("/v1/chat/completions", json={
        "model": "tiny", "max_tokens": MAX_TOKENS, "temperature": 0, "t2_adapt": "prompt",
        "messages": [{"role": "user", "content": "rotate('exu')"}]})
    assert chat.status_code == 200 and chat.headers["x-t2-expert"] == "strings"


def test_expert_info_and_clean_shutdown(server, http):
    info = http.get("/v1/t2/experts").json()
    assert [e["id"] for e in info["experts"]] == BANK
    assert all(e["in_flight"] == 0 for e in info["experts"])
    stats = info["workers"][0]["stats"]
    assert not info["workers"][0]["hybrid"] and stats["merges"] == 0
    assert info["workers"][0]["worker_stats"]["rejected_in_worker"] == 0
    log = server.tail(200_000)
    assert "t2fast: experts (bank order, capacity 8): arith" in log
    assert "factored SVF kernels for every token" in log
    pgid = server.proc.pid  # the server leads its own process group (engine core, worker)
    assert server.stop() == 0
    assert "Application shutdown complete" in server.tail(20_000)
    time.sleep(2)
    with pytest.raises(ProcessLookupError):  # no process of the server is left
        os.killpg(pgid, 0)
