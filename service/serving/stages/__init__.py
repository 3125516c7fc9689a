"""Chat request stages, in the order they run (serving/chat.py): reasoning reserves its thinking
budget first, so that grounding fills only what is left after thinking and the answer; structured
output wraps the reasoning controller, so it runs after reasoning."""

from service.serving.stages.grounding import GroundingStage
from service.serving.stages.reasoning import ReasoningStage
from service.serving.stages.structured import StructuredStage
from service.serving.stages.vision import VisionStage

__all__ = ["GroundingStage", "ReasoningStage", "StructuredStage", "VisionStage"]
