"""Compression stages: distillation, pruning, QAT, TFLite export and audit."""
