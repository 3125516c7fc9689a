"""Everything a chat request in reasoning mode needs: prompt changes, controllers, output split.

Counts come back on the engine's outputs (each sequence's final `report`), never from the
controller objects, which live on the engine thread.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.reasoning.controller import BudgetController, ThinkingFormat
from service.reasoning.params import ReasoningParams
from service.reasoning.splitter import ThinkSplitter
from service.reasoning.voting import majority_vote


@dataclass
class ReasoningPlan:
    params: ReasoningParams
    fmt: ThinkingFormat
    tokenizer: object
    eos_token_ids: frozenset[int] | set[int]

    @property
    def self_consistency(self) -> bool:
        return self.params.strategy == "self_consistency"

    def messages(self, messages: list[dict]) -> list[dict]:
        """Scaffold models get the think-step-by-step instruction in the system message."""
        if self.fmt.kind != "scaffold":
            return messages
        instruction = self.fmt.system_instruction()
        if messages and messages[0]["role"] == "system":
            return [{"role": "system", "content": messages[0]["content"] + "\n\n" + instruction}, *messages[1:]]
        return [{"role": "system", "content": instruction}, *messages]

    def template_kwargs(self) -> dict:
        return {self.fmt.template_kwarg: True} if self.fmt.template_kwarg else {}

    def prompt_suffix(self, prompt: str) -> str:
        """Open the thought in the prompt, so thinking starts at the first generated token. A budget
        too small for even the closing tag gets an empty, already closed thought."""
        if prompt.rstrip().endswith(self.fmt.start):
            opened = ""
        else:
            opened = self.fmt.start + "\n"
        if self.params.max_tokens <= len(self.tokenizer.encode(self.fmt.end, add_special_tokens=False)):
            return opened + self.fmt.end + self.fmt.answer_transition
        return opened

    def thinks(self) -> bool:
        return self.params.max_tokens > len(self.tokenizer.encode(self.fmt.end, add_special_tokens=False))

    def controller_factory(self):
        def make() -> BudgetController:
            return BudgetController(self.tokenizer, self.fmt, self.params, self.eos_token_ids)

        return make if self.thinks() else None

    def splitter(self) -> ThinkSplitter:
        return ThinkSplitter(self.fmt.start, self.fmt.end, thinking=self.thinks())

    @staticmethod
    def reasoning_tokens(reports: list[dict | None]) -> int:
        """Thinking tokens of all sequences, from their final outputs' reports."""
        return sum(int(r.get("reasoning_tokens", 0)) for r in reports if r)

    @staticmethod
    def record(metrics, model_id: str, reports: list[dict | None]) -> None:
        for r in filter(None, reports):
            metrics.reasoning_tokens.labels(model_id).inc(r.get("reasoning_tokens", 0))
            metrics.reasoning_extensions.labels(model_id).inc(r.get("reasoning_extensions", 0))
            if r.get("budget_forced"):
                metrics.reasoning_budget_forced.labels(model_id).inc()

    @staticmethod
    def vote(contents: list[str]) -> tuple[int, list[dict]]:
        return majority_vote(contents)
