"""Compression of the registered models, and the files and figures that come out of it.

Training side: distillation losses (`distill`), the training engine (`training`), magnitude
pruning (`prune`), quantization-aware training (`quantize`).
TFLite files (`tflite/`): conversion to every format and the fast int8 path, the flatbuffer
editor, the interpreter, the audit.
Measurement (`measure/`): latency in a fresh process, accuracy through the interpreter, host
facts and GEMM floors, static costs of a Keras model.
Results (`results/`): results.csv, report.md with plots, the HParams view.
Benchmark (`bench`): registered models converted and timed side by side (scripts/bench_tflite.py).
Shared: atomic writes (`io`), isolated child processes (`child`).
"""
