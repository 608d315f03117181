"""tf.data streams: the multi-scale training stream, the evaluation stream, calibration images.

Examples are read in epochs (a stateless permutation per epoch, without replacement), as one
stream that does not restart at epoch boundaries (ml-cvnets pads the last batch of an epoch with
the first indices). Every random draw depends only on (seed, step, position in batch), so a run
resumed at step `s` sees exactly the batches of an uninterrupted run.
"""

from __future__ import annotations

import math

import numpy as np

from experiments.data.augment import Augment, centre_crop, mix_batch, rand_augment, random_resized_crop
from experiments.data.sampler import M32, MultiScaleSampler, mix32
from experiments.data.sources import AUTOTUNE, Source
from experiments.data.teacher_cache import TeacherCache, crop_view
from models.compat import tf



def _seed_pair(seed: int, salt: int):
    return tf.constant([mix32((int(seed) ^ salt) & M32), salt], tf.int64)


def train_dataset(source: Source, sampler: MultiScaleSampler, *, start_step: int = 0,
                  augment: Augment | None = Augment(), seed: int = 0,
                  crop_pct: float = 0.875, teacher_cache: TeacherCache | None = None,
                  num_parallel_calls: int = AUTOTUNE) -> tf.data.Dataset:
    """Infinite stream of batches `(images float32 [b, s, s, 3] in [0, 1], labels)`.

    `(s, b) = sampler.plan(step)` for step = start_step, start_step + 1, ...; labels are int32
    [b], or float32 [b, num_classes] when `augment` mixes. `augment=None`: no augmentation (the
    eval resize + centre crop of `crop_pct` at each step's size). The spatial dims of
    `element_spec` are None: give a training `tf.function` an input_signature with None dims to
    avoid one trace per size. Examples are read in stateless
    per-epoch permutations of `seed`, and each image's crop/flip/RandAugment draws depend only
    on (seed, step, position in batch), so the stream from `start_step=s` equals the tail of the
    stream from 0, whatever the parallelism. `num_parallel_calls`: images decoded and augmented
    at once (AUTOTUNE: tf.data tunes it, up to the CPU budget, by default the core count).

    `teacher_cache` (`experiments.data.teacher_cache`): each example shows one of its recorded
    views instead of a fresh random crop (the one `TeacherCache.view_of` assigns to its epoch),
    at the step's size, and batches are `(images, labels, (teacher_values float32 [b, k],
    teacher_indices int32 [b, k]))`, the teacher's top-k logits on exactly that crop. `augment`
    then plays no part in the geometry; RandAugment and Mixup/CutMix are refused (they would
    change the image the teacher scored).
    """
    if teacher_cache is not None:
        teacher_cache.check_source(source)
        if augment is not None and (augment.randaugment > 0 or augment.mixes):
            raise ValueError("a teacher cache cannot be combined with RandAugment or "
                             "Mixup/CutMix (the teacher scored the unmodified views)")
    n = source.num_examples
    if n == 0:
        raise ValueError(f"{source!r} has no examples")
    sizes = tf.constant(sampler.sizes, tf.int32)
    batches = tf.constant(sampler.batches, tf.int64)
    order_seed, aug_seed, mix_seed = (_seed_pair(seed, s) for s in (1, 2, 3))

    def permutation(epoch):
        key = tf.random.experimental.stateless_fold_in(order_seed, epoch)
        return tf.argsort(tf.random.stateless_uniform([n], key), stable=True)

    def plan(state, step):
        k = sampler.index_tf(step)
        return state + batches[k], (step, k, state)

    def expand(step, k, offset):
        """One step -> its b examples: (step, scale index, position in batch, example index)."""
        b = batches[k]
        e_lo, e_hi = offset // n, (offset + b - 1) // n
        perms = tf.map_fn(permutation, tf.range(e_lo, e_hi + 1),
                          fn_output_signature=tf.TensorSpec([n], tf.int32))
        pos = tf.range(b)
        index = tf.gather(tf.reshape(perms, [-1]), offset - e_lo * n + pos)
        epoch = (offset + tf.cast(pos, tf.int64)) // n
        return tf.fill([b], step), tf.fill([b], k), pos, index, epoch

    def load(step, k, pos, index, epoch):
        image, label = source.decode(index)
        size = sizes[k]
        key = tf.random.experimental.stateless_fold_in(
            tf.random.experimental.stateless_fold_in(aug_seed, step), pos)
        if teacher_cache is not None:
            box, flip, values, indices = teacher_cache.lookup(
                index, teacher_cache.view_of(index, epoch))
            image = crop_view(image, box, flip, size)
            image.set_shape([None, None, 3])
            return step, k, image, label, (values, indices)
        if augment is None:
            image = centre_crop(image, size, crop_pct) / 255.0
        else:
            k_crop, k_flip, k_ra = tf.unstack(tf.random.experimental.stateless_split(key, 3))
            image = random_resized_crop(image, size, k_crop, augment.scale, augment.ratio)
            image = tf.clip_by_value(image / 255.0, 0.0, 1.0)
            if augment.hflip:
                image = tf.image.stateless_random_flip_left_right(image, k_flip)
            if augment.randaugment > 0:
                image = rand_augment(image, k_ra, augment.randaugment,
                                      augment.randaugment_magnitude)
        image.set_shape([None, None, 3])
        return step, k, image, label

    ds = tf.data.Dataset.counter(int(start_step), dtype=tf.int64)
    ds = ds.scan(tf.constant(sampler.examples_before(int(start_step)), tf.int64), plan)
    ds = ds.map(expand).unbatch()
    ds = ds.map(load, num_parallel_calls=num_parallel_calls, deterministic=True)
    # The b examples of a step are consecutive and share the scale index k, so each window of
    # key k fills exactly at the step's last example: batches come out whole and in step order.
    ds = ds.group_by_window(
        key_func=lambda step, k, *example: k,
        reduce_func=lambda k, window: window.batch(batches[k]),
        window_size_func=lambda k: batches[k])

    def finish(step, k, images, labels, *teacher):
        if teacher:
            return images, labels, teacher[0]
        if augment is not None and augment.mixes:
            key = tf.random.experimental.stateless_fold_in(mix_seed, step[0])
            return mix_batch(images, labels, key, augment, source.num_classes)
        return images, labels

    ds = ds.map(finish, num_parallel_calls=AUTOTUNE, deterministic=True)
    return ds.prefetch(AUTOTUNE)


