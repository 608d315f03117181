"""Compression of the registered models: distillation, pruning (`compress.prune`),
quantization-aware training (`compress.quantize`) and export."""
