"""Batched sampling with per-row parameters: one set of tensor ops for the whole batch.

Rows may differ in temperature, top-k, top-p, min-p, penalties and seed. Seeded rows draw their
noise from their own `torch.Generator`, so a seeded request samples the same tokens alone or in a
batch (the exponential-race trick: argmax(p / q), q ~ Exp(1), is a draw from p).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from service.engine.types import SamplingParams, TokenLogprob


@dataclass
class SamplingRow:
    params: SamplingParams
    generator: torch.Generator | None
    output_token_ids: list[int]  # tokens generated so far by this row (for penalties)
    prompt_token_ids: list[int]  # for the repetition penalty (applies to prompt and output)
    banned_token_ids: list[int]
    # Structured output: the tokens a grammar allows next, as a packed bitmask (int32 words, bit j of
    # word w = token 32 * w + j; llguidance's layout). None = no constraint.
    allowed_mask: torch.Tensor | None = None


def make_generator(seed: int | None, index: int, device: torch.device) -> torch.Generator | None:
    """A per-sequence generator: sequence `index` of a seeded request gets seed + index."""
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed((seed + index) & 0xFFFF_FFFF_FFFF_FFFF)
    return gen


def _column(rows: list[SamplingRow], name: str, device, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor([getattr(r.params, name) for r in rows], device=device, dtype=dtype)


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    # logits: [B, V]
    presence = [r.params.presence_penalty for r in rows]
    frequency = [r.params.frequency_penalty for r in rows]
    repetition = [r.params.repetition_penalty for r in rows]
    device = logits.device
    if any(p != 0.0 for p in presence) or any(f != 0.0 for f in frequency):
        counts = torch.zeros_like(logits)
        for i, r in enumerate(rows):  # scatter of a few hundred ids per row, cheap next to a forward
            if r.output_token_ids:
                ids = torch.tensor(r.output_token_ids, device=device)
                counts[i].index_add_(0, ids, torch.ones_like(ids, dtype=logits.dtype))
        pres = torch.tensor(presence, device=device).unsqueeze(1)
        freq = torch.tensor(frequency, device=device).unsqueeze(1)
        logits = logits - freq * counts - pres * (counts > 0).to(logits.dtype)
    if any(p != 1.0 for p in repetition):
        seen = torch.zeros_like(logits, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids = r.prompt_token_ids + r.output_token_ids
            if ids:
                seen[i, torch.tensor(ids, device=device)] = True
        rep = torch.tensor(repetition, device=device).unsqueeze(1).expand_as(logits)
        penalized = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalized, logits)
    return logits


_BIT = torch.arange(32, dtype=torch.int32)


def unpack_mask(words: torch.Tensor, vocab: int) -> torch.Tensor:
    """words: [B, W] int32 bitmask -> [B, vocab] bool allowed (ids past 32 * W are not allowed)."""
    bits = ((words.unsqueeze(-1) >> _BIT.to(words.device)) & 1).reshape(words.shape[0], -1).bool()
    if bits.shape[1] >= vocab:
        return bits[:, :vocab]
    return torch.nn.functional.pad(bits, (0, vocab - bits.shape[1]), value=False)


def _ban(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Controllers' banned tokens and grammars' allowed sets, per row; rows without either are untouched."""
    constrained = [i for i, r in enumerate(rows) if r.allowed_mask is not None]
    if not constrained and not any(r.banned_token_ids for r in rows):
        return logits
    logits = logits.clone()
    for i, r in enumerate(rows):
        if r.banned_token_ids:
            logits[i, r.banned_token_ids] = float("-inf")
    if constrained:  # one unpack for every constrained row of the batch
        words = torch.stack([rows[i].allowed_mask for i in constrained]).to(logits.device)
        allowed = unpack_mask(words, logits.shape[-1])
        index = torch.tensor(constrained, device=logits.device)
        logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
    return logits


PREFILTER_K = 256  # candidates kept by topk before the exact top-k/top-p/min-p filter


