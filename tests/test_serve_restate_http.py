"""``t2fast serve --restate`` over real HTTP: the transfer base model (pre-trained on two-step
answers, so it restates) with its own experts and classification expert.

Each adapted response is checked against the server itself: the restatement it reports is the
first line the base weights write for ``step by step: QUESTION``, and its text is what the
restated question gets with the chosen expert named directly. (The Hugging Face model agrees
on most questions, not all: over 64 restated tokens vLLM's and Hugging Face's float32 kernels
differ in the last bits, so a comparison with it would depend on the machine.)
"""
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


def test_restating_server_asks_the_restated_question(server):
    """Transfer and two-step questions sent together: the model restates them as their parent
    family's questions, the classification expert routes those to the parent, and each answer
    is the restated question's with that expert; a question without a first step is asked as
    sent; a profile searched on restated questions is served on the restated question."""
    import httpx

    from t2fast.adapt import restatement_prompt
    from t2fast.tasks import PARENT_FAMILY, format_prompt, get_task
    from t2fast.tasks.steps import first_step

    cases = [(fam, e.prompt) for fam in ("arith_words", "strings_words", "choice_steps")
             for e in get_task(fam).examples("test", 3)]
    cases += [(None, "Q: step by step: what is 147 plus 8?\nA: ")]
    with httpx.Client(base_url=server.url, timeout=120) as http:
        def ask(prompt, max_tokens=MAX_TOKENS, **fields):
            r = http.post("/v1/completions", json={
                "model": "tb", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                **fields})
            assert r.status_code == 200, r.text
            return r

        def text(r):
            return r.json()["choices"][0]["text"]

        got = concurrently(lambda c: ask(c[1], t2_adapt="classifier"), cases)
        assert got[-1].headers["x-t2-restated"] == "147+8=?"
        restated = [r.headers["x-t2-restated"] for r in got]
        assert sum(q != "none" for q in restated) >= 9              # the model restates
        parents = [r.headers["x-t2-expert"] == PARENT_FAMILY.get(fam, "arith")
                   for (fam, _), r in zip(cases, got)]
        assert sum(parents) >= 9                                   # ... and B routes them
        for (_, prompt), r, q in zip(cases, got, restated):
            base = ask(restatement_prompt(prompt), 64, t2_expert="base")
            assert (first_step(text(base)) or "none") == q
            asked = prompt if q == "none" else format_prompt(q)
            assert text(r) == text(ask(asked, t2_expert=r.headers["x-t2-expert"]))
        hello = ask("Q: hello there\nA: ", t2_adapt="classifier")
        assert hello.headers["x-t2-restated"] == "none"
        assert text(hello) == text(ask("Q: hello there\nA: ",
                                       t2_expert=hello.headers["x-t2-expert"]))
        profiled = ask(cases[3][1], t2_adapt="profile:strings")
        assert profiled.headers["x-t2-restated"] == restated[3]
        assert profiled.headers["x-t2-mixture"] == '{"strings":1.0}'
        assert text(profiled) == text(ask(format_prompt(restated[3]), t2_expert="strings"))
