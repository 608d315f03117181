"""MobileViT's multi-scale variable-batch sampler (Mehta & Rastegari, "MobileViT",
arXiv:2110.02178; ml-cvnets `data/sampler/variable_batch_sampler.py`).

The resolution set is `linspace(min, max, n_scales)` plus the base size, each rounded with
`make_divisible(v, check_scale)`, sorted and unique ({160, 192, 256, 288, 320} for the defaults);
the batch of each resolution keeps pixels per batch constant,
`b = max(1, int(round(base_w * base_h * b0 / (w * h), 2)))` (327/227/128/101/81 for b0 = 128).
Every step draws one (size, batch) pair uniformly, and one batch holds one resolution.

Differences from ml-cvnets:
- `base_batch` is the *global* batch at the base size; each batch is rounded down to a multiple of
  `num_replicas` (at least `num_replicas`) so `tf.distribute` splits it evenly (ml-cvnets works
  per GPU and rounds to the nearest multiple).
- The scale drawn at step `t` is a pure function of `(seed, t)` (an integer hash, identical in
  NumPy and TensorFlow: `mix32`) instead of `random.choice` after `random.seed(epoch)`, so the
  sampler's whole state is the step: a run resumed at step `s` sees exactly the batches
  (resolutions, images, augmentation) of an uninterrupted run.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from models.compat import tf

M32 = 0xFFFFFFFF
_HASH_MUL = 0x45D9F3B  # < 2**27: products of 32-bit values stay below 2**59 in int64



def make_divisible(v: float, divisor: int, min_value: int | None = None) -> int:
    """Rounds `v` to the nearest multiple of `divisor`, not below 90% of `v` (ml-cvnets)."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return int(new_v)


def mix32(x):
    """A 32-bit integer hash (xor-shift-multiply); works on Python/NumPy ints and int64 tensors."""
    if isinstance(x, tf.Tensor):
        for _ in range(2):
            x = tf.bitwise.bitwise_and(
                tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16)) * _HASH_MUL, M32)
        return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))
    for _ in range(2):
        x = ((x ^ (x >> 16)) * _HASH_MUL) & M32
    return x ^ (x >> 16)


def _step_hash_np(seed: int, steps) -> np.ndarray:
    s = np.int64(mix32(int(seed) & M32))
    return mix32((s ^ (np.asarray(steps, np.int64) & M32)) & M32)


def _step_hash_tf(seed: int, step):
    s = tf.constant(mix32(int(seed) & M32), tf.int64)
    step = tf.bitwise.bitwise_and(tf.cast(step, tf.int64), M32)
    return mix32(tf.bitwise.bitwise_and(tf.bitwise.bitwise_xor(s, step), M32))


class MultiScaleSampler:
    """(size, batch) per training step: MobileViT's variable-batch multi-scale sampler.

    `plan(step)` is a pure function of `(seed, step)`; `sizes`/`batches` list the pairs.
    `sizes=[...]` replaces the generated resolution set (batches still keep the pixel budget of
    `base_size` x `base_batch`).
    """

    def __init__(self, min_size: int = 160, max_size: int = 320, n_scales: int = 5,
                 base_size: int = 256, base_batch: int = 128, check_scale: int = 32,
                 seed: int = 0, num_replicas: int = 1, sizes: Sequence[int] | None = None):
        for k, v in dict(min_size=min_size, max_size=max_size, n_scales=n_scales,
                         base_size=base_size, base_batch=base_batch, check_scale=check_scale,
                         num_replicas=num_replicas).items():
            if int(v) < 1:
                raise ValueError(f"MultiScaleSampler: {k} must be >= 1, got {v}")
        if min_size > max_size:
            raise ValueError(f"MultiScaleSampler: min_size {min_size} > max_size {max_size}")
        self.min_size, self.max_size, self.n_scales = int(min_size), int(max_size), int(n_scales)
        self.base_size, self.base_batch = int(base_size), int(base_batch)
        self.check_scale, self.seed = int(check_scale), int(seed)
        self.num_replicas = int(num_replicas)
        self._given_sizes = None if sizes is None else [int(s) for s in sizes]
        if sizes is None:
            dims = list(np.linspace(self.min_size, self.max_size, self.n_scales))
            if self.base_size not in dims:
                dims.append(self.base_size)
            sizes = {make_divisible(d, self.check_scale) for d in dims}
        self.sizes = sorted({int(s) for s in sizes})
        if not self.sizes or min(self.sizes) < 1:
            raise ValueError(f"MultiScaleSampler: bad sizes {sizes}")
        pixels = self.base_size * self.base_size * self.base_batch
        self.batches = []
        for s in self.sizes:
            b = max(1, int(round(pixels / (s * s), 2)))
            b = max(self.num_replicas, b // self.num_replicas * self.num_replicas)
            self.batches.append(b)

    @classmethod
    def fixed(cls, size: int, batch: int, *, seed: int = 0, num_replicas: int = 1):
        """A single (size, batch) pair: the fixed-resolution baseline."""
        return cls(min_size=size, max_size=size, n_scales=1, base_size=size, base_batch=batch,
                   check_scale=1, seed=seed, num_replicas=num_replicas, sizes=[size])

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return list(zip(self.sizes, self.batches))

    def indices(self, steps) -> np.ndarray:
        """Index into `pairs` for each step (vectorised)."""
        return (_step_hash_np(self.seed, steps) % len(self.sizes)).astype(np.int64)

    def index_tf(self, step):
        return tf.math.floormod(_step_hash_tf(self.seed, step), len(self.sizes))

    def plan(self, step: int) -> tuple[int, int]:
        k = int(self.indices(np.int64(step)))
        return self.sizes[k], self.batches[k]

    def examples_before(self, step: int) -> int:
        """Number of examples consumed by steps 0 .. step-1."""
        if step <= 0:
            return 0
        total = 0
        for lo in range(0, int(step), 1 << 20):
            k = self.indices(np.arange(lo, min(int(step), lo + (1 << 20))))
            total += int(np.asarray(self.batches, np.int64)[k].sum())
        return total

    def mean_batch(self) -> float:
        return float(np.mean(self.batches))

    def get_config(self) -> dict:
        return dict(min_size=self.min_size, max_size=self.max_size, n_scales=self.n_scales,
                    base_size=self.base_size, base_batch=self.base_batch,
                    check_scale=self.check_scale, seed=self.seed, num_replicas=self.num_replicas,
                    sizes=list(self.sizes) if self._given_sizes is not None else None)

    @classmethod
    def from_config(cls, config: dict):
        return cls(**config)

    def __repr__(self):
        return f"MultiScaleSampler(pairs={self.pairs}, seed={self.seed})"

