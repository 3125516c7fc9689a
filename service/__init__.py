"""Frontier: an OpenAI-compatible model-serving microservice."""

__version__ = "0.1.0"
