"""How each layer class is quantization-aware trained, as data (no tfmot import here).

`compress.quantize` reads one `Spec` per layer class: its own table for stock Keras layers,
`models.layers.QUANTIZE` for the shared custom layers and `Family.quantize` of each family module
for the layers that module defines. The kinds are described in `compress.quantize`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Spec:
    """How one layer class is annotated for QAT."""

    kind: str  # default | output | weights | noop | by_layer
    why: str = ""
    weights: tuple = ()
    output: bool = True
    pick: Callable | None = None  # by_layer: layer -> Spec


DEFAULT = Spec("default", "tfmot default 8-bit registry")


def output(why: str) -> Spec:
    """Only the layer's output is fake-quantized."""
    return Spec("output", why)


def noop(why: str) -> Spec:
    """Nothing is quantized (a layer that only moves values)."""
    return Spec("noop", why)


def weights(*attrs: str, output: bool = True, why: str = "") -> Spec:
    """The named weights (and, by default, the output) are fake-quantized."""
    return Spec("weights", why, weights=tuple(attrs), output=output)


def by_layer(pick: Callable, why: str) -> Spec:
    """`pick(layer)` chooses one of the other specs for each layer."""
    return Spec("by_layer", why, pick=pick)
