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
        self.reasoning = ""
        self.content = ""

    def feed(self, text: str) -> tuple[str, str]:
        """-> (reasoning delta, content delta)."""
        reasoning_delta, content_delta = "", ""
        buf = self._held + text
        self._held = ""
        if self.thinking:
            if not self.reasoning:
                buf = buf.lstrip()  # the opening tag and its newline are in the prompt
                if buf.startswith(self.start):
                    buf = buf[len(self.start):].lstrip()  # a model that writes the opening tag itself
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
