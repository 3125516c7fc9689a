"""Budget forcing through the engine's token-controller hook (the s1 recipe, both directions).

- At the maximum: force the end-of-thinking tag (timed so the tag itself fits in the budget) and
  a short answer transition, so the model must answer.
- Below the minimum: when the model tries to end thinking (the tag's first token) or the sequence
  (EOS), that token is replaced by a continuation cue ("Wait,"), so it keeps thinking.
- EOS while thinking past the minimum closes the thought instead, so an answer still follows.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.reasoning.params import ReasoningParams


@dataclass(frozen=True)
class ThinkingFormat:
    kind: str = "scaffold"  # native: the model emits the tags | scaffold: instructed to | template
    start: str = "<think>"
    end: str = "</think>"
    template_kwarg: str | None = None  # e.g. "enable_thinking" for a chat-template switch
    wait_cue: str = " Wait,"
    answer_transition: str = "\n"
    instruction: str = (
        "Before answering, think step by step inside {start} and {end}. "
        "After {end}, write only the final answer."
    )

    @classmethod
    def from_manifest(cls, cfg) -> "ThinkingFormat":
        """cfg: the manifest's ReasoningConfig (validated there; unset fields keep these defaults)."""
        fields = {k: v for k, v in cfg.model_dump(exclude={"format", "efforts"}).items() if v is not None}
        return cls(kind=cfg.format, **fields)

    def system_instruction(self) -> str:
        return self.instruction.format(start=self.start, end=self.end)


class BudgetController:
    """One per output sequence; lives on the engine thread while the sequence runs."""

    def __init__(self, tokenizer, fmt: ThinkingFormat, params: ReasoningParams, eos_token_ids: set[int]):
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.params = params
        self.eos_token_ids = eos_token_ids
        self.end_ids = tokenizer.encode(fmt.end, add_special_tokens=False)
        self.wait_ids = tokenizer.encode(fmt.wait_cue, add_special_tokens=False)
        self.transition_ids = tokenizer.encode(fmt.answer_transition, add_special_tokens=False)
        self.thinking = True
        self.num_reasoning_tokens = 0
        self.budget_forced = False
        self.num_extensions = 0
        self._ids: list[int] = []
        self._closing = False  # forced end tag queued
        self.answer_start: int | None = None  # tokens generated when the thought closed

    def banned_tokens(self, num_generated: int) -> list[int]:
        return []

    def report(self) -> dict[str, float]:
        """What the final output carries back to the API (service/engine/sequence.py)."""
        return {"reasoning_tokens": self.num_reasoning_tokens, "reasoning_extensions": self.num_extensions,
                "budget_forced": int(self.budget_forced)}

    def rewrite(self, token_id: int, num_generated: int) -> list[int]:
        """Called before a sampled token is accepted: the tokens to accept instead (first now, rest forced)."""
        if not self.thinking or self._closing:
            return [token_id]
        below_min = self.num_reasoning_tokens < self.params.min_tokens
        tries_to_end = token_id in self.eos_token_ids or (token_id == self.end_ids[0] and not self._in_tag())
        if below_min and tries_to_end:
            self.num_extensions += 1
            return list(self.wait_ids)
        if token_id in self.eos_token_ids:
            self._closing = True
            return list(self.end_ids) + list(self.transition_ids)
        return [token_id]

    def on_token(self, token_id: int, num_generated: int) -> list[int]:
        """Called after every accepted token (sampled or forced): forced next tokens, if any."""
        if not self.thinking:
            return []
        self.num_reasoning_tokens += 1
        self._ids.append(token_id)
        if self._ended():
            self.thinking = False
            self.answer_start = num_generated + (len(self.transition_ids) if self._closing else 0)
            return []
        if self._closing:
            return []
        if self.num_reasoning_tokens + len(self.end_ids) >= self.params.max_tokens:
            self._closing = True
            self.budget_forced = True
            return list(self.end_ids) + list(self.transition_ids)
        return []

    def generation_limit(self, max_tokens: int) -> int | None:
        """The engine's max_tokens covers the thinking budget plus the answer (service/serving/chat.py);
        once the thought has closed, the answer alone gets its own share, however early that was.
        None while thinking."""
        if self.answer_start is None:
            return None
        return self.answer_start + max(1, max_tokens - self.params.max_tokens)

    def _in_tag(self) -> bool:
        return bool(self._ids) and self._ids[-1] in self.end_ids[:-1]

    def _ended(self) -> bool:
        tail = self.tokenizer.decode(self._ids[-(len(self.end_ids) + 2):], skip_special_tokens=False)
        return self.fmt.end in tail
