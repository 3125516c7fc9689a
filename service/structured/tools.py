"""Tool calling: the request's tools and tool_choice, the prompt that describes them, the grammar
that forces a valid call, and the parser that turns the model's text back into OpenAI tool_calls.

A call is written as the manifest's format (service/pool/manifest.py ToolsConfig), by default
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Hermes / Qwen). With tool_choice
`required` or a named function the grammar allows only such calls (each name one of the tools,
arguments valid under its schema); with `auto` the model writes what it wants and calls are parsed
out of the text. The same parser serves streamed and whole responses, so they agree.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from service.structured.grammar import DEFAULT_MAX_STRING, GrammarError, closed, lark_grammar

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
EMPTY_PARAMETERS = {"type": "object", "properties": {}}
DEFAULT_INSTRUCTION = (
    "You can call functions. Their names, descriptions and parameters (JSON Schema):\n{tools}\n"
    'To call a function, write {start}{{"name": <function name>, "arguments": <arguments as a JSON '
    "object>}}{end}, one block per call. Otherwise answer normally.")


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]

    def openai(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}

    def call_schema(self, max_string: int = DEFAULT_MAX_STRING) -> dict:
        """The JSON of one call of this tool; the parameters' $defs move to the root so refs resolve."""
        params = closed(self.parameters, max_string)
        defs = {k: params.pop(k) for k in ("$defs", "definitions") if k in params}
        return {**defs, "x-guidance": {"whitespace_flexible": False}, "type": "object",
                "properties": {"name": {"const": self.name}, "arguments": params},
                "required": ["name", "arguments"], "additionalProperties": False}


def parse_tools(tools: list[dict], param: str = "tools") -> list[Tool]:
    out, seen = [], set()
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise GrammarError('each tool must be {"type": "function", "function": {...}}', f"{param}.{i}")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise GrammarError("a function name is 1-64 letters, digits, _ or -", f"{param}.{i}.function.name")
        if name in seen:
            raise GrammarError(f"function {name!r} is defined twice", f"{param}.{i}.function.name")
        seen.add(name)
        params = fn.get("parameters", EMPTY_PARAMETERS)
        if not isinstance(params, dict):
            raise GrammarError("parameters must be a JSON Schema object", f"{param}.{i}.function.parameters")
        out.append(Tool(name, str(fn.get("description") or ""), params))
    return out


def _choice(tool_choice, tools: list[Tool]) -> str:
    """"auto" | "required" | a tool's name."""
    if tool_choice in (None, "auto", "required"):
        return tool_choice or "auto"
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        name = (tool_choice.get("function") or {}).get("name")
        if name in {t.name for t in tools}:
            return name
        raise GrammarError(f"tool_choice names function {name!r}, which is not in tools", "tool_choice")
    raise GrammarError('tool_choice must be "none", "auto", "required" or {"type": "function", '
                       '"function": {"name": ...}}', "tool_choice")


@dataclass
class ToolPlan:
    tools: list[Tool]
    choice: str  # "auto" | "required" | a function name
    parallel: bool
    fmt: Any  # the manifest's ToolsConfig

    @classmethod
    def from_request(cls, tools, tool_choice, parallel_tool_calls, fmt) -> "ToolPlan | None":
        """None when the request has no tools or tool_choice is "none"."""
        if not tools:
            if tool_choice not in (None, "none"):
                raise GrammarError("tool_choice needs tools", "tool_choice")
            return None
        if tool_choice == "none":
            return None
        parsed = parse_tools(tools)
        return cls(parsed, _choice(tool_choice, parsed), parallel_tool_calls is not False, fmt)

    @property
    def forced(self) -> bool:
        return self.choice != "auto"

    def grammar(self, answer_schema: dict | None = None, max_string: int = DEFAULT_MAX_STRING) -> str | None:
        """Forced: only calls (one, or several if parallel). Auto with a response_format: a call or
        the formatted answer. Auto alone: None (free text, calls parsed afterwards)."""
        if not self.forced and answer_schema is None:
            return None
        tools = [t for t in self.tools if self.choice in ("auto", "required", t.name)]
        several = self.parallel and self.choice in ("auto", "required")  # a named function: one call
        more = self.fmt.max_calls - 1 if several else 0  # call ("\n" call ("\n" call)?)? ...
        lines = ["calls: call" + ' ("\\n" call' * more + ")?" * more,
                 f"call: {json.dumps(self.fmt.start)} (" + " | ".join(f"fn{i}" for i in range(len(tools)))
                 + f") {json.dumps(self.fmt.end)}"]
        lines += [f"fn{i}: %json {json.dumps(t.call_schema(max_string))}" for i, t in enumerate(tools)]
        if self.forced:
            lines.insert(0, "start: calls")
        else:
            answer = {**closed(answer_schema, max_string), "x-guidance": {"whitespace_flexible": False}}
            lines[:0] = ["start: calls | answer", f"answer: %json {json.dumps(answer)}"]
        return lark_grammar("\n".join(lines), "tools")

    def instruction(self) -> str:
        """The system-message text for templates that do not render tools themselves."""
        listing = "\n".join(json.dumps(t.openai()["function"]) for t in self.tools)
        text = (self.fmt.instruction or DEFAULT_INSTRUCTION).format(tools=listing, start=self.fmt.start,
                                                                    end=self.fmt.end)
        if self.choice == "required":
            text += "\nCall at least one function."
        elif self.forced:
            text += f"\nCall the function {self.choice}."
        return text

    def parser(self) -> "ToolCallParser":
        return ToolCallParser(self.fmt.start, self.fmt.end, {t.name for t in self.tools})


