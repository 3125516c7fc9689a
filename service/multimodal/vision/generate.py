"""Greedy decoding of a frozen transformers LM with image rows spliced into its input embeddings.

A reference for the serving engine and the decoder the bench and the training report use: prompts
are left-padded into one batch, position ids count real tokens only, and the KV cache is an
ordinary DynamicCache (image positions are ordinary positions once their embeddings are in).
"""

from __future__ import annotations

import torch

from service.multimodal.vision.prompt import IMAGE_TOKEN_ID, splice_image_embeds


def lm_cache():
    from transformers import DynamicCache

    return DynamicCache()


@torch.inference_mode()
def greedy(lm, prompts: list[list[int]], image_embeds: torch.Tensor | None = None, max_new_tokens: int = 8,
           eos_ids: tuple[int, ...] = (), image_token_id: int = IMAGE_TOKEN_ID) -> list[list[int]]:
    """Greedy continuations (eos excluded) of `prompts` (expanded ids). image_embeds: the rows for
    every placeholder position of the batch in order ([num_images, N, H]), or None for text-only
    prompts."""
    # ids, mask: [B, T] (left-padded)
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):], mask[r, width - len(p):] = torch.tensor(p), 1
    embed = lm.get_input_embeddings()
    x = embed(ids)  # [B, T, H]
    if image_embeds is not None:
        x = splice_image_embeds(x, ids.masked_fill(mask == 0, -1), image_embeds, image_token_id)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = lm_cache()
    out: list[list[int]] = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool)
    eos = torch.tensor(list(eos_ids) or [-1])
    for _ in range(max_new_tokens):
        logits = lm(inputs_embeds=x, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                    logits_to_keep=1).logits[:, -1]
        nxt = logits.argmax(-1)  # [B]
        done |= torch.isin(nxt, eos)
        for r in range(len(prompts)):
            if not done[r]:
                out[r].append(int(nxt[r]))
        if bool(done.all()):
            break
        x = embed(nxt)[:, None]  # [B, 1, H]
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=torch.long)], 1)
        pos = pos[:, -1:] + 1
    return out


def ask(lm, tokenizer, adapter, images, questions: list[str], batch: int = 32, max_new_tokens: int = 8) -> list[str]:
    """Greedy answers to one question per image, the prompt convention of prompt.py. adapter=None
    asks blind: the same questions with no image (no placeholder in the prompt)."""
    from service.multimodal.vision.prompt import end_of_turn_ids, image_token_id, prompt_ids

    eos = tuple(end_of_turn_ids(tokenizer)) + ((tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ())
    answers: list[str] = []
    for i in range(0, len(questions), batch):
        qs = questions[i: i + batch]
        if adapter is None:
            prompts = [prompt_ids(tokenizer, q, 1, num_images=0) for q in qs]
            rows, image_id = None, IMAGE_TOKEN_ID
        else:
            image_id = image_token_id(tokenizer)
            prompts = [prompt_ids(tokenizer, q, adapter.num_image_tokens) for q in qs]
            rows = adapter.embed_images(images[i: i + batch]).float()
        outs = greedy(lm, prompts, rows, max_new_tokens, eos, image_id)
        answers += [tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs]
    return answers
