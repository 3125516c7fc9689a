"""Calibration text for int8 smoothing, shipped with the package (no dataset download at load).

`calibration.txt` is our own mixed text (prose, chat turns, code, SQL, numbers, JSON, several
languages): smoothing only needs each channel's typical activation range, and bench/perplexity.py
checks the result on held-out text of another kind.
"""

from __future__ import annotations

from pathlib import Path

import torch

CALIBRATION_TEXT = Path(__file__).with_name("calibration.txt")


def calibration_batches(tokenizer, seq_len: int = 512, max_tokens: int = 2048) -> list[torch.Tensor]:
    """The calibration text as [1, <= seq_len] token tensors, max_tokens in all."""
    ids = tokenizer(CALIBRATION_TEXT.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    ids = ids[:max_tokens]
    return [torch.tensor([ids[i : i + seq_len]]) for i in range(0, len(ids), seq_len)]
