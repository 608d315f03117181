"""Helpers shared by the test folders (import as `tests.helpers`; pytest's pythonpath is '.').

- What a test needs from the environment: `require_module`, `require_imagenette`,
  `import_torch_timm`. Missing locally: the test is skipped; with CI=true it fails, in one line
  naming what is missing (CI installs both requirement files and provides the data).
- The pipeline's command line: `pipeline_command`, `run_pipeline`.
- Real images: `load_images`; TFLite outputs: `run_tflite`.
- Tiny Keras models: `tiny_convnet` / `tiny_vit` (any input size, for training) and
  `fixed_tiny_vit` / `glue_layers_convnet` (fixed size, seeded, for pruning and quantization).
- `local_cluster`: TF_CONFIG values of a loopback multi-worker cluster.
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# The real data set (Imagenette 160 px, `imagenette2-160`): the folder IMAGENETTE_DIR names.
_DATA = os.environ.get("IMAGENETTE_DIR")
IMAGENETTE = pathlib.Path(_DATA).absolute() if _DATA else None
SMOKE_STUDENT, SMOKE_TEACHER = "mobilevit_xxs", "vit_tiny_patch16"


# ------------------------------------------------------------------------------- environment

def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def missing(what: str):
    """Skip the test (locally) or fail it (CI=true): `what` is missing from this environment."""
    if in_ci():
        pytest.fail(f"CI=true and {what}", pytrace=False)
    pytest.skip(what, allow_module_level=True)


def require_module(name: str):
    """`pytest.importorskip`, except that with CI=true a missing module fails the test."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        missing(f"module {name} cannot be imported ({e}): install requirements-test.txt")


def require_imagenette() -> pathlib.Path:
    if IMAGENETTE is None:
        missing("IMAGENETTE_DIR is not set: set it to the imagenette2-160 folder")
    if not (IMAGENETTE / "train").is_dir():
        missing(f"IMAGENETTE_DIR={IMAGENETTE} has no train/ folder: set it to the "
                "imagenette2-160 folder")
    return IMAGENETTE


def block_triton():
    """torch imports triton (via torchvision -> torch._dynamo), and triton's native library
    segfaults when TensorFlow is already loaded in the process; CPU torch does not need it, so
    `import triton` is made to fail cleanly (torch then treats it as not installed)."""
    if "torch" not in sys.modules:
        sys.modules.setdefault("triton", None)


def import_torch_timm():
    """(torch, timm), imported after TensorFlow without crashing."""
    block_triton()
    return require_module("torch"), require_module("timm")


# ------------------------------------------------------------------------------- the pipeline

def pipeline_command(workdir, data, *extra, student=SMOKE_STUDENT, teacher=SMOKE_TEACHER,
                     preset="smoke") -> list[str]:
    """`python -m experiments.pipeline ...` on the smoke preset; `extra` flags go last."""
    return [sys.executable, "-m", "experiments.pipeline", f"--student={student}",
            f"--teacher={teacher}", f"--data={data}", f"--workdir={workdir}",
            f"--preset={preset}", *map(str, extra)]


def run_pipeline(workdir, data, *extra, timeout=3600, **names):
    """The pipeline in a subprocess (from the repository root), asserted to succeed; returns
    (CompletedProcess, seconds). The timeout only guards against a hung run: a loaded
    2-core machine took more than 25 minutes for the whole smoke preset."""
    start = time.time()
    proc = subprocess.run(pipeline_command(workdir, data, *extra, **names), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc, time.time() - start


# ----------------------------------------------------------------------------- images, TFLite

MEAN = np.array([0.485, 0.456, 0.406], "float32")
STD = np.array([0.229, 0.224, 0.225], "float32")


def load_images(root, n: int, size: int, *, imagenet_norm: bool = False) -> np.ndarray:
    """`n` Imagenette val images, the first of each of the first `n` classes, resized
    (bilinear) to size x size: float32 in [0, 1], or ImageNet-normalised with `imagenet_norm`."""
    from models.compat import tf

    val = pathlib.Path(root) / "val"
    classes = sorted(p.name for p in val.iterdir() if p.is_dir())[:n]
    files = [sorted((val / c).glob("*.JPEG"))[0] for c in classes]
    assert len(files) == n, f"{val} has {len(files)} classes, {n} wanted"
    imgs = np.stack([tf.image.resize(tf.io.decode_jpeg(tf.io.read_file(str(f)), channels=3),
                                     (size, size)).numpy() for f in files]) / 255.0
    if imagenet_norm:
        imgs = (imgs - MEAN) / STD
    return imgs.astype("float32")


def run_tflite(content, x):
    """Float outputs of a .tflite file (bytes) under the default XNNPACK delegate, as deployed."""
    from compress.tflite.interpreter import make_interpreter
    from compress.tflite.interpreter import run_tflite as run

    return run(make_interpreter(content), x)


# -------------------------------------------------------------------------------- tiny models

TINY_VIT = dict(dim=32, depth=1, heads=2, mlp_dim=64, input_size=32, num_classes=5)


def tiny_convnet(num_classes=5, *, input_size=None, two_heads=False, dropout=0.0, name="tiny"):
    """Two strided convs, BatchNorm, pooling and a head (two with `two_heads`); any input size
    unless `input_size`. For the training and distillation tests."""
    from models.compat import keras

    shape = (input_size, input_size, 3) if input_size else (None, None, 3)
    inputs = keras.Input(shape, name="image")
    x = keras.layers.Conv2D(8, 3, strides=2, padding="valid", name=f"{name}_conv1")(inputs)
    x = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=f"{name}_bn1")(x)
    x = keras.layers.Activation("relu", name=f"{name}_relu1")(x)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="valid", name=f"{name}_conv2")(x)
    x = keras.layers.GlobalAveragePooling2D(name=f"{name}_pool")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name=f"{name}_drop")(x)
    out = keras.layers.Dense(num_classes, name=f"{name}_head")(x)
    if two_heads:
        dist = keras.layers.Dense(num_classes, name=f"{name}_dist_head")(x)
        return keras.Model(inputs, [out, dist], name=name)
    return keras.Model(inputs, out, name=name)


