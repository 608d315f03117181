"""Magnitude pruning of the registered models with tfmot 0.8.1 (`prune_low_magnitude`).

Method: Zhu & Gupta, "To prune, or not to prune" (arXiv:1710.01878): weights of the smallest
magnitude are masked to zero on a polynomial (or constant) sparsity schedule while training goes
on; `m_by_n=(2, 4)` gives the structured 2:4 pattern of sparse tensor cores instead.

How it is applied here (and why not `prune_low_magnitude(model)`): tfmot refuses a whole model
that holds any custom layer it does not know, so the model is cloned with a `clone_function`
that wraps only the layer classes of `PRUNABLE` (Conv2D, Dense: this includes every attention
q/k/v/proj, which are Dense layers) and custom layers whose `get_prunable_weights()` is not empty;
the trained weights are then copied into the clone, layer by layer, by name.

What stays dense, by design or by tfmot:
  * `DepthwiseConv2D`: tfmot's prune registry lists no prunable weight for it, so tfmot never
    prunes it (its sparsity stays 0; `sparsity_report` lists it as dense);
  * LayerNormalization / BatchNormalization / LayerScale / position embeddings / biases: not
    kernels; pruning them switches whole channels off;
  * any layer whose name matches a glob of `skip` (e.g. the stem conv or the classifier head).

Differences from tfmot's own entry points: settings are checked before any cloning, and a layer
that cannot take them (2:4 on a kernel whose input dimension is not a multiple of 4; block
sparsity on a 4-D conv kernel) raises a `ValueError` naming the layer and the setting instead of
failing inside a traced training step. Pruning does not make TFLite faster on these models (no
sparse kernels for attention; XNNPACK's sparse inference path needs a pure conv network); it
makes gzip and `EXPERIMENTAL_SPARSITY` files smaller.

Distribution strategies: call `apply_pruning` inside `strategy.scope()` so the clone's variables
(including masks and the pruning step) are created as distributed variables.
"""

from __future__ import annotations

import fnmatch
from typing import Iterable

import numpy as np

from models.compat import keras, tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before tfmot)
import tensorflow_model_optimization as tfmot  # noqa: E402

_sparsity = tfmot.sparsity.keras
PruneWrapper = _sparsity.PruneLowMagnitude if hasattr(_sparsity, "PruneLowMagnitude") else None
if PruneWrapper is None:  # tfmot 0.8.1 does not export the wrapper class publicly
    from tensorflow_model_optimization.python.core.sparsity.keras.pruning_wrapper import (  # noqa
        PruneLowMagnitude as PruneWrapper,
    )

# Stock layer classes (exact class name) whose kernel is pruned, and the weight tfmot masks.
PRUNABLE = {"Conv2D": "kernel", "Dense": "kernel"}

# Layer classes with kernel-like weights that stay dense, and why (listed in `sparsity_report`).
DENSE_BY_DESIGN = {
    "DepthwiseConv2D": "tfmot 0.8.1 never prunes DepthwiseConv2D (no prunable weight in its "
                       "prune registry)",
}
# Weight attribute that `sparsity_report` counts for the classes of DENSE_BY_DESIGN.
_DENSE_KERNEL = {"DepthwiseConv2D": "depthwise_kernel"}

SCHEDULES = ("polynomial", "constant")


# --------------------------------------------------------------------------------------------
# Settings.


def _check_sparsity(value, name="target_sparsity") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


def _check_pair(value, name) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        a, b = value
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair of positive ints, got {value!r}") from None
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0
               for v in (a, b)):
        raise ValueError(f"{name} must be a pair of positive ints, got {value!r}")
    return int(a), int(b)


def make_schedule(*, target_sparsity: float, schedule: str = "polynomial", begin_step: int = 0,
                  end_step: int = 1000, frequency: int = 100):
    """A tfmot `PruningSchedule`: polynomial 0 -> target over [begin_step, end_step], or constant
    target from begin_step (end_step=-1: forever); masks update every `frequency` steps."""
    target = _check_sparsity(target_sparsity)
    for name, v in (("begin_step", begin_step), ("end_step", end_step), ("frequency", frequency)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"{name} must be an int, got {v!r}")
    if begin_step < 0:
        raise ValueError(f"begin_step must be >= 0, got {begin_step}")
    if frequency <= 0:
        raise ValueError(f"frequency must be > 0, got {frequency}")
    if schedule == "polynomial":
        if end_step <= begin_step:
            raise ValueError(f"end_step ({end_step}) must be > begin_step ({begin_step}) for the "
                             "polynomial schedule")
        return _sparsity.PolynomialDecay(initial_sparsity=0.0, final_sparsity=target,
                                         begin_step=int(begin_step), end_step=int(end_step),
                                         frequency=int(frequency))
    if schedule == "constant":
        if end_step != -1 and end_step < begin_step:
            raise ValueError(f"end_step ({end_step}) must be -1 or >= begin_step ({begin_step})")
        return _sparsity.ConstantSparsity(target, begin_step=int(begin_step),
                                          end_step=int(end_step), frequency=int(frequency))
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


