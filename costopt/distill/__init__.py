"""Distillation: a smaller student built from the teacher (pruned by measured importance) and trained on
the teacher's own outputs. `student` prunes, `teacher` precomputes the targets, `loss` and `train` fit."""
