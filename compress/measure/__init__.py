"""Measurement of TFLite files and Keras models: `latency` (fresh-process timing), `accuracy`
(top-1 through the interpreter, agreement), `host` (CPU and package facts), `floor` (GEMM
ceiling and floors), `costs` (parameters, MACs, memory traffic). Never imports `results`.
`latency` and `host` load without TensorFlow (the timed child processes import them).
"""
