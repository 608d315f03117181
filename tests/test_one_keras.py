"""Only models/compat.py may import Keras or TensorFlow's Keras (see its docstring for why)."""

import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]
PATTERN = re.compile(
    r"^\s*(import (tf_keras|keras)\b|from (tf_keras|keras)\b|from tensorflow(\.python)? import keras"
    r"|import tensorflow\.keras|from tensorflow\.keras)|tf\.keras\.",
    re.M,
)


def test_keras_is_imported_only_in_compat():
    offenders = []
    for path in REPO.rglob("*.py"):
        rel = path.relative_to(REPO)
        if rel.parts[0] in (".venv", "runs") or rel == pathlib.Path("models/compat.py"):
            continue
        if rel == pathlib.Path(__file__).relative_to(REPO):
            continue
        if PATTERN.search(path.read_text()):
            offenders.append(str(rel))
    assert offenders == []


def test_compat_selects_keras_2():
    from models.compat import keras, tf

    assert keras.__name__ == "tf_keras" and keras.__version__.startswith("2.")
    # tf.keras resolves to Keras 2 too (its module name can read "tensorflow.keras" once another
    # package has imported it under that name, e.g. keras-cv-attention-models; the file tells)
    assert "tf_keras" in tf.keras.__file__
