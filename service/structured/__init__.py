"""Structured output: grammars (llguidance) that constrain what a sequence may generate, the token
controller that applies them in the engine's sampler, and tool calling built on top of them.

Why llguidance (bench/grammar_libs.py, README "Structured output"): per-token mask cost on the
SmolLM2 tokenizer is ~0.02-0.03 ms (xgrammar: ~0.002 ms; both far below a ~20 ms decode step),
schemas compile in ~1 ms (xgrammar ~6 ms), and the wheel is 8 MB with no dependencies, where
xgrammar pulls triton (~1 GB) and a TVM runtime into every install and container image.
"""
