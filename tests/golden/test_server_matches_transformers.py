"""The server's greedy output equals transformers' own generate() for the same model and prompt."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import CHAT_MODEL

pytestmark = pytest.mark.slow
PROMPTS = ["What is the capital of France?", "List three primary colors.", "Write a haiku about rain."]
MAX_NEW = 24


@pytest.fixture(scope="module")
def hf_model(chat_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(chat_model_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("question", PROMPTS)
def test_greedy_matches_transformers_generate(client, hf_model, chat_tokenizer, question):
    messages = [{"role": "user", "content": question}]
    r = client.chat.completions.create(model=CHAT_MODEL, messages=messages, max_tokens=MAX_NEW, temperature=0,
                                       logprobs=True)
    prompt = chat_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([chat_tokenizer.encode(prompt, add_special_tokens=False)])
    with torch.inference_mode():
        out = hf_model.generate(ids, max_new_tokens=MAX_NEW, do_sample=False, attention_mask=torch.ones_like(ids))
    expected = out[0, ids.shape[1]:].tolist()
    served_tokens = [t.token for t in r.choices[0].logprobs.content]
    assert served_tokens == [chat_tokenizer.decode([i]) for i in expected]  # token for token
    assert r.usage.completion_tokens == len(expected)
    assert r.choices[0].message.content == chat_tokenizer.decode(expected, skip_special_tokens=True)
