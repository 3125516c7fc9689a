"""The prompt convention the adapter is trained with, and that the serving engine splices the same way.

1. Chat text: each image is the placeholder string IMAGE_TOKEN ("<empty_output>") in the user
   message's content, followed by "\\n", before the text that refers to it (image parts first,
   then the question): content = "<empty_output>\\nWhat colour is the shape?". The chat is
   rendered with the model's own chat template (ChatML for SmolLM2; with no system message its
   template adds its default system prompt, exactly as the server's render_chat does) and
   add_generation_prompt=True.
2. Token ids: IMAGE_TOKEN is one special token in the SmolLM2 tokenizer, IMAGE_TOKEN_ID = 16
   (a StarCoder-format marker, `<empty_output>`, that ChatML chat never produces). After
   tokenization (add_special_tokens=False) each IMAGE_TOKEN_ID is expanded to
   config["num_image_tokens"] copies (`expand_image_placeholders`).
3. Embeddings: the LM's input embeddings are taken for all ids, then the rows at the image
   positions are replaced, in order, by the adapter's output rows (`splice_image_embeds`):
   image i's N rows fill its N positions. Positions, attention and the KV cache are ordinary.

Why a special token: the tokenizer maps the string to one id and never produces that id from
ordinary text, so positions are found by id. Caveat for the API layer: a user who types the
literal "<empty_output>" gets that id too (special tokens are matched in text); the number of
placeholder ids must equal the number of images (`count_image_placeholders`) or the request is
rejected, or user text must be stripped of IMAGE_TOKEN (`strip_image_token`) before rendering.
"""

from __future__ import annotations

import torch

IMAGE_TOKEN = "<empty_output>"
IMAGE_TOKEN_ID = 16  # in the SmolLM2 tokenizer; image_token_id(tokenizer) checks it


def image_token_id(tokenizer) -> int:
    """IMAGE_TOKEN's id in `tokenizer`; ValueError when it is not a single special token there."""
    ids = tokenizer.encode(IMAGE_TOKEN, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"{IMAGE_TOKEN!r} is not one token in this tokenizer ({ids}): no image placeholder")
    return ids[0]


def end_of_turn_ids(tokenizer) -> list[int]:
    """What ends an assistant answer: <|im_end|> for ChatML templates, else the EOS token."""
    ids = tokenizer.encode("<|im_end|>", add_special_tokens=False)
    return ids if len(ids) == 1 else [tokenizer.eos_token_id]


def user_content(question: str, num_images: int = 1) -> str:
    """The user message text: one placeholder line per image, then the question."""
    return "".join(IMAGE_TOKEN + "\n" for _ in range(num_images)) + question


def strip_image_token(text: str) -> str:
    """User text with any literal IMAGE_TOKEN removed (so it cannot pose as an image)."""
    return text.replace(IMAGE_TOKEN, "")


def build_prompt(tokenizer, question: str, num_images: int = 1) -> str:
    """The rendered chat (model's template, generation prompt added) for one user turn with
    `num_images` images before the question (0: the blind prompt, text only)."""
    messages = [{"role": "user", "content": user_content(strip_image_token(question), num_images)}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_ids(tokenizer, question: str, num_image_tokens: int, num_images: int = 1) -> list[int]:
    """build_prompt tokenized, each placeholder expanded to num_image_tokens ids."""
    ids = tokenizer.encode(build_prompt(tokenizer, question, num_images), add_special_tokens=False)
    return expand_image_placeholders(ids, num_image_tokens, image_token_id(tokenizer) if num_images else IMAGE_TOKEN_ID)


def count_image_placeholders(token_ids: list[int], image_token_id: int = IMAGE_TOKEN_ID) -> int:
    return sum(1 for t in token_ids if t == image_token_id)


def expand_image_placeholders(token_ids: list[int], num_image_tokens: int,
                              image_token_id: int = IMAGE_TOKEN_ID) -> list[int]:
    """Each placeholder id -> num_image_tokens copies. Not idempotent: ValueError on ids that look
    already expanded (two placeholders in a row), unless num_image_tokens is 1."""
    if num_image_tokens < 1:
        raise ValueError("num_image_tokens must be >= 1")
    out: list[int] = []
    for i, t in enumerate(token_ids):
        if t == image_token_id:
            if num_image_tokens > 1 and i and token_ids[i - 1] == image_token_id:
                raise ValueError("adjacent image placeholders: ids already expanded?")
            out += [t] * num_image_tokens
        else:
            out.append(t)
    return out


def splice_image_embeds(inputs_embeds: torch.Tensor, input_ids: torch.Tensor, image_embeds: torch.Tensor,
                        image_token_id: int = IMAGE_TOKEN_ID) -> torch.Tensor:
    """Replace the rows of the (expanded) placeholder positions by the image rows, in order.

    inputs_embeds: [..., T, H]; input_ids: [..., T]; image_embeds: [num_images, N, H] or [M, H]
    with M = the number of placeholder positions. Differentiable in inputs_embeds and image_embeds."""
    mask = input_ids == image_token_id  # [..., T]
    rows = image_embeds.reshape(-1, image_embeds.shape[-1])
    if int(mask.sum()) != rows.shape[0]:
        raise ValueError(f"{int(mask.sum())} image placeholder positions but {rows.shape[0]} image embedding rows")
    return inputs_embeds.masked_scatter(mask.unsqueeze(-1), rows.to(inputs_embeds.dtype))
