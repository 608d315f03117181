"""Accuracy of a TFLite file through the interpreter, and its agreement with the Keras model."""

from __future__ import annotations

import os
from typing import Iterable

import numpy as np

from compress.measure.latency import short
from compress.tflite.interpreter import RUNTIME, ImageRunner


def _to_numpy(x) -> np.ndarray:
    return x.numpy() if hasattr(x, "numpy") else np.asarray(x)


def evaluate_tflite(
    path: str,
    dataset: Iterable,
    *,
    threads: int = 2,
    delegate: str = "xnnpack",
    limit: int | None = None,
    progress: bool = True,
) -> dict:
    """Top-1 of a .tflite file over (float32 images [b, s, s, 3], int labels) batches.

    Images go through the interpreter one at a time (the batch dimension of exported files is 1).
    int8/uint8 inputs are quantized with the file's input scale and zero point. If the requested
    interpreter cannot run the file, the file is evaluated without the default delegates and
    `note` says so.

    Returns:
      {'top1', 'n', 'predictions' (int array, one per image, in dataset order), 'labels',
       'runtime', 'delegate', 'note'}.
    """
    from tqdm.auto import tqdm

    note = ""
    runner = ImageRunner(path, threads, delegate)
    preds: list[int] = []
    labels: list[int] = []
    bar = tqdm(desc=f"eval {os.path.basename(path)}", unit="img", disable=not progress, total=limit)
    try:
        for batch in dataset:
            images, ys = batch[0], batch[1]
            images = _to_numpy(images).astype(np.float32)
            ys = _to_numpy(ys).reshape(-1)
            for image, y in zip(images, ys):
                if limit is not None and len(preds) >= limit:
                    break
                try:
                    logits = runner(image)
                except RuntimeError as e:
                    if runner.delegate == "none" or preds:
                        raise
                    note = (
                        f"{RUNTIME} with XNNPACK could not run the file ({short(e)}); "
                        "evaluated with BUILTIN_WITHOUT_DEFAULT_DELEGATES"
                    )
                    runner = ImageRunner(path, threads, "none")
                    logits = runner(image)
                preds.append(int(np.argmax(logits)))
                labels.append(int(y))
                bar.update(1)
            if limit is not None and len(preds) >= limit:
                break
    finally:
        bar.close()
    p, y = np.asarray(preds, np.int64), np.asarray(labels, np.int64)
    return {
        "top1": float((p == y).mean()) if len(p) else float("nan"),
        "n": int(len(p)),
        "predictions": p,
        "labels": y,
        "runtime": RUNTIME if runner.delegate == delegate else f"{RUNTIME}[no_default_delegates]",
        "delegate": runner.delegate,
        "note": note,
    }


def keras_predictions(model, dataset: Iterable, *, limit: int | None = None) -> np.ndarray:
    """Top-1 class of a Keras model for every image of `dataset`, in order (for `agreement`)."""
    preds: list[int] = []
    for batch in dataset:
        images = _to_numpy(batch[0]).astype(np.float32)
        logits = model(images, training=False)
        if isinstance(logits, (list, tuple)):
            logits = logits[0]
        preds.extend(int(i) for i in np.argmax(_to_numpy(logits), axis=-1))
        if limit is not None and len(preds) >= limit:
            return np.asarray(preds[:limit], np.int64)
    return np.asarray(preds, np.int64)


def agreement(predictions_a, predictions_b) -> float:
    """Fraction of images where two prediction arrays agree (the arrays must match in length)."""
    a, b = np.asarray(predictions_a), np.asarray(predictions_b)
    if a.shape != b.shape:
        raise ValueError(f"prediction arrays differ in shape: {a.shape} vs {b.shape}")
    return float((a == b).mean()) if a.size else float("nan")