# --------------------------------------------------------------------------------------------
# Which layers are pruned.


def _is_custom(layer) -> bool:
    return not type(layer).__module__.startswith(("tf_keras.", "keras."))


def prunable_weights(layer) -> list:
    """The kernel-like weights magnitude pruning may touch in `layer` (unwrapped), else []."""
    cls = type(layer).__name__
    if cls in PRUNABLE and not _is_custom(layer):
        return [getattr(layer, PRUNABLE[cls])]
    if _is_custom(layer) and hasattr(layer, "get_prunable_weights"):
        return list(layer.get_prunable_weights())
    return []


def _matches(name: str, globs: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


def _check_layer(layer, *, m_by_n, block_size) -> None:
    """Raise if the structured settings cannot apply to this layer's prunable weights."""
    for w in prunable_weights(layer):
        shape = tuple(w.shape)
        wname = w.name.split("/")[-1].split(":")[0]
        where = f"layer {layer.name!r} ({type(layer).__name__}, weight {wname} {shape})"
        if m_by_n is not None:
            m, n = m_by_n
            if len(shape) not in (2, 4):
                raise ValueError(f"m_by_n={m_by_n} cannot prune {where}: tfmot's m-by-n pruning "
                                 "takes only 2-D (Dense) or 4-D (Conv2D) kernels; add the layer "
                                 "to skip=")
            if shape[-2] % n:
                raise ValueError(f"m_by_n={m_by_n} cannot prune {where}: its input dimension "
                                 f"{shape[-2]} is not a multiple of {n}; add the layer to skip=")
        if block_size is not None and tuple(block_size) != (1, 1):
            if len(shape) != 2:
                raise ValueError(f"block_size={tuple(block_size)} cannot prune {where}: tfmot's "
                                 "block sparsity takes only 2-D (Dense) kernels; add the layer "
                                 "to skip=")


def pruning_plan(model, *, skip: Iterable[str] = (), m_by_n=None, block_size=None) -> dict:
    """{layer name: 'prune' | 'skip' | reason it stays dense} for every layer with weights."""
    skip = tuple(skip)
    plan = {}
    for layer in model.layers:
        cls = type(layer).__name__
        if prunable_weights(layer):
            if _matches(layer.name, skip):
                plan[layer.name] = "skip"
            else:
                _check_layer(layer, m_by_n=m_by_n, block_size=block_size)
                plan[layer.name] = "prune"
        elif cls in DENSE_BY_DESIGN:
            plan[layer.name] = DENSE_BY_DESIGN[cls]
        elif layer.weights:
            plan[layer.name] = "no prunable weights"
    return plan


# --------------------------------------------------------------------------------------------
# Public API.


def apply_pruning(
    model: keras.Model,
    *,
    target_sparsity: float,
    schedule: str = "polynomial",
    begin_step: int = 0,
    end_step: int = 1000,
    frequency: int = 100,
    block_size=None,
    m_by_n=None,
    skip: Iterable[str] = (),
) -> keras.Model:
    """A copy of `model` whose Conv2D/Dense (and custom prunable) layers are pruning-wrapped.

    The copy holds the trained weights of `model` (masks start at one, so outputs are equal
    until the first mask update). Train it with `pruning_callbacks()` (UpdatePruningStep is
    required), then `strip()` it. Call inside `strategy.scope()` to train under a distribution
    strategy.

    Args:
      target_sparsity: fraction of zeros each pruned kernel reaches, in [0, 1). Ignored by tfmot
        when `m_by_n` is set (the pattern fixes the sparsity at m/n).
      schedule: 'polynomial' (0 -> target over [begin_step, end_step], cubic) or 'constant'
        (target from begin_step; end_step=-1 means no end).
      frequency: steps between mask updates.
      block_size: (h, w) block sparsity on 2-D kernels (Dense); a Conv2D in the plan raises.
      m_by_n: e.g. (2, 4): in every group of n consecutive input-channel weights m are zero; the
        masks are set once, at pruning step 1. A kernel whose input dimension is not a multiple
        of n (e.g. a 3-channel stem conv) raises unless the layer is in `skip`.
      skip: layer-name globs that stay dense (e.g. ("patch_embed", "head")).
    Returns: a new functional model (`model` is not modified).
    """
    sched = make_schedule(target_sparsity=target_sparsity, schedule=schedule,
                          begin_step=begin_step, end_step=end_step, frequency=frequency)
    m_by_n = _check_pair(m_by_n, "m_by_n")
    if m_by_n is not None and m_by_n[0] >= m_by_n[1]:
        raise ValueError(f"m_by_n=(m, n) needs m < n, got {m_by_n}")
    block_size = _check_pair(block_size, "block_size")
    if m_by_n is not None and block_size not in (None, (1, 1)):
        raise ValueError(f"block_size={block_size} and m_by_n={m_by_n} cannot be combined")
    if isinstance(skip, str):
        skip = (skip,)
    if any(isinstance(l, PruneWrapper) for l in model.layers):
        raise ValueError("model is already pruning-wrapped; strip() it first")

    plan = pruning_plan(model, skip=skip, m_by_n=m_by_n, block_size=block_size)
    kwargs = dict(pruning_schedule=sched)
    if m_by_n is not None:
        kwargs["sparsity_m_by_n"] = m_by_n
    if block_size is not None:
        kwargs["block_size"] = block_size

    def clone_fn(layer):
        fresh = layer.__class__.from_config(layer.get_config())
        if plan.get(layer.name) == "prune":
            return _sparsity.prune_low_magnitude(fresh, **kwargs)
        return fresh

    pruned = keras.models.clone_model(model, clone_function=clone_fn)
    _copy_weights(model, pruned)
    return pruned


def _unwrap(layer):
    return layer.layer if isinstance(layer, PruneWrapper) else layer


def _copy_weights(src: keras.Model, dst: keras.Model) -> None:
    """Copy every layer's weights from `src` into the same-named (possibly wrapped) layer."""
    by_name = {_unwrap(l).name: _unwrap(l) for l in dst.layers}
    for layer in src.layers:
        if not layer.weights:
            continue
        target = by_name.get(_unwrap(layer).name)
        if target is None:
            raise ValueError(f"layer {layer.name!r} has no counterpart in the pruned clone")
        target.set_weights(_unwrap(layer).get_weights())


def pruning_callbacks(logdir: str | None = None) -> list:
    """Callbacks a pruning run needs: UpdatePruningStep (required: it advances the step the
    schedule reads) and, with a `logdir`, PruningSummaries (sparsity and threshold per layer in
    TensorBoard)."""
    cbs = [_sparsity.UpdatePruningStep()]
    if logdir:
        cbs.append(_sparsity.PruningSummaries(log_dir=str(logdir)))
    return cbs


def strip(model: keras.Model) -> keras.Model:
    """The model without pruning wrappers (the masked kernels hold the zeros); for export."""
    return _sparsity.strip_pruning(model)


def is_pruning_wrapped(model: keras.Model) -> bool:
    return any(isinstance(l, PruneWrapper) for l in model.layers)


def sparsity_report(model: keras.Model) -> dict:
    """Zeros per layer and overall, for a pruning-wrapped or a stripped model.

    Returns: {"layers": {name: {class, weights, size, zeros, sparsity, prunable, wrapped, note}},
              "overall": {size, zeros, sparsity} over the prunable kernels (Conv2D, Dense, custom
              `get_prunable_weights`, whether pruned or skipped),
              "overall_with_dense": the same including DepthwiseConv2D kernels}.
    """
    layers = {}
    for layer in model.layers:
        inner = _unwrap(layer)
        cls = type(inner).__name__
        weights = prunable_weights(inner)
        prunable = bool(weights)
        note = ""
        if not weights and cls in DENSE_BY_DESIGN:
            weights = [getattr(inner, _DENSE_KERNEL[cls])]
            note = DENSE_BY_DESIGN[cls]
        if not weights:
            continue
        values = [np.asarray(w.numpy()) for w in weights]
        size = int(sum(v.size for v in values))
        zeros = int(sum(int(np.sum(v == 0)) for v in values))
        layers[inner.name] = dict(
            cls=cls, weights=[w.name.split("/")[-1].split(":")[0] for w in weights], size=size,
            zeros=zeros, sparsity=zeros / size if size else 0.0, prunable=prunable,
            wrapped=isinstance(layer, PruneWrapper), note=note)

    def total(rows):
        size = sum(r["size"] for r in rows)
        zeros = sum(r["zeros"] for r in rows)
        return dict(size=size, zeros=zeros, sparsity=zeros / size if size else 0.0)

    return dict(layers=layers,
                overall=total([r for r in layers.values() if r["prunable"]]),
                overall_with_dense=total(list(layers.values())))
