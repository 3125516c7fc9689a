"""Structured output stage: response_format and tools. It describes the tools to the model (the
chat template's own way, or the manifest's fallback instruction), and wraps the sequence's token
controller (the reasoning controller, if any) in a grammar controller, so that the answer, never
the thought, follows the schema or is a valid tool call."""

from __future__ import annotations

from service.serving.grammar import as_api_error, grammar_factory
from service.serving.job import ChatJob
from service.structured.grammar import GrammarError, answer_grammar, response_format_schema
from service.structured.tools import ToolPlan, template_renders_tools


class StructuredStage:
    def __init__(self, max_string: int):
        self.max_string = max_string  # settings.structured_max_string

    def applies(self, job: ChatJob) -> bool:
        b = job.body
        return bool(b.tools) or b.tool_choice is not None or (b.response_format or {}).get("type", "text") != "text"

    async def apply(self, job: ChatJob) -> None:
        b, lm = job.body, job.model
        try:
            schema = response_format_schema(b.response_format)
            plan = ToolPlan.from_request(b.tools, b.tool_choice, b.parallel_tool_calls, lm.manifest.tools)
            cap = self.max_string
            grammar = plan.grammar(schema, cap) if plan is not None else None
            if grammar is None and schema is not None:
                grammar = answer_grammar(schema, cap)
        except GrammarError as exc:
            raise as_api_error(exc) from None
        if plan is not None:
            job.tools = plan
            if template_renders_tools(job.tokenizer):
                job.template_kwargs["tools"] = [t.openai() for t in plan.tools]
            else:
                job.messages = _with_system(job.messages, plan.instruction())
        job.controller_factory = await grammar_factory(lm, grammar, job.controller_factory)


def _with_system(messages: list[dict], text: str) -> list[dict]:
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": messages[0]["content"] + "\n\n" + text}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]
