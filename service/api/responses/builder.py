"""A Response object and its stream events, built from the engine's deltas.

One builder serves both forms: a streamed response sends its events; a non-streamed one feeds the
same deltas and discards them, so both end with the same output items in the same order. Per delta
the text is split the way chat splits it (service/api/shapes/chat.py): the reasoning splitter takes
the thought, the tool call parser takes calls out of the answer. Items open when their first text
arrives: a `reasoning` item (the thought; it is not summarized, so its summary is the thought too),
the assistant `message`, a `function_call` per call as its block closes; a `file_search_call`
item (the sources the grounding stage found) comes first.
"""

from __future__ import annotations

import copy
import re
import time
import uuid

from service.serving.chat import PreparedChat

CITATION = re.compile(r"\[(\d{1,2})\]")  # the grounding prompt asks for [1], [2][3]


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def response_head(body, model_id: str, response_id: str, created_at: int, sampling) -> dict:
    """The Response's fields that echo the request, as they are in every state of it."""
    reasoning, text = body.reasoning or {}, body.text or {}
    return {"id": response_id, "object": "response", "created_at": created_at, "status": "in_progress",
            "error": None, "incomplete_details": None, "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens, "model": model_id, "output": [],
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id,
            "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
            "store": body.store, "temperature": sampling.temperature, "top_p": sampling.top_p,
            "text": {"format": text.get("format") or {"type": "text"}}, "tool_choice": body.tool_choice or "auto",
            "tools": body.tools or [], "truncation": "disabled", "usage": None, "user": body.user,
            "metadata": body.metadata or {}}


