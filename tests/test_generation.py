"""t2fast.generation: prefill + decode steps agree with Hugging Face's own greedy generate."""
import warnings

import pytest
import torch

from t2fast.generation import (decode_n_tokens, decode_one_token, generate, generate_texts,
                               left_padding, prefill, special_ids)
from t2fast.models import build_char_tokenizer, random_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["Q: 12+7=?\nA:", "Q: reverse abc\nA:", "Q: x\nA:"]


@pytest.fixture(scope="module")
def world():
    return random_tiny_llama(0, num_hidden_layers=2).eval(), build_char_tokenizer()


@pytest.fixture(scope="module")
def trained():
    """The bundled tiny model: answers of different lengths, each ended by end-of-sequence."""
    from t2fast.models import load_tiny
    return load_tiny()


TASK_PROMPTS = ["Q: 12+7=?\nA: ", "Q: reverse('abc')\nA: ",
                "Q: Which is largest? A)347 B)712 C)128 D)550\nA: ", "Q: classify: 3+4=?\nA: "]


def hf_greedy(model, tok, prompts, max_new_tokens):
    """Hugging Face's greedy generate: the completion tokens [B, G] and the prompt length."""
    eos, pad = special_ids(tok)
    with left_padding(tok):
        enc = tok(prompts, return_tensors="pt", padding=True)
    ref = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=eos, pad_token_id=pad)
    return ref[:, enc["input_ids"].shape[1]:], enc["input_ids"].shape[1]


def test_greedy_generate_matches_hugging_face(trained):
    model, tok = trained
    eos, pad = special_ids(tok)
    out = generate(model, tok, TASK_PROMPTS, max_new_tokens=12)
    ref, prompt_len = hf_greedy(model, tok, TASK_PROMPTS, 12)
    got = out.completion_ids
    assert torch.equal(got, ref)                # the same tokens, and the same early stop
    assert 2 < got.shape[1] < 12                # every row ended before the budget
    ends = (got == eos).float().argmax(1)       # each row's end-of-sequence ...
    assert sorted(set(ends.tolist())) == sorted(ends.tolist())   # ... at different steps
    steps = torch.arange(got.shape[1])
    assert torch.equal(out.completion_mask, (steps[None] <= ends[:, None]).float())
    assert bool((got[out.completion_mask == 0] == pad).all())
    assert out.texts == tok.batch_decode(ref, skip_special_tokens=True)
    assert out.prompt_len == prompt_len


def test_steps_compose_to_generate(trained):
    """prefill + decode_n_tokens, called directly, give Hugging Face's greedy tokens."""
    model, tok = trained
    eos, pad = special_ids(tok)
    with left_padding(tok):
        enc = tok(TASK_PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits, past, last_pos = prefill(model, enc["input_ids"], enc["attention_mask"])
        assert logits.shape == (len(TASK_PROMPTS), model.config.vocab_size)
        tokens, alive = decode_n_tokens(model, logits, past, enc["attention_mask"], last_pos, 5,
                                        eos, pad)
    assert torch.equal(tokens, hf_greedy(model, tok, TASK_PROMPTS, 5)[0])
    assert alive.dtype == torch.bool and bool(alive[:, 0].all())
    assert not bool(alive[:, -1].all())         # a row ended within the five steps


def test_decode_one_token_extends_the_cache(world):
    model, tok = world
    with left_padding(tok):
        enc = tok(PROMPTS[:1], return_tensors="pt", padding=True)
    ids, am = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        logits, past, pos = prefill(model, ids, am)
        nxt = logits.argmax(-1)
        step_logits, _ = decode_one_token(model, nxt, torch.cat([am, am[:, :1]], 1), pos + 1,
                                          past)
        full = model(input_ids=torch.cat([ids, nxt[:, None]], 1)).logits[:, -1]
    torch.testing.assert_close(step_logits, full, rtol=1e-4, atol=1e-4)


def test_the_cache_is_passed_by_the_installed_transformers_own_name(world):
    """No deprecated keyword: recent transformers renamed ``past_key_values`` to ``cache`` (and
    announced the old name's removal); both the generation loop and the trainer's grouped
    likelihood pass whichever name the installed release reads."""
    import inspect
    import warnings

    from t2fast.generation import CACHE_FIELD, cache_field
    from t2fast.train.rollout import completion_logits, repeat_prompts

    model, tok = world
    assert cache_field(model) == CACHE_FIELD in inspect.signature(model.forward).parameters

    class Old(torch.nn.Module):          # an architecture that kept the old keyword
        def forward(self, input_ids, past_key_values=None, use_cache=False):
            ...

    class Opaque(torch.nn.Module):       # a wrapper that hides its keywords
        def forward(self, *args, **kwargs):
            ...

    assert (cache_field(Old()), cache_field(Opaque())) == ("past_key_values", CACHE_FIELD)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        with torch.no_grad():
            rollout = generate(model, tok, repeat_prompts(PROMPTS[:2], 2), max_new_tokens=3)
            completion_logits(model, rollout, group_size=2)


def test_a_tokenizer_without_a_pad_token_pads_with_eos(world):
    """Llama-3 and Mistral base tokenizers have no pad token: generation and teacher-forced
    batches pad with end-of-sequence (masked) and leave the tokenizer as it was."""
    from t2fast.train.rollout import teacher_batch

    model, tok = world
    with torch.no_grad():
        want = generate(model, tok, PROMPTS, max_new_tokens=3).texts
    tok.pad_token = None
    try:
        assert tok.pad_token_id is None
        with torch.no_grad():
            assert generate(model, tok, PROMPTS, max_new_tokens=3).texts == want
        teacher_batch(tok, PROMPTS[:2], ["1", "22"])
        assert tok.pad_token is None
    finally:
        tok.pad_token = "<pad>"


def test_rows_end_at_any_end_of_sequence_id_of_the_generation_config(world):
    """Chat models end a turn with another token than the tokenizer's eos (Llama-3-Instruct's
    ``<|eot_id|>``), listed in their generation config: a row ends there, as with HF."""
    model, tok = world
    with torch.no_grad():
        free = generate(model, tok, PROMPTS[:1], max_new_tokens=6)
    assert free.completion_mask.sum() == 6           # never ends by itself (random weights)
    stop = int(free.input_ids[0, free.prompt_len + 2])
    old = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tok.eos_token_id, stop]
    try:
        with torch.no_grad():
            ended = generate(model, tok, PROMPTS[:1], max_new_tokens=6)
            explicit = generate(model, tok, PROMPTS[:1], max_new_tokens=6,
                                eos_token_id=tok.eos_token_id)
    finally:
        model.generation_config.eos_token_id = old
    first = int((free.input_ids[0, free.prompt_len:] == stop).nonzero()[0])
    assert ended.completion_mask[0].tolist() == [1.0] * (first + 1) + [0.0] * (
        ended.completion_mask.shape[1] - first - 1)
    assert explicit.completion_mask.sum() == 6       # an explicit eos_token_id is the only one


