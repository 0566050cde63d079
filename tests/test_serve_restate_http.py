"""``t2fast serve --restate`` over real HTTP: the transfer base model (pre-trained on two-step
answers, so it restates) with its own experts and classification expert, against
``t2fast.adapt.Restated`` on the Hugging Face model patched by ``t2fast.patch_model``."""
from __future__ import annotations

from pathlib import Path

import pytest

from test_serve_http import _MISSING, concurrently

pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(_MISSING is not None, reason=f"needs vllm, httpx, openai "
                                                              f"({_MISSING})")]

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "results" / "transfer_base"
FAMILIES = ["arith", "strings", "choice"]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from t2fast.serve.launch import ServerProcess, t2fast_serve_command
    from t2fast.serve.profiles import save_profile

    log = tmp_path_factory.mktemp("serve-restate") / "server.log"
    restated = save_profile(log.parent / "r.json", [0.0, 1.0, 0.0], FAMILIES, restated=True)
    cmd = t2fast_serve_command(
        str(MODEL), "--served-model-name", "tb",
        "--experts", *(str(MODEL / "experts" / f"{f}.safetensors") for f in FAMILIES),
        "--classifier", str(MODEL / "experts" / "classify.safetensors"), "--restate",
        "--profiles", f"strings={restated}", "--svd-cache-dir", str(log.parent / "svd"),
        "--enforce-eager", "--max-num-seqs=16", "--seed=0")
    proc = ServerProcess(cmd, log, env={"VLLM_DISABLE_COMPILE_CACHE": "1",
                                        "TOKENIZERS_PARALLELISM": "false",
                                        "TRITON_INTERPRET": None}).start()
    yield proc
    proc.stop()


def test_restating_server_answers_as_the_restated_two_pass_engine(server):
    """Transfer and two-step questions, sent together: each response's restated question,
    expert and text equal Restated(ClassifierDispatch) on the Hugging Face model; a profile
    searched on restated questions is served on the restated question too."""
    import httpx

    import t2fast
    from t2fast.adapt import ClassifierDispatch, FixedMixture, Restated, TwoPassEngine
    from t2fast.cli import load_model
    from t2fast.tasks import get_task

    prompts = [e.prompt for fam in ("arith_words", "strings_words", "choice_steps")
               for e in get_task(fam).examples("test", 3)] + ["Q: hello there\nA: "]
    with httpx.Client(base_url=server.url, timeout=120) as http:
        def ask(prompt, adapt="classifier"):
            return http.post("/v1/completions", json={
                "model": "tb", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                "t2_adapt": adapt})
        got = concurrently(ask, prompts)
        profiled = ask(prompts[3], "profile:strings")
    assert all(r.status_code == 200 for r in got), [r.text for r in got]

    model, tok = load_model(str(MODEL))
    handle = t2fast.patch_model(model, [MODEL / "experts" / f"{f}.safetensors"
                                        for f in (*FAMILIES, "classify")],
                                backend="torch", hybrid=False, progress=False, cache_dir=False)
    strategy = Restated(ClassifierDispatch(handle, tok, "classify", FAMILIES), handle, tok)
    ref = TwoPassEngine(handle, tok, max_new_tokens=MAX_TOKENS).run(prompts, strategy)
    assert [r.headers["x-t2-restated"] for r in got] == \
        [q or "none" for q in strategy.last_restated]
    assert sum(q is not None for q in strategy.last_restated) >= 9     # the model restates
    assert [r.headers["x-t2-expert"] for r in got] == [m or "base" for m in ref.mixtures]
    assert [r.json()["choices"][0]["text"] for r in got] == ref.outputs

    assert profiled.headers["x-t2-restated"] == strategy.last_restated[3]
    assert profiled.headers["x-t2-mixture"] == '{"strings":1.0}'
    want = TwoPassEngine(handle, tok, max_new_tokens=MAX_TOKENS).run(
        prompts[3:4], Restated(FixedMixture("strings"), handle, tok))
    assert profiled.json()["choices"][0]["text"] == want.outputs[0]
