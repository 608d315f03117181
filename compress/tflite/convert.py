"""TFLite export of Keras models in every format of the project, and the fast int8 path on XNNPACK.

`export_tflite(model, path, fmt=..., input_size=S)` converts a tf-keras model (plain, pruned and
stripped, or tfmot QAT-wrapped) from a concrete function whose input is pinned to [1, S, S, 3],
so the file has static shapes and no run-time shape ops (ECOSYSTEM §B9), with builtin ops only
(never SELECT_TF_OPS), and writes it atomically (temporary file + rename).

Formats (the public names of `results.csv` column `format`):

| fmt           | converter settings                                                          |
|---------------|-----------------------------------------------------------------------------|
| `fp32`        | none                                                                        |
| `fp16`        | Optimize.DEFAULT, supported_types=[float16] (fp16 weights, float compute)    |
| `drq`         | Optimize.DEFAULT, no representative set (int8 weights, float activations)   |
| `int8`        | full integer with float I/O, representative set (see "fast int8" below)     |
| `int16x8`     | 16-bit activations / int8 weights (EXPERIMENTAL_..._INT16_WEIGHTS_INT8)     |
| `fp32_sparse` | Optimize.EXPERIMENTAL_SPARSITY (sparse weight storage, DENSIFY at run time) |
| `int8_sparse` | [DEFAULT, EXPERIMENTAL_SPARSITY] + representative set                       |

QAT models take the same path: `Optimize.DEFAULT` with the representative set, which calibrates
the ranges the fake-quant nodes do not cover (without one the file keeps float islands, STACK
§2c).

The `int8` format goes through the fast int8 path by default (`compress.tflite.fast_int8`).

`export_tflite` returns metadata (path, fmt, input_size, size_bytes, gzip_bytes, convert_s, ...).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable

import numpy as np

from compress.io import atomic_write, file_sizes
from compress.tflite import fast_int8
from models.compat import tf


FORMATS = ("fp32", "fp16", "drq", "int8", "int16x8", "fp32_sparse", "int8_sparse")


NEEDS_REPRESENTATIVE = ("int8", "int16x8", "int8_sparse")


def _is_qat(model) -> bool:
    names = {type(layer).__name__ for layer in model.layers}
    return bool(names & {"QuantizeWrapper", "QuantizeWrapperV2", "QuantizeLayer"})


def representative_fn(representative, input_size: int, limit: int | None = None
                      ) -> Callable[[], Iterable[list[np.ndarray]]]:
    """Normalizes a representative set into the converter's callable.

    Args:
      representative: images [N, S, S, 3] (numpy or tensor), a list of images or batches, a
        `tf.data.Dataset` of images or batches (or of (image, label) pairs), or a callable
        returning such an iterable.
      input_size: S; images of another size are refused (calibrate at the export size).
      limit: the number of images to use (None: all).
    Returns: a function yielding [x] with x of shape [1, S, S, 3], float32.
    """
    def images():
        src = representative() if callable(representative) else representative
        if isinstance(src, (np.ndarray, tf.Tensor)):
            src = [src]
        for item in src:
            if isinstance(item, (tuple, list)) and len(item) and not np.isscalar(item[0]):
                item = item[0]
            if isinstance(item, dict):
                item = item.get("image", next(iter(item.values())))
            arr = np.asarray(item, np.float32)
            if arr.ndim == 3:
                arr = arr[None]
            yield from arr

    def gen():
        n = 0
        for x in images():
            if x.shape != (input_size, input_size, 3):
                raise ValueError(f"representative image of shape {x.shape}, expected "
                                 f"({input_size}, {input_size}, 3)")
            yield [x[None]]
            n += 1
            if limit is not None and n >= limit:
                return
        if n == 0:
            raise ValueError("the representative set is empty")

    return gen


def _converter(model, input_size: int):
    spec = tf.TensorSpec([1, input_size, input_size, 3], tf.float32, name="image")
    fn = tf.function(lambda x: model(x, training=False), input_signature=[spec], autograph=False)
    concrete = fn.get_concrete_function()
    # No trackable object: the converter then freezes the function's graph directly instead of
    # saving a SavedModel first, 10x faster (mobilevit_xxs at 64 px: 2.2 s against 24.7 s).
    conv = tf.lite.TFLiteConverter.from_concrete_functions([concrete])
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]  # never SELECT_TF_OPS
    return conv


def _configure(conv, fmt: str, rep, strict_int8: bool):
    opt = tf.lite.Optimize
    if fmt == "fp16":
        conv.optimizations = [opt.DEFAULT]
        conv.target_spec.supported_types = [tf.float16]
    elif fmt == "drq":
        conv.optimizations = [opt.DEFAULT]
    elif fmt == "int8":
        conv.optimizations = [opt.DEFAULT]
        conv.representative_dataset = rep
        if strict_int8:
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    elif fmt == "int16x8":
        conv.optimizations = [opt.DEFAULT]
        conv.representative_dataset = rep
        conv.target_spec.supported_ops = [
            tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8,
            tf.lite.OpsSet.TFLITE_BUILTINS,  # float fallback for ops without a 16x8 kernel
        ]
    elif fmt == "fp32_sparse":
        conv.optimizations = [opt.EXPERIMENTAL_SPARSITY]
    elif fmt == "int8_sparse":
        conv.optimizations = [opt.DEFAULT, opt.EXPERIMENTAL_SPARSITY]
        conv.representative_dataset = rep
    return conv


def export_tflite(
    model,
    path: str | os.PathLike,
    *,
    fmt: str,
    input_size: int,
    representative=None,
    num_calibration: int | None = 100,
    xnnpack_friendly: bool = True,
    symmetric_bmm: bool = True,
    max_passes: int = 3,
    extra_float_nodes: Iterable[str] = (),
    float_layers: Iterable[str] = (),
    strict_int8: bool = False,
) -> dict:
    """Converts `model` to a .tflite file of format `fmt` at input [1, input_size, input_size, 3].

    Args:
      model: a tf-keras functional model taking [B, H, W, 3] images (static or dynamic H, W);
        plain, pruned-and-stripped or tfmot QAT-wrapped.
      path: where to write the file (written atomically; folders are created).
      fmt: one of `FORMATS`.
      input_size: the square input size pinned in the file.
      representative: calibration images at `input_size` (see `representative_fn`); required for
        int8, int16x8 and int8_sparse, QAT models included (it calibrates the ranges the
        fake-quant nodes miss).
      num_calibration: how many representative images to use (None: all).
      xnnpack_friendly: int8 only: keep LayerNorm pieces and XNNPACK-float-only ops in float and
        make int8 BATCH_MATMUL inputs symmetric so the file runs in one XNNPACK partition (module
        doc). False gives the converter's plain full-integer file.
      symmetric_bmm: with `xnnpack_friendly`: rewrite BATCH_MATMUL right-hand inputs to zero
        point 0 (True) or keep BATCH_MATMUL float (False).
      max_passes: with `xnnpack_friendly`: quantize/probe rounds to move still-undelegated int8
        ops to float.
      extra_float_nodes: with `xnnpack_friendly`: regular expressions; ops whose output-tensor
        name matches one are also kept float.
      float_layers: with `xnnpack_friendly`: layer-name globs (e.g. "block1_*"); the ops of the
        matching layers are also kept float (for layers that int8 does not speed up).
      strict_int8: plain int8 only: `TFLITE_BUILTINS_INT8` (fail on an op without an int8
        kernel) instead of allowing a float fallback.
    Returns: dict(path, fmt, input_size, size_bytes, gzip_bytes, convert_s, qat,
      xnnpack_friendly, and for the fast int8 path: passes, float_nodes, bmm_rhs_symmetric,
      partitions).
    Raises:
      ValueError: unknown `fmt`, a format that needs a representative set without one, or a
        `float_layers` glob that matches no layer.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    qat = _is_qat(model)
    if fmt in NEEDS_REPRESENTATIVE and representative is None:
        raise ValueError(f"fmt={fmt!r} needs a representative set (images at the export size)")
    input_size = int(input_size)
    rep = (representative_fn(representative, input_size, num_calibration)
           if representative is not None else None)
    friendly = fmt == "int8" and xnnpack_friendly
    info = dict(path=os.fspath(path), fmt=fmt, input_size=input_size, qat=qat,
                xnnpack_friendly=friendly)
    t0 = time.perf_counter()
    conv = _configure(_converter(model, input_size), fmt, rep, strict_int8 and not friendly)
    if friendly:
        data = fast_int8.quantize(conv, model, float_layers=float_layers,
                                  symmetric_bmm=symmetric_bmm, max_passes=max_passes,
                                  extra_float=extra_float_nodes, info=info)
    else:
        data = conv.convert()
    info["convert_s"] = round(time.perf_counter() - t0, 3)
    atomic_write(path, data)
    info.update(file_sizes(data))
    return info
