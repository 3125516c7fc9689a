"""The serving layer: between the HTTP routes and the model pool.

    api/routes  ->  serving/chat.py, serving/completions.py (prepare: stages, budget, one render + tokenize)
                ->  serving/submit.py (admission before the first byte, metrics, deadline)
                ->  engine (ThreadedEngine: native or transformers)

A chat request passes through stages (serving/stages/: reasoning plan, RAG grounding; multimodal
inputs, tools and structured output plug in the same way). Each contributes messages, token
reservations and per-sequence controllers to one TokenBudget (context = prompt + thinking +
answer); the prompt is rendered and tokenized once, after every stage has run.
"""
