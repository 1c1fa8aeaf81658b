"""Evaluation: the evaluator, Bengali-correct metrics, honesty checks."""