def tiny_vit(num_classes=5, *, input_size=None, name="tiny_vit"):
    """A one-block ViT (dim 32), any input size unless `input_size`. For training tests."""
    from models.vit import build_vit

    return build_vit(dim=32, depth=1, heads=2, mlp_dim=64, num_classes=num_classes,
                     input_size=input_size, name=name)


def fixed_tiny_vit(seed=0):
    """The one-block ViT at 32 px, 5 classes, seeded. For the pruning and quantization tests."""
    from models.compat import keras
    from models.vit import build_vit

    keras.utils.set_random_seed(seed)
    return build_vit(**TINY_VIT)


def glue_layers_convnet(seed=0, size=16):
    """Conv+BN+depthwise stem and a block with every stock merge/glue layer the students use."""
    from models.compat import keras
    from models.layers import LayerScale

    keras.utils.set_random_seed(seed)
    L = keras.layers
    inputs = keras.Input((size, size, 3), name="image")
    x = L.ZeroPadding2D(1, name="stem_pad")(inputs)
    x = L.Conv2D(8, 3, strides=2, use_bias=False, name="stem_conv")(x)
    x = L.BatchNormalization(epsilon=1e-5, momentum=0.9, name="stem_bn")(x)
    x = L.Activation("swish", name="stem_act")(x)
    y = L.DepthwiseConv2D(3, padding="same", use_bias=False, name="b1_dw")(x)
    y = L.BatchNormalization(epsilon=1e-5, momentum=0.9, name="b1_dw_bn")(y)
    y = L.ReLU(max_value=6.0, name="b1_relu6")(y)
    y = L.Conv2D(8, 1, use_bias=False, name="b1_pw")(y)
    y = L.BatchNormalization(epsilon=1e-5, momentum=0.9, name="b1_pw_bn")(y)
    y = LayerScale(0.5, name="b1_ls")(y)
    x = L.Add(name="b1_add")([x, y])
    p = L.AveragePooling2D(3, strides=1, padding="same", name="pool")(x)
    d = L.Subtract(name="pool_sub")([p, x])
    m = L.Multiply(name="gate")([x, L.Activation("sigmoid", name="gate_act")(d)])
    a = L.Average(name="avg")([m, x])
    c = L.Concatenate(name="cat")([a, x])  # 16 channels
    t = L.Reshape((-1, 16), name="tokens")(c)
    t = L.LayerNormalization(epsilon=1e-5, name="tok_ln")(t)
    t = L.Dense(16, name="tok_fc", activation="gelu")(t)
    t = L.Softmax(axis=-1, name="tok_softmax")(t)
    t = L.Permute((2, 1), name="tok_permute")(t)
    t = L.Permute((2, 1), name="tok_unpermute")(t)
    t = L.GlobalAveragePooling1D(name="tok_gap")(t)
    g = L.GlobalAveragePooling2D(name="gap")(c)
    g = L.Concatenate(name="feat")([g, t])
    g = L.Dropout(0.1, name="drop")(g)
    out = L.Dense(4, name="head")(g)
    return keras.Model(inputs, out, name="tiny_convnet")


# --------------------------------------------------------------------------------- clusters

def local_cluster(n):
    """TF_CONFIG values of the `n` tasks of a MultiWorkerMirroredStrategy cluster on loopback
    ports free right now (bound to port 0, then released for the workers)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("localhost", 0))
    workers = [f"localhost:{s.getsockname()[1]}" for s in socks]
    for s in socks:
        s.close()
    return [json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}})
            for i in range(n)]
