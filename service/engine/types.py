"""Request/response types shared by every engine, and the Engine protocol the API talks to.

The API layer builds a `GenerationRequest` and consumes `RequestOutput` deltas; it never knows
which engine implementation serves it. Engine options: service/engine/config.py (EngineConfig);
the Tokenizer and Embedder protocols: service/engine/protocols.py.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Protocol, runtime_checkable

from service.engine.protocols import Tokenizer


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"  # client went away or the server shut down
    ERROR = "error"


@dataclass(frozen=True)
class SpeculativeParams:
    """Speculative decoding for one request (native engine; others ignore it). The output is the
    same as without it: greedy token for token, sampled with the same distribution (and, for a
    point-mass proposer such as n-gram lookup, the same tokens for the same seed)."""

    method: str = "off"  # "off" | "ngram" (prompt lookup) | "draft" (a draft model: not yet)
    num_tokens: int = 4  # most tokens proposed per step (adaptive below it)
    model: str | None = None  # draft model id (method "draft")

    @property
    def enabled(self) -> bool:
        return self.method != "off" and self.num_tokens > 0


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    # Logprobs of the prompt's own tokens (echo + logprobs, perplexity, lm-eval loglikelihood):
    # None = off; k >= 0 = each prompt token's logprob plus the top-k alternatives. The engine
    # computes logits at every prompt position and reads nothing from the prefix cache for it.
    prompt_logprobs: int | None = None
    n: int = 1
    speculative: SpeculativeParams | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 1e-5 or self.top_k == 1


class TokenController(Protocol):
    """Per-sequence hook the engine calls around every token (reasoning budgets, structured output).

    `banned_tokens` returns ids whose logits are set to -inf for the next sampling step; an optional
    `allowed_mask(num_generated)` returns a packed bitmask of the only tokens allowed (a grammar;
    service/engine/sampler.py SamplingRow.allowed_mask) or None.
    `rewrite` sees each *sampled* token before it is accepted and returns the tokens to accept
    instead (usually `[token_id]`; the first is accepted now, the rest are forced next).
    `on_token` is called after every accepted token, sampled or forced, and returns token ids the
    engine must emit next (forced, no sampling), or an empty list.
    """

    def rewrite(self, token_id: int, num_generated: int) -> list[int]: ...

    def on_token(self, token_id: int, num_generated: int) -> list[int]: ...

    def banned_tokens(self, num_generated: int) -> list[int]: ...

    def report(self) -> dict[str, float]:
        """Optional: counts for the final output (engine thread, once the sequence has ended)."""


@dataclass
class MultimodalInput:
    """The images of one request, prepared for its engine by the model's vision front end
    (service/multimodal/: `VisionPrep.prepare`), in prompt order.

    Native engine (early fusion): image i fills the prompt positions spans[i] = (start, length), all
    holding the model's placeholder id, with the rows embeds[i] [length, hidden] instead of token
    embeddings; digests[i] keys those positions in the prefix cache (same image, same blocks).
    Transformers backend: processor_inputs are the processor's outputs besides input_ids
    (pixel_values, image_grid_thw, aspect_ratio_ids, cross_attention_mask...), given to the prefill
    forward as keyword arguments."""

    digests: list[str]
    spans: list[tuple[int, int]] = field(default_factory=list)
    embeds: list[Any] = field(default_factory=list)  # torch.Tensor [length, hidden] per image (native)
    processor_inputs: dict[str, Any] | None = None  # transformers backend
    # What preparing them cost, for metrics (images, encoded, cache_hits, encode_seconds).
    report: dict[str, float] = field(default_factory=dict)


@dataclass
class GenerationRequest:
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # One controller per output sequence (index = sequence index), built by a factory so that
    # n > 1 sequences never share mutable state.
    controller_factory: object | None = None  # Callable[[], TokenController]
    arrival_time: float = 0.0
    multimodal: MultimodalInput | None = None  # images (vision-chat models)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token_id, logprob), best first


@dataclass
class RequestOutput:
    """One delta for one output sequence (`index` in 0..n-1) of a request."""

    request_id: str
    index: int
    text: str  # new text since the last delta (never a broken UTF-8 sequence)
    token_ids: list[int]  # new token ids since the last delta
    logprobs: list[TokenLogprob] | None = None
    # Once per sequence, on its first delta, when SamplingParams.prompt_logprobs is set: one entry
    # per prompt token, the first None (nothing precedes it).
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finished: bool = False
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0  # cumulative for this sequence
    num_cached_tokens: int = 0
    error: str | None = None
    # On a sequence's final delta: what its token controller reports (TokenController.report), e.g.
    # {"reasoning_tokens": 212, "budget_forced": 1}, plus speculative decoding's counts when it ran
    # ({"spec_draft_tokens": 40, "spec_accepted_tokens": 31}). The API reads per-sequence results only here.
    report: dict[str, float] | None = None


@runtime_checkable
class Engine(Protocol):
    """Everything the API reads from an engine. Implementations: native (paged KV, continuous
    batching; service/engine/native.py) and transformers (service/engine/hf_backend.py)."""

    name: str  # "native" | "hf"
    max_model_len: int  # prompt + generated tokens of one sequence
    tokenizer: Tokenizer
    eos_token_ids: frozenset[int]  # fixed at construction (the loader adds the manifest's extra tokens)
    kernels: dict[str, Any]  # what the loader chose (quantization, dtype, CPU kernels...), for the model card

    def generate(self, req: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """One request's deltas; the last output of each of its n sequences has finished=True
        (and error set if the engine failed it). Raises as check_admission does."""

    def abort(self, request_id: str) -> None: ...

    def check_admission(self, reqs: list[GenerationRequest]) -> None:
        """Raise RequestTooLarge / EngineOverloaded if these requests could not all be queued now."""

    def stats(self) -> dict[str, float]:
        """Numbers for /metrics: keys ending in _total are monotonic counters, the rest gauges."""

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...


class EngineOverloaded(Exception):
    """The waiting queue is full: the API answers 429 with Retry-After."""

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTooLarge(Exception):
    """The request can never fit (context or KV pool): the API answers 400."""
