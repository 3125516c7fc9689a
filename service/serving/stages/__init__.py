"""Chat request stages, in the order they run (serving/chat.py): reasoning reserves its thinking
budget first, so that grounding fills only what is left after thinking and the answer."""

from service.serving.stages.grounding import GroundingStage
from service.serving.stages.reasoning import ReasoningStage

__all__ = ["GroundingStage", "ReasoningStage"]