def eval_indices(source: Source, limit: int | None = None) -> np.ndarray:
    """The examples `eval_dataset(source, limit=limit)` yields, as indexes into the source in
    that order: all of them, or a class-balanced prefix (round-robin over classes) of `limit`."""
    if limit is None:
        return np.arange(source.num_examples, dtype=np.int64)
    return np.sort(source.balanced_order()[:limit]).astype(np.int64)


def eval_dataset(source: Source, *, size: int, batch_size: int, limit: int | None = None,
                 crop_pct: float = 0.875, drop_remainder: bool = False) -> tf.data.Dataset:
    """Finite, deterministic `(float32 [b, size, size, 3] in [0, 1], int32 [b])`.

    The shorter side is resized to floor(size / crop_pct), then the centre `size` crop is taken.
    `limit` keeps a class-balanced prefix (round-robin over classes) of that many examples.
    """
    order = eval_indices(source, limit)

    def load(index):
        image, label = source.decode(index)
        image = centre_crop(image, size, crop_pct) / 255.0
        image = tf.clip_by_value(image, 0.0, 1.0)
        image.set_shape([size, size, 3])
        return image, label

    ds = tf.data.Dataset.from_tensor_slices(order)
    ds = ds.map(load, num_parallel_calls=AUTOTUNE, deterministic=True)
    return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(AUTOTUNE)


def representative_images(source: Source, size: int, n: int, *, seed: int = 0,
                          crop_pct: float = 0.875) -> np.ndarray:
    """`n` eval-preprocessed images (float32 [n, size, size, 3] in [0, 1]) for int8 calibration.

    A seeded random subset of the source (all of it, repeated if `n` > num_examples).
    """
    if n < 1:
        raise ValueError(f"representative_images: n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    reps = math.ceil(n / source.num_examples)
    order = np.concatenate([rng.permutation(source.num_examples) for _ in range(reps)])[:n]

    def load(index):
        image, _ = source.decode(index)
        return tf.clip_by_value(centre_crop(image, size, crop_pct) / 255.0, 0.0, 1.0)

    ds = tf.data.Dataset.from_tensor_slices(order.astype(np.int64))
    ds = ds.map(load, num_parallel_calls=AUTOTUNE, deterministic=True).batch(max(1, min(n, 64)))
    return np.concatenate(list(ds.as_numpy_iterator()), axis=0).astype(np.float32)
