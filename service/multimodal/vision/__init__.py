"""The embedded vision adapter: a small encoder + projector trained into a frozen chat model.

synth.py (seeded procedural images, templated questions, answer matching), model.py (VisionAdapter:
encoder, projector, preprocessing, fp16 safetensors + config.json), prompt.py (the placeholder
convention the serving engine splices the same way), generate.py (greedy decoding with image rows
spliced in), train.py (warm-up, then answer loss through the frozen LM), run.py (the
`frontier train-vision` pipeline). Shipped adapter: models/vision/smollm2-135m-vision; numbers:
bench/vision.py -> bench/results/vision.md.
"""
