"""`frontier distill`: a small draft model for speculative decoding, distilled from a chat model.

data.py (shipped prompts, the teacher's own answers, its hidden states), student.py (the student
built from teacher layers; the compact file kept in the repository and the full model directory
assembled from it, also by `frontier pull`), train.py (KL training, draft-quality numbers),
run.py (the pipeline). Measured numbers: README "Distilled draft".
"""