def _call(raw: str, names: set[str]) -> dict | None:
    """One OpenAI tool call from a block's text, or None if it is not a call of a known tool."""
    try:
        obj = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", {})
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


class ToolCallParser:
    """Splits generated text into content and tool calls as it arrives. Text that may be the start
    of a call tag is held back until it is known not to be; a block that is not a valid call of a
    known tool stays in the content as written. Trailing whitespace is held too, and dropped at the
    end if there were calls, so a streamed response carries the same content as a whole one."""

    def __init__(self, start: str, end: str, names: set[str]):
        self.start, self.end, self.names = start, end, names
        self.buf, self.in_call, self.num_calls = "", False, 0
        self.blank = ""  # whitespace-only content not yet emitted

    def feed(self, text: str) -> tuple[str, list[dict]]:
        """(content to emit now, calls completed now, each with its `index`)."""
        content, calls = self._scan(text)
        if content:  # trailing whitespace waits: it is dropped if only calls follow
            body = content.rstrip()
            content, self.blank = (self.blank + body if body else ""), (self.blank if not body else "") + content[len(body):]
        return content, calls

    def finish(self) -> str:
        """What is left (an unclosed block stays text; held whitespace only if there were no calls)."""
        rest = (self.start if self.in_call else "") + self.buf
        if rest.strip() or not self.num_calls:
            rest = self.blank + rest
        else:
            rest = ""
        self.buf, self.in_call, self.blank = "", False, ""
        return rest

    def _scan(self, text: str) -> tuple[str, list[dict]]:
        self.buf += text
        content, calls = "", []
        while True:
            if not self.in_call:
                i = self.buf.find(self.start)
                if i < 0:
                    keep = next((k for k in range(min(len(self.start) - 1, len(self.buf)), 0, -1)
                                 if self.start.startswith(self.buf[-k:])), 0)
                    content += self.buf[: len(self.buf) - keep]
                    self.buf = self.buf[len(self.buf) - keep:]
                    return content, calls
                content += self.buf[:i]
                self.buf, self.in_call = self.buf[i + len(self.start):], True
            else:
                j = self.buf.find(self.end)
                if j < 0:
                    return content, calls
                raw, self.buf, self.in_call = self.buf[:j], self.buf[j + len(self.end):], False
                call = _call(raw, self.names)
                if call is None:
                    content += self.start + raw + self.end
                else:
                    calls.append({"index": self.num_calls, **call})
                    self.num_calls += 1


def split_calls(text: str, plan: ToolPlan) -> tuple[str | None, list[dict]]:
    """A whole response: (content or None when only calls were written, calls)."""
    parser = plan.parser()
    content, calls = parser.feed(text)
    content += parser.finish()
    return ((content or None) if calls else content), [{k: v for k, v in c.items() if k != "index"} for c in calls]


def history_messages(messages, fmt, native: bool) -> list[dict]:
    """Request messages as the chat template takes them. native: the template renders tool calls
    and results itself (HF convention: arguments as objects); otherwise calls become text in the
    model's format and results a user turn between the result tags."""
    out = []
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        text = m.text()
        if role == "assistant" and m.tool_calls:
            calls = [_history_call(c) for c in m.tool_calls]
            if native:
                out.append({"role": role, "content": text, "tool_calls": [
                    {"id": c.get("id"), "type": "function", "function": f} for c, f in zip(m.tool_calls, calls)]})
            else:
                blocks = "".join(f"{fmt.start}{json.dumps(f, ensure_ascii=False)}{fmt.end}" for f in calls)
                out.append({"role": role, "content": (text + "\n" if text else "") + blocks})
        elif role == "tool":
            if native:
                out.append({"role": "tool", "content": text, "tool_call_id": m.tool_call_id})
            else:
                out.append({"role": "user", "content": f"{fmt.result_start}\n{text}\n{fmt.result_end}"})
        else:
            out.append({"role": role, "content": text})
    return out


def _history_call(call: dict) -> dict:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise GrammarError('an assistant tool call is {"id", "type": "function", "function": {"name", '
                           '"arguments"}}', "messages")
    args = fn.get("arguments", "{}")
    try:
        args = json.loads(args) if isinstance(args, str) else args
    except ValueError:
        raise GrammarError(f"the arguments of the earlier call to {fn['name']!r} are not JSON", "messages") from None
    return {"name": fn["name"], "arguments": args}


def template_renders_tools(tokenizer) -> bool:
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and "tools" in template