class ResponseBuilder:
    def __init__(self, head: dict, prep: PreparedChat, metrics, search_query: str | None = None):
        job = prep.job
        self.head, self.metrics, self.num_prompt_tokens = head, metrics, prep.num_prompt_tokens
        self.plan = job.reasoning
        self.splitter = self.plan.splitter() if self.plan else None
        self.parser = job.tools.parser() if job.tools else None
        self.search_query = search_query
        self.citations = job.response_fields.get("citations") or []
        self.output: list[dict] = []  # items in output_index order
        self.sequence_number = 0
        self.thought = ""
        self.reasoning_at: int | None = None  # output index of the open reasoning item
        self.message_at: int | None = None  # output index of the assistant message
        self.finish_reason: str | None = None
        self.num_generated = self.num_cached = 0
        self.report: dict | None = None
        self.response: dict | None = None  # the final Response, once finished

    # ---- the lifecycle: start, one feed per engine delta, finish (or failed) ----
    def start(self) -> list[dict]:
        events = [self._event("response.created", response=self._snapshot()),
                  self._event("response.in_progress", response=self._snapshot())]
        if self.search_query is not None:
            events += self._file_search()
        return events

    def feed(self, out) -> list[dict]:
        self.num_generated = out.num_generated_tokens
        self.num_cached = max(self.num_cached, out.num_cached_tokens)
        reasoning, content = self.splitter.feed(out.text) if self.splitter else ("", out.text)
        if out.finished and self.splitter:
            r2, c2 = self.splitter.finish()
            reasoning, content = reasoning + r2, content + c2
        calls = []
        if self.parser:
            content, calls = self.parser.feed(content)
            if out.finished:
                content += self.parser.finish()
        events = self._reasoning_delta(reasoning) if reasoning else []
        if content or calls:  # the thought is over
            events += self._close_reasoning()
        if content:
            events += self._text_delta(content)
        for call in calls:
            events += self._function_call(call)
        if out.finished:
            self.finish_reason = out.finish_reason.value if out.finish_reason else "stop"
            self.report = out.report
        return events

    def finish(self) -> list[dict]:
        incomplete = self.finish_reason == "length"
        events = self._close_reasoning()
        if self.message_at is None and not any(item["type"] == "function_call" for item in self.output):
            events += self._open_message()  # nothing was said: an empty message, as OpenAI answers
        if self.message_at is not None:
            events += self._close_message(incomplete)
        self.response = {**self.head, "status": "incomplete" if incomplete else "completed",
                         "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
                         "completed_at": None if incomplete else int(time.time()),
                         "output": copy.deepcopy(self.output), "output_text": self._output_text(),
                         "usage": self._usage()}
        kind = "response.incomplete" if incomplete else "response.completed"
        return [*events, self._event(kind, response=self.response)]

    def failed(self, err) -> list[dict]:
        """A mid-stream failure: an `error` event, then `response.failed`."""
        code = "rate_limit_exceeded" if err.status == 429 else "server_error"
        return [self._event("error", code=err.code or err.type, message=err.message, param=err.param),
                self._event("response.failed", response=self._snapshot(
                    status="failed", error={"code": code, "message": err.message},
                    output=copy.deepcopy(self.output)))]

    # ---- items ----
    def _event(self, kind: str, **fields) -> dict:
        event = {"type": kind, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return event

    def _snapshot(self, **changes) -> dict:
        return {**self.head, **changes}

    def _add(self, item: dict) -> tuple[int, dict]:
        self.output.append(item)
        index = len(self.output) - 1
        return index, self._event("response.output_item.added", output_index=index, item=copy.deepcopy(item))

    def _done(self, index: int) -> dict:
        return self._event("response.output_item.done", output_index=index, item=copy.deepcopy(self.output[index]))

    def _file_search(self) -> list[dict]:
        item = {"type": "file_search_call", "id": new_id("fs"), "status": "in_progress", "queries": [],
                "results": None}
        index, added = self._add(item)
        ref = {"item_id": item["id"], "output_index": index}
        events = [added, *(self._event(f"response.file_search_call.{phase}", **ref)
                           for phase in ("in_progress", "searching", "completed"))]
        item.update(status="completed", queries=[self.search_query], results=[
            {"file_id": c["document_id"], "filename": c["document_id"], "score": c["score"], "text": c["text"],
             "attributes": {"chunk_id": c["chunk_id"], "source_number": c["index"]}} for c in self.citations])
        return [*events, self._done(index)]

    def _reasoning_delta(self, text: str) -> list[dict]:
        events = []
        if self.reasoning_at is None:
            self.reasoning_at, added = self._add({"type": "reasoning", "id": new_id("rs"), "summary": []})
            events += [added, self._event("response.reasoning_summary_part.added", **self._ref(self.reasoning_at),
                                          summary_index=0, part={"type": "summary_text", "text": ""})]
        self.thought += text
        return [*events, self._event("response.reasoning_summary_text.delta", **self._ref(self.reasoning_at),
                                     summary_index=0, delta=text)]

    def _close_reasoning(self) -> list[dict]:
        if self.reasoning_at is None:
            return []
        index, text = self.reasoning_at, self.thought
        self.reasoning_at, self.thought = None, ""
        self.output[index].update(summary=[{"type": "summary_text", "text": text}],
                                  content=[{"type": "reasoning_text", "text": text}])
        ref = self._ref(index)
        return [self._event("response.reasoning_summary_text.done", **ref, summary_index=0, text=text),
                self._event("response.reasoning_summary_part.done", **ref, summary_index=0,
                            part={"type": "summary_text", "text": text}),
                self._done(index)]

    def _open_message(self) -> list[dict]:
        self.message_at, added = self._add({"type": "message", "id": new_id("msg"), "role": "assistant",
                                            "status": "in_progress", "content": []})
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        self.output[self.message_at]["content"].append(part)
        return [added, self._event("response.content_part.added", **self._ref(self.message_at), content_index=0,
                                   part=copy.deepcopy(part))]

    def _text_delta(self, text: str) -> list[dict]:
        events = self._open_message() if self.message_at is None else []
        self.output[self.message_at]["content"][0]["text"] += text
        return [*events, self._event("response.output_text.delta", **self._ref(self.message_at), content_index=0,
                                     delta=text, logprobs=[])]

    def _close_message(self, incomplete: bool) -> list[dict]:
        index = self.message_at
        item = self.output[index]
        part, ref = item["content"][0], self._ref(index)
        part["annotations"] = self._annotations(part["text"])
        events = [self._event("response.output_text.annotation.added", **ref, content_index=0, annotation_index=k,
                              annotation=a) for k, a in enumerate(part["annotations"])]
        events += [self._event("response.output_text.done", **ref, content_index=0, text=part["text"], logprobs=[]),
                   self._event("response.content_part.done", **ref, content_index=0, part=copy.deepcopy(part))]
        item["status"] = "incomplete" if incomplete else "completed"
        return [*events, self._done(index)]

    def _function_call(self, call: dict) -> list[dict]:
        arguments = call["function"]["arguments"]
        index, added = self._add({"type": "function_call", "id": new_id("fc"), "call_id": call["id"],
                                  "name": call["function"]["name"], "arguments": "", "status": "in_progress"})
        ref = self._ref(index)
        events = [added, self._event("response.function_call_arguments.delta", **ref, delta=arguments),
                  self._event("response.function_call_arguments.done", **ref, arguments=arguments)]
        self.output[index].update(arguments=arguments, status="completed")
        return [*events, self._done(index)]

    def _ref(self, index: int) -> dict:
        return {"item_id": self.output[index]["id"], "output_index": index}

    # ---- the finished response ----
    def _annotations(self, text: str) -> list[dict]:
        """A file_citation for every [n] in the answer that names one of the sources."""
        sources = {c["index"]: c for c in self.citations}
        return [{"type": "file_citation", "file_id": c["document_id"], "filename": c["document_id"],
                 "index": m.start()}
                for m in CITATION.finditer(text) if (c := sources.get(int(m.group(1)))) is not None]

    def _output_text(self) -> str:
        return "".join(part["text"] for item in self.output if item["type"] == "message"
                       for part in item["content"] if part["type"] == "output_text")

    def _usage(self) -> dict:
        reports, reasoning_tokens = [self.report], 0
        if self.plan is not None:
            self.plan.record(self.metrics, self.head["model"], reports)
            reasoning_tokens = self.plan.reasoning_tokens(reports)
        return {"input_tokens": self.num_prompt_tokens,
                "input_tokens_details": {"cached_tokens": self.num_cached},
                "output_tokens": self.num_generated,
                "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
                "total_tokens": self.num_prompt_tokens + self.num_generated}