def test_bad_arguments():
    model, tok = random_tiny_llama(0, num_hidden_layers=1), build_char_tokenizer()
    with pytest.raises(ValueError, match="no prompts"):
        generate(model, tok, [])
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate(model, tok, ["a"], max_new_tokens=0)
    # one string is not a list of one-character prompts; rows per call are at least one
    with pytest.raises(TypeError, match="generate: prompts must be a sequence of strings, got "
                                        "one string; pass \\[prompt\\]"):
        generate(model, tok, "Q: 1+1=?\nA: ")
    with pytest.raises(TypeError, match="generate_texts: prompts must be"):
        generate_texts(model, tok, "ab")
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="generate_texts: batch_size must be a positive int"):
            generate_texts(model, tok, ["a", "b"], batch_size=bad)
    import numpy as np

    assert len(generate_texts(model, tok, ["a", "b"], batch_size=np.int64(1),
                              max_new_tokens=1)) == 2


@pytest.fixture(scope="module")
def short_gpt2():
    """A GPT-2 of 16 learned positions: a position past them is an index error in its table."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = build_char_tokenizer()
    config = GPT2Config(vocab_size=len(tok), n_positions=16, n_embd=32, n_layer=1, n_head=2,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval(), tok


def test_a_prompt_longer_than_the_models_positions_is_refused_by_name(short_gpt2):
    from t2fast.train.rollout import completion_logits, teacher_batch

    model, tok = short_gpt2
    with pytest.raises(ValueError, match=r"prompt 1 is 17 tokens long and 1 more for an "
                                         r"answer; the model takes at most 16 positions"):
        generate(model, tok, ["Q: 1\nA:", "Q: 1234567890\nA:"])
    with pytest.raises(ValueError, match="prompt 0 is 16 tokens long and 1 more"):
        generate(model, tok, ["Q: 123456789\nA:"])     # no position left for the answer
    with pytest.raises(ValueError, match="row 0 is 19 tokens long"):
        completion_logits(model, teacher_batch(tok, ["Q: 1234567890\nA:"], ["7"]))


def test_rows_end_at_the_models_last_position_each_as_if_alone(short_gpt2):
    """A row whose prompt and completion fill the model's positions ends there (16 tokens in
    all; before, the next step indexed past GPT-2's position table), whatever its batch."""
    model, tok = short_gpt2
    prompts = ["Q: 1234\nA:", "Q: 1\nA:", "Q: 12345678\nA:"]
    with pytest.warns(UserWarning, match="3 of 3 completions filled the model's 16 positions"):
        with torch.no_grad():
            out = generate(model, tok, prompts, max_new_tokens=20)
    assert out.attention_mask.sum(-1).tolist() == [16, 16, 16]
    for i, prompt in enumerate(prompts):
        with pytest.warns(UserWarning), torch.no_grad():
            assert generate(model, tok, [prompt], max_new_tokens=20).texts == [out.texts[i]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():        # ended by the budget on the last position: no warning
            out = generate(model, tok, prompts, max_new_tokens=1)
    assert out.attention_mask.sum(-1).tolist() == [12, 9, 16]


def test_the_position_limit_follows_rope_scaling_as_vllm_does():
    """A YaRN model keeps max_position_embeddings at its trained length and serves the factor
    times it; Llama-3's limit already includes its scaling; dynamic NTK multiplies it."""
    from types import SimpleNamespace

    from t2fast.generation import position_limit

    def limit(**config):
        return position_limit(SimpleNamespace(config=SimpleNamespace(**config)))

    assert limit(max_position_embeddings=32768, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}) == 131072
    assert limit(max_position_embeddings=131072, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}) == 131072
    assert limit(max_position_embeddings=2048, rope_scaling={"type": "dynamic",
                                                             "factor": 2.0}) == 4096
    assert limit(n_positions=1024) == 1024 and limit() is None
