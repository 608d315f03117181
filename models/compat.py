"""The one place that imports Keras.

Why this module exists: TensorFlow 2.16+ makes `tf.keras` point at Keras 3, but
tensorflow-model-optimization (pruning, QAT) only accepts Keras 2 models and refuses
Keras 3 ones. The Keras 2 API ships as the `tf_keras` package and TensorFlow routes
`tf.keras` to it only when `TF_USE_LEGACY_KERAS=1` is set *before TensorFlow is first
imported*; tfmot also sets that variable itself on import, so whether `tf.keras` means
Keras 2 or 3 would otherwise depend on import order. Every module of this project
therefore does `from models.compat import keras, tf` and never imports Keras any other way.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TF's C++ start-up chatter off the console
os.environ["TF_USE_LEGACY_KERAS"] = "1"

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

__all__ = ["keras", "tf"]
