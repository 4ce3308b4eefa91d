"""Weights: training checkpoints, written atomically and resumed exactly (checkpoint.py), and where a
model's weights come from for fine-tuning, evaluation and the audit (sources.py)."""
