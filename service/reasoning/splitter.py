"""Splits generated text into reasoning (before the end-of-thinking tag) and answer, incrementally.

Text that could be the start of the tag is held back until it is decided, so streamed deltas
carry the same split as the final message.
"""

from __future__ import annotations


class ThinkSplitter:
    def __init__(self, start: str, end: str, thinking: bool = True):
        self.start, self.end = start, end
        self.thinking = thinking
        self._held = ""
        self._answer_started = False
        # The lead-in (whitespace, and an opening tag a model may write itself; the prompt usually
        # has it) is dropped however it is split across deltas: "pending" -> "after_tag" -> "done".
        self._lead = "pending"
        self.reasoning = ""
        self.content = ""

    def feed(self, text: str) -> tuple[str, str]:
        """-> (reasoning delta, content delta)."""
        reasoning_delta, content_delta = "", ""
        buf = self._held + text
        self._held = ""
        if self.thinking and self._lead != "done":
            buf = self._strip_lead(buf)
            if not buf:
                return "", ""
        if self.thinking:
            idx = buf.find(self.end)
            if idx >= 0:
                reasoning_delta = buf[:idx]
                buf = buf[idx + len(self.end):]
                self.thinking = False
            else:
                keep = self._partial_suffix(buf, self.end)
                reasoning_delta, self._held = buf[: len(buf) - keep], buf[len(buf) - keep:]
                buf = ""
        if not self.thinking and buf:
            if not self._answer_started:
                buf = buf.lstrip()
                self._answer_started = bool(buf)
            content_delta = buf
        self.reasoning += reasoning_delta
        self.content += content_delta
        return reasoning_delta, content_delta

    def _strip_lead(self, buf: str) -> str:
        buf = buf.lstrip()
        if self._lead == "pending":
            if buf.startswith(self.start):
                buf, self._lead = buf[len(self.start):].lstrip(), "after_tag"
            elif self.start.startswith(buf):  # could still become the opening tag: wait for more
                self._held = buf
                return ""
            else:
                self._lead = "done"
        if buf:
            self._lead = "done"
        return buf

    def finish(self) -> tuple[str, str]:
        held, self._held = self._held, ""
        if self.thinking:
            self.reasoning += held
            return held, ""
        self.content += held
        return "", held

    @staticmethod
    def _partial_suffix(text: str, tag: str) -> int:
        for k in range(min(len(tag) - 1, len(text)), 0, -1):
            if tag.startswith(text[-k:]):
                return k
        return 0
