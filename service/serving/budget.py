"""One token budget per request: context = prompt + thinking + answer.

Stages reserve what they need before the prompt exists (reasoning: the thinking budget); what is
left after the conversation, the reservations and the answer is what RAG sources may fill. Once the
prompt is tokenized, `answer_tokens` settles max_tokens: the one the client asked for (a 400 when
it cannot fit, never a silent clamp), else the rest of the context up to the server's default.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.api.errors import APIError

# What an answer without max_tokens keeps free while sources are chosen (the prompt can then grow
# into the rest of the context, and the answer takes what remains up to the server's default).
DEFAULT_ANSWER_RESERVE = 512


@dataclass
class TokenBudget:
    max_model_len: int
    requested_answer: int | None  # max_tokens / max_completion_tokens as asked (None: not given)
    default_answer_cap: int  # settings.max_tokens_default
    thinking: int = 0  # reserved by the reasoning stage
    param: str = "messages"  # what a too-long prompt is called in errors

    def answer_reserve(self) -> int:
        """Answer tokens to keep free while the prompt is being built."""
        if self.requested_answer is not None:
            return self.requested_answer
        return min(self.default_answer_cap, DEFAULT_ANSWER_RESERVE)

    def room_for_prompt(self) -> int:
        """Prompt tokens that fit beside the thinking budget and the answer reserve."""
        return self.max_model_len - self.thinking - self.answer_reserve()

    def answer_tokens(self, prompt_len: int) -> int:
        """max_tokens of the answer for a prompt of this length; 400 when the request cannot fit."""
        self.check_prompt(prompt_len)
        room = self.max_model_len - prompt_len - self.thinking
        if self.requested_answer is None:
            return min(self.default_answer_cap, room)
        if self.requested_answer > room:
            thinking = f", {self.thinking} for thinking" if self.thinking else ""
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                           f"requested {prompt_len + self.thinking + self.requested_answer} tokens ({prompt_len} in "
                           f"the {self.param}{thinking}, {self.requested_answer} in the completion). Reduce the "
                           f"length of the {self.param} or max_tokens.", param="max_tokens",
                           code="context_length_exceeded")
        return self.requested_answer

    def check_prompt(self, prompt_len: int) -> None:
        if prompt_len >= self.max_model_len:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens, but the "
                           f"prompt has {prompt_len} tokens. Shorten the {self.param}.", param=self.param,
                           code="context_length_exceeded")
        if self.thinking and prompt_len + self.thinking >= self.max_model_len:
            raise APIError(400, f"the thinking budget ({self.thinking} tokens) plus the prompt ({prompt_len} tokens) "
                           f"does not fit the model's context of {self.max_model_len} tokens",
                           param="reasoning.max_tokens", code="context_length_exceeded")