def _drop_mask(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """probs: [B, K] in descending order (full-vocabulary softmax values) -> tokens to drop."""
    ranks = torch.arange(probs.shape[1], device=probs.device).unsqueeze(0)
    drop = ranks >= top_k.unsqueeze(1)
    cum_before = probs.cumsum(dim=-1) - probs  # mass strictly above this token
    drop |= cum_before > top_p.unsqueeze(1)
    drop |= probs < (min_p.unsqueeze(1) * probs[:, :1])
    drop[:, 0] = False  # always keep the best token
    return drop


def _filter_params(rows: list[SamplingRow], vocab: int, device):
    temps = _column(rows, "temperature", device).clamp_min(1e-5).unsqueeze(1)
    top_k = torch.tensor([r.params.top_k if r.params.top_k > 0 else vocab for r in rows], device=device)
    top_p = _column(rows, "top_p", device)
    min_p = _column(rows, "min_p", device)
    unfiltered = (top_k >= vocab) & (top_p >= 1.0) & (min_p <= 0)
    return temps, top_k, top_p, min_p, unfiltered


def _candidates(scaled: torch.Tensor, top_k, top_p, min_p, k: int):
    """The filters on the top k tokens of each row. Returns (kept logits [B, k], -inf where dropped;
    their token ids [B, k]; exact [B]: True where every token past the k would be dropped anyway)."""
    vals, idx = scaled.topk(k, dim=-1)  # sorted, descending
    probs = (vals - scaled.logsumexp(dim=-1, keepdim=True)).exp()
    exact = (top_k <= k) | (probs.sum(-1) > top_p) | (probs[:, -1] < min_p * probs[:, 0])
    return vals.masked_fill(_drop_mask(probs, top_k, top_p, min_p), float("-inf")), idx, exact


def _filter(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p over the whole vocabulary. logits: [B, V] -> scaled logits,
    -inf where dropped. The reference the candidate path of `_sample_rows` must match."""
    vocab = logits.shape[-1]
    temps, top_k, top_p, min_p, unfiltered = _filter_params(rows, vocab, logits.device)
    logits = logits / temps
    if bool(unfiltered.all()):
        return logits
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    drop = _drop_mask(sorted_logits.softmax(dim=-1), top_k, top_p, min_p)
    filtered = torch.empty_like(logits).scatter_(1, sorted_idx, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.where(unfiltered.unsqueeze(1), logits, filtered)  # cumsum rounding may pass 1.0


def _race(probs: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """One draw per row from probs [B, N]: argmax(p / q), q ~ Exp(1) from the row's own generator."""
    noise = torch.empty_like(probs)
    unseeded = [i for i, r in enumerate(rows) if r.generator is None]
    if unseeded:
        noise[unseeded] = torch.empty((len(unseeded), probs.shape[1]), device=probs.device).exponential_()
    for i, r in enumerate(rows):
        if r.generator is not None:
            noise[i].exponential_(generator=r.generator)
    return (probs / noise).argmax(dim=-1)


def _sample_rows(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Sampled token ids [B] for rows that do not decode greedily.

    Sorting and drawing over the whole vocabulary costs ~110 ms for [32, 49152] on 2 cores, more
    than a model step; the candidate path takes ~9 ms (bench/sampler_filter.py). So each row draws among its top PREFILTER_K candidates when that is
    exact: every token past them would be dropped anyway (top_k <= PREFILTER_K, the candidates hold
    more than top_p of the mass, or the last one is below the min_p cut). Otherwise, and for rows
    with no filter, it draws over the whole vocabulary. The choice depends on the row alone, so a
    seeded row draws the same tokens alone or in any batch."""
    vocab = logits.shape[-1]
    temps, top_k, top_p, min_p, unfiltered = _filter_params(rows, vocab, logits.device)
    picked = torch.empty(len(rows), dtype=torch.long, device=logits.device)
    fast = torch.zeros(len(rows), dtype=torch.bool, device=logits.device)
    k = min(PREFILTER_K, vocab)
    if k >= vocab or not bool(unfiltered.all()):  # row-wise: never decided by the other rows
        kept, idx, exact = _candidates(logits / temps, top_k, top_p, min_p, k)
        fast = (exact & ~unfiltered) | (k >= vocab)
    if bool(fast.any()):
        f = fast.nonzero().squeeze(1)
        j = _race(kept[f].softmax(dim=-1), [rows[i] for i in f.tolist()])
        picked[f] = idx[f].gather(1, j.unsqueeze(1)).squeeze(1)
    if not bool(fast.all()):
        s = (~fast).nonzero().squeeze(1)
        slow_rows = [rows[i] for i in s.tolist()]
        picked[s] = _race(_filter(logits[s], slow_rows).softmax(dim=-1), slow_rows)
    return picked


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> tuple[torch.Tensor, list[TokenLogprob] | None]:
    """logits: [B, V] float32 (raw model output for the next position). Returns token ids [B]."""
    raw = logits
    logits = _ban(apply_penalties(logits.float(), rows), rows)
    chosen = logits.argmax(dim=-1)
    sampling = [i for i, r in enumerate(rows) if not r.params.greedy]
    if sampling:
        index = torch.tensor(sampling, device=logits.device)
        chosen[index] = _sample_rows(logits[index], [rows[i] for i in sampling])
    logprobs = None
    if any(r.params.logprobs for r in rows):
        logprobs = _logprobs(raw, chosen, rows)
    return chosen, logprobs


def _logprobs(raw: torch.Tensor, chosen: torch.Tensor, rows: list[SamplingRow]) -> list[TokenLogprob]:
    """Logprobs of the model's own distribution (before sampling transforms), as vLLM reports them."""
    lp = torch.log_softmax(raw.float(), dim=-1)
    k = max(r.params.top_logprobs for r in rows)
    chosen_lp = lp.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()
    top_vals, top_ids = (lp.topk(k, dim=-1) if k > 0 else (None, None))
    out = []
    for i, r in enumerate(rows):
        top = []
        if r.params.top_logprobs > 0:
            n = r.params.top_logprobs
            top = list(zip(top_ids[i, :n].tolist(), top_vals[i, :n].tolist()))
        out.append(TokenLogprob(token_id=int(chosen[i]), logprob=chosen_lp[i], top=top))
    return out
