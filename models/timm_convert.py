"""Convert timm (PyTorch) weights of the students and ViT teachers into our Keras models.

A family with timm weights names them in its `FAMILY` (`timm_names`, and `timm_converter` when
the converter lives in another module); that module provides `convert_timm_state_dict(model,
state_dict)` taking NumPy arrays keyed by timm's parameter names, so the models themselves never
import torch; `key_problems` is the key check the converters share. This module adds the reading
of checkpoint files (torch pickles through `models.torch_pickle`, so no module of the project
imports torch).
"""

from __future__ import annotations

import importlib
import os

import numpy as np

import models
from models import registry, torch_pickle
from models.compat import keras

_HEAD_KEYS = ("head.fc.weight", "head.weight")  # MobileViT; EfficientFormer and ViT class heads


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """Read a timm checkpoint (`.pth`/`.pt`/`.bin` torch pickle, or `.safetensors`) as NumPy.

    `.safetensors` needs only the `safetensors` package; a torch pickle (zip or legacy layout)
    is read by `models.torch_pickle`, without PyTorch. Floating-point tensors become float32. A
    state dict nested in a training checkpoint (`state_dict`, `model`, `state_dict_ema`) is
    taken, and a `module.` prefix dropped. Errors are one-line ValueErrors naming the file;
    callers prefix their flag.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise ValueError(f"no such file {path!r}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.numpy import load_file

            obj = load_file(path)
        else:
            obj = torch_pickle.load(path)
    except torch_pickle.TorchPickleError as e:
        raise ValueError(f"cannot read {path!r} as a timm checkpoint "
                         f"(truncated or not a state dict file?): {e.reason[:200]}") from e
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint gets one clear message
        detail = " ".join(str(e).split())[:200]
        raise ValueError(f"cannot read {path!r} as a timm checkpoint "
                         f"(truncated or not a state dict file?): {detail}") from e
    for key in ("state_dict", "model", "state_dict_ema"):  # training checkpoints nest it
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
        raise ValueError(f"{path!r} holds a {type(obj).__name__} that is not a state dict of "
                         "tensors")
    return {k.removeprefix("module."): v.astype(np.float32) if v.dtype.kind == "f" else v
            for k, v in obj.items()}


def few(keys, n: int = 4) -> str:
    """The first `n` of `keys` in sorted order, then how many more: `a, b, c, d and 3 more`."""
    keys = sorted(keys)
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def key_problems(actual, expected, *, ignored=()) -> list[str]:
    """What keeps a state dict with keys `actual` from filling a model that reads `expected`.

    Keys in `ignored` (e.g. `num_batches_tracked` buffers, a classifier left as built) may be
    present or not. Returns up to two phrases, each naming the first few keys in sorted order,
    e.g. `["2 missing key(s): a, b", "5 unexpected key(s): c, d, e, f and 1 more"]`; empty when
    the keys fit. Converters join them (and their shape mismatches) into one error line.
    """
    missing = set(expected) - set(actual)
    unexpected = set(actual) - set(expected) - set(ignored)
    return ([f"{len(missing)} missing key(s): {few(missing)}"] if missing else []) + \
           ([f"{len(unexpected)} unexpected key(s): {few(unexpected)}"] if unexpected else [])


def num_classes_of(state_dict: dict[str, np.ndarray]) -> int:
    for key in _HEAD_KEYS:
        if key in state_dict:
            return int(state_dict[key].shape[0])
    raise ValueError(f"no classifier weight ({' or '.join(_HEAD_KEYS)}) in the state dict")


def convert(name: str, state_dict: dict[str, np.ndarray], *, input_size: int | None = None
            ) -> keras.Model:
    """Build registry model `name` with the checkpoint's class count and load the weights."""
    timm_names = registry.timm_names()
    if name not in timm_names:
        raise ValueError(f"--model: {name!r} has no timm counterpart; accepted: "
                         f"{', '.join(sorted(timm_names))}")
    family = registry.get_family(registry.get_model_info(name).family)
    module = importlib.import_module(family.timm_converter or family.module)
    kwargs = dict(family.timm_build)
    # a family may read the class count itself (the ViTs check the whole layout first)
    num_classes = getattr(module, "num_classes_of", num_classes_of)(state_dict)
    model = models.create_model(name, num_classes=num_classes, input_size=input_size, **kwargs)
    module.convert_timm_state_dict(model, state_dict)
    if kwargs:  # rebuild the inference graph (heads averaged) around the same weights
        inference = models.create_model(name, num_classes=num_classes, input_size=input_size)
        inference.set_weights(model.get_weights())
        model = inference
    return model
