"""Reasoning request parameters: `reasoning_effort`, `reasoning: {...}`, Anthropic-style `thinking`.

All three resolve to one ReasoningParams; invalid combinations are 400s naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.api.errors import APIError

# Thinking budgets of the effort presets (every value the OpenAI SDK sends); a model's manifest may
# override them. A preset never takes more than half the context (ReasoningStage caps it).
DEFAULT_EFFORTS = {"minimal": 64, "low": 256, "medium": 1024, "high": 4096, "xhigh": 8192, "max": 16384}
STRATEGIES = ("single", "self_consistency")


@dataclass(frozen=True)
class ReasoningParams:
    max_tokens: int
    min_tokens: int = 0
    strategy: str = "single"
    samples: int = 1
    preset: bool = False  # the budget came from an effort preset, not a number the request gave


def _int(value, field: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise APIError(400, f"'{field}' must be an integer >= {minimum}", param=field)
    return value


def parse_reasoning(body, efforts: dict[str, int] | None) -> ReasoningParams | None:
    """None when the request asks for no reasoning. Whether the budget fits the context is the
    request's TokenBudget's to say (service/serving/budget.py), once the prompt exists."""
    efforts = {**DEFAULT_EFFORTS, **(efforts or {})}
    params: ReasoningParams | None = None
    if body.reasoning_effort is not None:
        effort = body.reasoning_effort
        if effort == "none":
            params = None
        elif effort in efforts:
            params = ReasoningParams(max_tokens=efforts[effort], preset=True)
        else:
            raise APIError(400, f"'reasoning_effort' must be one of none, {', '.join(efforts)}",
                           param="reasoning_effort")
    if body.thinking is not None:
        kind = body.thinking.get("type")
        if kind == "disabled":
            params = None
        elif kind == "enabled":
            params = ReasoningParams(max_tokens=_int(body.thinking.get("budget_tokens"), "thinking.budget_tokens", 1))
        else:
            raise APIError(400, "'thinking.type' must be 'enabled' or 'disabled'", param="thinking.type")
    if body.reasoning is not None:
        r = body.reasoning
        unknown = set(r) - {"max_tokens", "min_tokens", "strategy", "samples", "effort"}
        if unknown:
            raise APIError(400, f"unknown field(s) in 'reasoning': {', '.join(sorted(unknown))}", param="reasoning")
        base = params.max_tokens if params else efforts["medium"]
        if "effort" in r:
            if r["effort"] not in efforts:
                raise APIError(400, f"'reasoning.effort' must be one of {', '.join(efforts)}", param="reasoning.effort")
            base = efforts[r["effort"]]
        max_tokens = _int(r.get("max_tokens", base), "reasoning.max_tokens", 1)
        min_tokens = _int(r.get("min_tokens", 0), "reasoning.min_tokens", 0)
        strategy = r.get("strategy", "single")
        if strategy not in STRATEGIES:
            raise APIError(400, f"'reasoning.strategy' must be one of {', '.join(STRATEGIES)}",
                           param="reasoning.strategy")
        samples = _int(r.get("samples", 5 if strategy == "self_consistency" else 1), "reasoning.samples", 1)
        if strategy == "single" and samples != 1:
            raise APIError(400, "'reasoning.samples' needs strategy 'self_consistency'", param="reasoning.samples")
        if samples > 16:
            raise APIError(400, "'reasoning.samples' must be at most 16", param="reasoning.samples")
        if min_tokens > max_tokens:
            raise APIError(400, f"'reasoning.min_tokens' ({min_tokens}) is larger than 'reasoning.max_tokens' "
                           f"({max_tokens})", param="reasoning.min_tokens")
        params = ReasoningParams(max_tokens, min_tokens, strategy, samples, preset="max_tokens" not in r)
    return params
