"""t2fast.generation: prefill + decode steps agree with Hugging Face's own greedy generate."""
import pytest
import torch

from t2fast.generation import (decode_n_tokens, decode_one_token, generate, left_padding, prefill,
                               special_ids)
from t2fast.models import build_char_tokenizer, random_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["Q: 12+7=?\nA:", "Q: reverse abc\nA:", "Q: x\nA:"]


@pytest.fixture(scope="module")
def world():
    return random_tiny_llama(0, num_hidden_layers=2).eval(), build_char_tokenizer()


def test_greedy_generate_matches_hugging_face(world):
    model, tok = world
    eos, pad = special_ids(tok)
    out = generate(model, tok, PROMPTS, max_new_tokens=6)
    with left_padding(tok):
        enc = tok(PROMPTS, return_tensors="pt", padding=True)
    ref = model.generate(**enc, max_new_tokens=6, do_sample=False, eos_token_id=eos,
                         pad_token_id=pad)[:, enc["input_ids"].shape[1]:]
    got = out.completion_ids
    assert got.shape[1] > 1                     # the rows do not stop at once
    assert torch.equal(got, ref[:, :got.shape[1]])
    assert out.completion_mask.shape == got.shape and out.prompt_len == enc["input_ids"].shape[1]


def test_steps_compose_to_generate(world):
    model, tok = world
    eos, pad = special_ids(tok)
    with left_padding(tok):
        enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits, past, last_pos = prefill(model, enc["input_ids"], enc["attention_mask"])
        assert logits.shape == (len(PROMPTS), model.config.vocab_size)
        tokens, alive = decode_n_tokens(model, logits, past, enc["attention_mask"], last_pos, 5,
                                        eos, pad)
    assert torch.equal(tokens, generate(model, tok, PROMPTS, max_new_tokens=5).completion_ids)
    assert alive.dtype == torch.bool and bool(alive[:, 0].all())


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


def test_bad_arguments():
    model, tok = random_tiny_llama(0, num_hidden_layers=1), build_char_tokenizer()
    with pytest.raises(ValueError, match="no prompts"):
        generate(model, tok, [])
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate(model, tok, ["a"], max_new_tokens=0)
