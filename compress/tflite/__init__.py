"""TFLite files: `convert` (every format; `export_tflite`), `fast_int8` (the int8 path that runs
in one XNNPACK partition), `flatbuffer` (reading and editing a file), `interpreter` (the one way
to build and run an ai_edge_litert interpreter), `audit` (what is in a file and what XNNPACK
takes of it). Import the submodules: `interpreter` and `flatbuffer` load without TensorFlow.
"""
