"""This host's measured GEMM ceiling under XNNPACK (`gemm_ceiling`) and a model's floor
(`floor_ms`): 2 * MACs at that ceiling, which no implementation of its matrix products beats here.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from compress.io import atomic_write
from compress.measure.latency import measure_latency

_SEED = 0


# 1x1 convolutions C -> C over [1, S, S, C], 205 M MACs each: the shapes at which XNNPACK's GEMM
# kernels reach their peak on this kind of host (measured: 56x56x128 and 112x112x64 run at 80%
# and 65% of it in int8).
CEILING_SHAPES = ((56, 256), (28, 512), (14, 1024))


def _ceiling_file(path: str, side: int, channels: int, fmt: str) -> None:
    """A one-op file: 1x1 conv (bias) on [1, side, side, channels]; int8 with int8 input and
    output so that only the GEMM is timed."""
    from models.compat import keras, tf

    rng = np.random.default_rng(_SEED)
    inputs = keras.Input((side, side, channels))
    conv = keras.layers.Conv2D(channels, 1)
    model = keras.Model(inputs, conv(inputs))
    conv.set_weights([rng.normal(0, channels ** -0.5, (1, 1, channels, channels)).astype("float32"),
                      np.zeros(channels, "float32")])
    spec = tf.TensorSpec([1, side, side, channels], tf.float32)
    fn = tf.function(lambda x: model(x), input_signature=[spec], autograph=False)
    conv_ = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()])
    if fmt == "int8":
        calib = [rng.uniform(-1, 1, (1, side, side, channels)).astype("float32") for _ in range(4)]
        conv_.optimizations = [tf.lite.Optimize.DEFAULT]
        conv_.representative_dataset = lambda: ([c] for c in calib)
        conv_.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv_.inference_input_type = conv_.inference_output_type = tf.int8
    atomic_write(path, conv_.convert())


def gemm_ceiling(
    outdir: str,
    *,
    threads: Sequence[int] = (1,),
    runs: int = 30,
    min_secs: float = 0.5,
    deny_amx: bool = False,
    shapes: Sequence[tuple[int, int]] | None = None,
) -> dict:
    """This host's measured GEMM throughput under XNNPACK: the best over `shapes` of one-op
    files (1x1 conv, C -> C), each timed like any other file (fresh process, p50).

    The floor of a model is then 2 * MACs / throughput: no implementation of its matrix products
    runs faster on this host, whatever it does with the rest (element-wise ops, softmax, data
    movement, which the floor leaves out).

    Returns {threads: {"fp32_gflops", "int8_gops", "by_shape": {"SxSxC": {"fp32", "int8"}}}}
    (GFLOP/s and GOP/s, 2 ops per MAC); files are kept in `outdir` and reused.
    """
    os.makedirs(outdir, exist_ok=True)
    shapes = CEILING_SHAPES if shapes is None else shapes
    out: dict = {}
    for t in threads:
        best = {"fp32": 0.0, "int8": 0.0}
        by_shape = {}
        for side, c in shapes:
            key = f"{side}x{side}x{c}"
            by_shape[key] = {}
            for fmt in ("fp32", "int8"):
                path = os.path.join(outdir, f"conv1x1_{key}.{fmt}.tflite")
                if not os.path.exists(path):
                    _ceiling_file(path, side, c, fmt)
                lat = measure_latency(path, threads=int(t), runs=runs, min_secs=min_secs,
                                      fallback=False, deny_amx=deny_amx)
                rate = 2.0 * side * side * c * c / (lat["latency_p50_ms"] * 1e-3) / 1e9
                rate = 0.0 if rate != rate else rate  # NaN: the file could not run
                by_shape[key][fmt] = round(rate, 1)
                best[fmt] = max(best[fmt], rate)
        out[int(t)] = {"fp32_gflops": round(best["fp32"], 1), "int8_gops": round(best["int8"], 1),
                       "by_shape": by_shape}
    return out


def floor_ms(macs: int | None, fmt: str, ceiling: dict | None) -> float | None:
    """2 * MACs at the host's GEMM ceiling (`gemm_ceiling()[threads]`), in ms: fp32 and fp16
    files (fp16 computes in fp32 on x86) use the float ceiling, int8 and drq files the int8 one."""
    if not macs or not ceiling:
        return None
    rate = ceiling["int8_gops"] if fmt in ("int8", "drq", "int8_sparse", "int16x8") \
        else ceiling["fp32_gflops"]
    return 2.0 * macs / (rate * 1e9) * 1e3 if rate else None
