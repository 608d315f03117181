"""Compression of the registered models: distillation (`compress.distill`), the training engine
(`compress.training`), pruning (`compress.prune`), quantization-aware training
(`compress.quantize`), TFLite export and audit (`compress.export`, `compress.audit`), and
measurement (`compress.benchmark`, `compress.results`)."""
