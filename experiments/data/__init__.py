"""Data for training and measurement: sources (`load_source`), MobileViT's multi-scale sampler,
augmentation, and the tf.data streams built from them.

    sources.py   folders and TFDS names -> `Source` (decode-checked, class-balanced subsets)
    sampler.py   `MultiScaleSampler`: (size, batch) per step, a pure function of (seed, step)
    augment.py   `Augment` and the crop / flip / RandAugment / Mixup-CutMix ops
    datasets.py  `train_dataset`, `eval_dataset` (`eval_indices`: which examples), `representative_images`
    teacher_cache.py  the teacher's top-k logits on recorded views, built once (`build`) and
                 read by `train_dataset(teacher_cache=...)`
"""

from experiments.data.augment import Augment
from experiments.data.datasets import (
    eval_dataset,
    eval_indices,
    representative_images,
    train_dataset,
)
from experiments.data.sampler import MultiScaleSampler, make_divisible
from experiments.data.sources import Source, decode_image, load_source

__all__ = ["Augment", "MultiScaleSampler", "Source", "decode_image", "eval_dataset",
           "eval_indices", "load_source", "make_divisible", "representative_images", "train_dataset"]
