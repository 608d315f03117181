"""Input pipeline: image sources, MobileViT's multi-scale variable-batch sampler, tf.data streams.

Sources (`load_source`): a folder with `train/` and `val/` class subfolders (the layout of
Imagenette, `train/<wnid>/*.JPEG`) or `tfds:<name>` (TensorFlow Datasets, prepared locally: there
is no download here). Every file is decoded once at load time (`verify=True`); files that do not
decode are skipped, listed in `Source.skipped` and logged, never fatal. Images always decode to
3 channels.

Multi-scale sampler (`MultiScaleSampler`): the variable-batch sampler of MobileViT (Mehta &
Rastegari, "MobileViT", arXiv:2110.02178; ml-cvnets `data/sampler/variable_batch_sampler.py`).
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
  NumPy and TensorFlow) instead of `random.choice` after `random.seed(epoch)`, so the sampler's
  whole state is the step: a run resumed at step `s` sees exactly the batches (resolutions,
  images, augmentation) of an uninterrupted run. Examples are read in epochs (a stateless
  permutation per epoch, without replacement), as one stream that does not restart at epoch
  boundaries (ml-cvnets pads the last batch of an epoch with the first indices).
- Random resized crop: `tf.image.stateless_sample_distorted_bounding_box` (Inception crop,
  scale (0.08, 1), ratio (3/4, 4/3)), falling back to the whole image after 10 failed attempts
  (torchvision falls back to a centre crop); bilinear resize without antialiasing.
- RandAugment-lite (`Augment(randaugment=N)`): only photometric ops (auto-contrast, brightness,
  colour, contrast, solarize, posterize, identity), no geometric ones.
- Mixup/CutMix (`Augment(mixup_alpha=..., cutmix_alpha=...)`) are batch-level, timm style (mix
  with the reversed batch; one of the two per batch, chosen with `switch_prob`). When either is on,
  the labels of *every* batch are soft one-hot float32 [b, num_classes] (batches left unmixed by
  `mix_prob` carry plain one-hot labels); otherwise labels are int32 [b]. Label smoothing is left
  to the loss.

Evaluation (`eval_dataset`) resizes the shorter side to `floor(size / crop_pct)` (bilinear,
antialiased) and centre-crops `size`, as timm/ml-cvnets.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import pathlib
from typing import Sequence

import numpy as np

from models.compat import tf

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
AUTOTUNE = tf.data.AUTOTUNE
_M32 = 0xFFFFFFFF
_HASH_MUL = 0x45D9F3B  # < 2**27: products of 32-bit values stay below 2**59 in int64


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


class Source:
    """A labelled image split held as file paths (folders) or encoded bytes (tfds).

    Attributes: `name`, `split`, `class_names`, `num_classes`, `num_examples`, `labels` (int32
    array), `skipped` (files or example ids that did not decode), `num_skipped`.
    """

    def __init__(self, *, name, split, class_names, labels, paths=None, encoded=None, ids=None):
        if (paths is None) == (encoded is None):
            raise ValueError("give exactly one of paths / encoded")
        self.name = name
        self.split = split
        self.class_names = list(class_names)
        self.labels = np.asarray(labels, np.int32)
        self.paths = None if paths is None else list(paths)
        self._encoded = None if encoded is None else list(encoded)
        if ids is None:
            ids = paths if paths is not None else range(len(self.labels))
        self.ids = list(ids)
        self.skipped: list[str] = []
        self._tensor = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_examples(self) -> int:
        return len(self.labels)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def __repr__(self):
        return (f"Source({self.name!r}, split={self.split!r}, examples={self.num_examples}, "
                f"classes={self.num_classes}, skipped={self.num_skipped})")

    # -- graph-side access by index ------------------------------------------------------------
    def _table(self):
        if self._tensor is None:
            data = self.paths if self.paths is not None else self._encoded
            with tf.init_scope():  # eager tensors, captured by every tf.data function
                self._tensor = (tf.constant(data, tf.string), tf.constant(self.labels, tf.int32))
        return self._tensor

    def read(self, index):
        """Encoded bytes and label of example `index` (a scalar int tensor), inside tf.data."""
        data, labels = self._table()
        raw = tf.gather(data, index)
        if self.paths is not None:
            raw = tf.io.read_file(raw)
        return raw, tf.gather(labels, index)

    def decode(self, index):
        """Decoded uint8 image [H, W, 3] and int32 label of example `index`."""
        raw, label = self.read(index)
        return decode_image(raw), label

    def as_dataset(self, *, shuffle: bool = False, seed: int = 0) -> tf.data.Dataset:
        """Finite dataset of (uint8 image [H, W, 3], int32 label), in file order or shuffled."""
        order = np.arange(self.num_examples)
        if shuffle:
            order = np.random.default_rng(seed).permutation(order)
        ds = tf.data.Dataset.from_tensor_slices(order.astype(np.int64))
        return ds.map(self.decode, num_parallel_calls=AUTOTUNE)

    def balanced_order(self) -> np.ndarray:
        """Indices interleaved class by class (round-robin): any prefix is class balanced."""
        per_class = [np.flatnonzero(self.labels == c) for c in range(self.num_classes)]
        out, depth = [], max((len(p) for p in per_class), default=0)
        for i in range(depth):
            out.extend(p[i] for p in per_class if i < len(p))
        return np.asarray(out, np.int64)

    # -- subsets and verification -----------------------------------------------------------
    def _keep(self, keep: np.ndarray):
        keep = np.asarray(keep, np.int64)
        self.labels = self.labels[keep]
        self.ids = [self.ids[i] for i in keep]
        if self.paths is not None:
            self.paths = [self.paths[i] for i in keep]
        else:
            self._encoded = [self._encoded[i] for i in keep]
        self._tensor = None

    def limit(self, *, limit_per_class: int | None = None, limit: int | None = None):
        """Keeps the first `limit_per_class` files of each class, then a class-balanced `limit`."""
        if limit_per_class is not None:
            if limit_per_class < 1:
                raise ValueError(f"limit_per_class must be >= 1, got {limit_per_class}")
            keep = np.concatenate([np.flatnonzero(self.labels == c)[:limit_per_class]
                                   for c in range(self.num_classes)])
            self._keep(np.sort(keep))
        if limit is not None:
            if limit < 1:
                raise ValueError(f"limit must be >= 1, got {limit}")
            self._keep(np.sort(self.balanced_order()[:limit]))
        return self

    def verify(self):
        """Decodes every example once; drops (and logs) the ones that fail. Returns the count.

        The result is remembered (keyed by the example ids and, for files, their sizes and
        modification times) for the process and on disk under `$VIT_COMPRESS_CACHE` (default
        `~/.cache/vit_compress`; set it to an empty string to turn the disk cache off), so later
        loads of the same split skip the decode pass (about 10-20 s for Imagenette's train split
        on 2 cores).
        """
        n = self.num_examples
        memo_key = (self.name, self.split, tuple(self.ids), tuple(_stat(p) for p in self.paths)
                    if self.paths is not None else None)
        if memo_key not in _VERIFIED:
            _VERIFIED[memo_key] = _disk_memo(memo_key, self._decode_check)
        bad = _VERIFIED[memo_key]
        if len(bad):
            self.skipped.extend(str(self.ids[i]) for i in bad)
            log.warning("%s/%s: skipped %d undecodable file(s): %s", self.name, self.split,
                        len(bad), ", ".join(str(self.ids[i]) for i in bad[:10])
                        + (" ..." if len(bad) > 10 else ""))
            self._keep(np.setdiff1d(np.arange(n), bad))
        if self.num_examples == 0:
            raise ValueError(f"{self.name} split {self.split!r}: no decodable images "
                             f"({len(bad)} file(s) failed to decode)")
        return len(bad)

    def _decode_check(self) -> np.ndarray:
        n = self.num_examples

        def check(i):
            image, _ = self.decode(i)
            return i, tf.shape(image)[0]

        ds = tf.data.Dataset.range(n).map(check, num_parallel_calls=AUTOTUNE)
        ds = ds.ignore_errors()
        good = np.fromiter((int(i) for i, _ in ds.as_numpy_iterator()), np.int64)
        return np.setdiff1d(np.arange(n), good)


_VERIFIED: dict = {}


def _disk_memo(key, compute) -> np.ndarray:
    """`compute()` (an int array), cached in a JSON file named by a hash of `key`."""
    root = os.environ.get("VIT_COMPRESS_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "vit_compress"))
    if not root:
        return compute()
    digest = hashlib.sha1(repr(key).encode()).hexdigest()
    path = pathlib.Path(root) / "decode_check" / f"{digest}.json"
    try:
        return np.asarray(json.loads(path.read_text())["bad"], np.int64)
    except (OSError, ValueError, KeyError):
        pass
    bad = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"source": str(key[0]), "split": key[1],
                                   "bad": [int(i) for i in bad]}))
        os.replace(tmp, path)
    except OSError as e:
        log.info("decode-check cache not written (%s)", e)
    return bad


def _stat(path: str):
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return None


def decode_image(raw) -> tf.Tensor:
    """JPEG/PNG/BMP/GIF bytes -> uint8 [H, W, 3] (grayscale and RGBA become RGB)."""
    image = tf.io.decode_image(raw, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def load_source(data: str, split: str, *, limit_per_class: int | None = None,
                limit: int | None = None, verify: bool = True,
                data_dir: str | None = None) -> Source:
    """Opens split `split` ('train' or 'val') of `data`: a folder or `tfds:<name>`.

    `limit_per_class` keeps the first files (sorted by name) of each class and `limit` a
    class-balanced subset of that many examples; files that do not decode are replaced by the
    next ones. `verify=False` skips the decode check (an undecodable file then fails tf.data).
    Folder class names are the sorted subfolder names (label = position); tfds ones come from
    the label feature; tfds splits are read whole into memory as encoded bytes.

    Raises FileNotFoundError / ValueError naming the path or flag value when the folder or split
    is missing, a class folder is empty, there are no decodable images or the tfds name is
    unknown, and RuntimeError when a tfds dataset is not prepared and cannot be downloaded.
    """
    if not isinstance(data, str) or not data:
        raise ValueError(f"--data must be a folder or tfds:<name>, got {data!r}")
    if data.startswith("tfds:"):
        src = _load_tfds(data[len("tfds:"):], split, data_dir=data_dir)
    else:
        src = _load_folder(data, split)
    if limit_per_class is None and limit is None:
        if verify:
            src.verify()
    else:
        # Limit first (so a small subset decodes only its own files), then replace any file that
        # fails to decode by the next one of its class.
        full, bad_ids = src, []
        while True:
            src = copy.copy(full)
            src.skipped = list(bad_ids)
            if bad_ids:
                bad = set(bad_ids)
                src._keep(np.asarray([i for i, x in enumerate(full.ids) if str(x) not in bad],
                                     np.int64))
            src.limit(limit_per_class=limit_per_class, limit=limit)
            if not verify or src.verify() == 0:
                break
            bad_ids = src.skipped
    log.info("loaded %r", src)
    return src


def _class_dirs(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _load_folder(root: str, split: str) -> Source:
    root_path = pathlib.Path(root).expanduser()
    if not root_path.is_dir():
        raise FileNotFoundError(f"--data={root}: folder {root_path} does not exist")
    names = {"val": ("val", "validation"), "validation": ("val", "validation")}.get(split, (split,))
    folder = next((root_path / n for n in names if (root_path / n).is_dir()), None)
    if folder is None:
        present = _class_dirs(root_path)
        raise FileNotFoundError(f"--data={root}: split {split!r} not found (looked for "
                                f"{', '.join(str(root_path / n) for n in names)}); "
                                f"subfolders present: {present}")
    classes = _class_dirs(folder)
    if not classes:
        raise ValueError(f"--data={root}: {folder} has no class subfolders")
    train = root_path / "train"
    if folder != train and train.is_dir():
        train_classes = _class_dirs(train)
        if train_classes != classes:
            raise ValueError(f"--data={root}: classes of {folder} differ from {train}: "
                             f"only in {folder.name}: {sorted(set(classes) - set(train_classes))}, "
                             f"only in train: {sorted(set(train_classes) - set(classes))}")
    paths, labels = [], []
    for c, name in enumerate(classes):
        files = sorted(f for f in (folder / name).iterdir()
                       if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(f"--data={root}: class folder {folder / name} has no images "
                             f"(extensions {', '.join(IMAGE_EXTENSIONS)})")
        paths += [str(f) for f in files]
        labels += [c] * len(files)
    return Source(name=str(root_path), split=split, class_names=classes, labels=labels,
                  paths=paths)


def _load_tfds(name: str, split: str, *, data_dir: str | None = None) -> Source:
    import tensorflow_datasets as tfds

    flag = f"--data=tfds:{name}"
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # DatasetNotFoundError (a ValueError) and malformed names
        raise ValueError(f"{flag}: unknown TensorFlow Datasets name {name!r} "
                         f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not builder.is_prepared():
        try:
            builder.download_and_prepare()
        except Exception as e:
            raise RuntimeError(
                f"{flag}: the dataset is not prepared in {builder.data_dir} and could not be "
                f"downloaded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
                "Prepare it on a machine with internet and copy it, or set TFDS_DATA_DIR."
            ) from None
    available = list(builder.info.splits.keys())
    tfds_split = _map_split(split, available, flag)
    keys = builder.info.supervised_keys
    if not keys or len(keys) != 2:
        raise ValueError(f"{flag}: the dataset has no (image, label) supervised keys: {keys}")
    image_key, label_key = keys
    label_feature = builder.info.features[label_key]
    class_names = list(getattr(label_feature, "names", None) or
                       [str(i) for i in range(label_feature.num_classes)])
    ds = builder.as_dataset(split=tfds_split, shuffle_files=False,
                            decoders={image_key: tfds.decode.SkipDecoding()})
    encoded, labels = [], []
    for ex in ds.as_numpy_iterator():
        encoded.append(ex[image_key])
        labels.append(int(ex[label_key]))
    if not encoded:
        raise ValueError(f"{flag}: split {tfds_split!r} is empty")
    return Source(name=f"tfds:{name}", split=split, class_names=class_names, labels=labels,
                  encoded=encoded, ids=[f"{tfds_split}[{i}]" for i in range(len(labels))])


def _map_split(split: str, available: Sequence[str], flag: str) -> str:
    if not available:  # not known (e.g. under tfds.testing.mock_data): use the usual names
        return {"val": "validation"}.get(split, split)
    if split in available:
        return split
    if split in ("val", "validation"):
        for name in ("validation", "val", "test"):
            if name in available:
                return name
    raise ValueError(f"{flag}: split {split!r} not found; the dataset has {sorted(available)}")


# ---------------------------------------------------------------------------------------------
# Multi-scale variable-batch sampler
# ---------------------------------------------------------------------------------------------


def make_divisible(v: float, divisor: int, min_value: int | None = None) -> int:
    """Rounds `v` to the nearest multiple of `divisor`, not below 90% of `v` (ml-cvnets)."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return int(new_v)


def _mix32(x):
    """A 32-bit integer hash (xor-shift-multiply); works on Python/NumPy ints and int64 tensors."""
    if isinstance(x, tf.Tensor):
        for _ in range(2):
            x = tf.bitwise.bitwise_and(
                tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16)) * _HASH_MUL, _M32)
        return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))
    for _ in range(2):
        x = ((x ^ (x >> 16)) * _HASH_MUL) & _M32
    return x ^ (x >> 16)


def _step_hash_np(seed: int, steps) -> np.ndarray:
    s = np.int64(_mix32(int(seed) & _M32))
    return _mix32((s ^ (np.asarray(steps, np.int64) & _M32)) & _M32)


def _step_hash_tf(seed: int, step):
    s = tf.constant(_mix32(int(seed) & _M32), tf.int64)
    step = tf.bitwise.bitwise_and(tf.cast(step, tf.int64), _M32)
    return _mix32(tf.bitwise.bitwise_and(tf.bitwise.bitwise_xor(s, step), _M32))


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


# ---------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Augment:
    """Training augmentation. Defaults: Inception crop + horizontal flip, nothing else.

    `randaugment`: number of RandAugment-lite ops per image (0 = off) at `randaugment_magnitude`
    (0..10). `mixup_alpha` / `cutmix_alpha` > 0 turn batch mixing on (labels become soft one-hot
    float32 [b, num_classes] for every batch); `mix_prob` is the chance a batch is mixed and
    `switch_prob` the chance of CutMix when both are on.
    """

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    randaugment: int = 0
    randaugment_magnitude: float = 9.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5

    @property
    def mixes(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def get_config(self) -> dict:
        return dataclasses.asdict(self)


def _random_resized_crop(image, size, key, scale, ratio):
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=key,
        min_object_covered=0.0, aspect_ratio_range=list(ratio), area_range=list(scale),
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    crop = tf.slice(image, begin, crop_size)
    return tf.image.resize(crop, tf.stack([size, size]), method="bilinear")  # float32 0..255


def _centre_crop(image, size, crop_pct):
    """Shorter side to floor(size / crop_pct), then the central size x size; float32 0..255."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    short = tf.math.floor(tf.cast(size, tf.float32) / crop_pct)
    scale = short / tf.reduce_min(shape)
    new = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), size)
    image = tf.cond(scale < 1.0,  # antialiasing only matters (and costs) when shrinking
                    lambda: tf.image.resize(image, new, method="bilinear", antialias=True),
                    lambda: tf.image.resize(image, new, method="bilinear"))
    top, left = (new[0] - size) // 2, (new[1] - size) // 2
    return image[top:top + size, left:left + size, :]


def _blend(a, b, factor):
    return tf.clip_by_value(b + factor * (a - b), 0.0, 1.0)  # factor 1 -> a, 0 -> b


def _gray(image):
    return tf.image.rgb_to_grayscale(image)


def _randaugment(image, key, num_ops, magnitude):
    """RandAugment-lite on a float [H, W, 3] image in [0, 1]: photometric ops only."""
    m = magnitude / 10.0

    def signed(k):
        sign = tf.where(tf.random.stateless_uniform([], k) < 0.5, -1.0, 1.0)
        return 1.0 + sign * 0.9 * m  # PIL ImageEnhance factor, as timm

    def ops(img, k):
        return [
            lambda: img,
            lambda: _autocontrast(img),
            lambda: _blend(img, tf.zeros_like(img), signed(k)),  # brightness
            lambda: _blend(img, tf.broadcast_to(_gray(img), tf.shape(img)), signed(k)),  # colour
            lambda: _blend(img, tf.fill(tf.shape(img), tf.reduce_mean(_gray(img))), signed(k)),
            lambda: tf.where(img >= 1.0 - m, 1.0 - img, img),  # solarize (threshold 256 - 256m)
            lambda: _posterize(img, 8 - int(round(4 * m))),
        ]

    n_ops = len(ops(image, key))
    keys = tf.random.experimental.stateless_split(key, num=2 * num_ops)
    for i in range(num_ops):
        choice = tf.random.stateless_uniform([], keys[2 * i], 0, n_ops, dtype=tf.int32)
        image = tf.switch_case(choice, ops(image, keys[2 * i + 1]))
        image.set_shape([None, None, 3])
    return image


def _autocontrast(img):
    lo = tf.reduce_min(img, axis=[0, 1], keepdims=True)
    hi = tf.reduce_max(img, axis=[0, 1], keepdims=True)
    scale = tf.where(hi > lo, 1.0 / tf.maximum(hi - lo, 1e-6), 1.0)
    return tf.where(hi > lo, (img - lo) * scale, img)


def _posterize(img, bits):
    levels = float(2 ** max(bits, 1))
    return tf.floor(img * 255.0 / (256.0 / levels)) * (256.0 / levels) / 255.0


def _beta(key, alpha):
    k1, k2 = tf.unstack(tf.random.experimental.stateless_split(key, num=2))
    g1 = tf.random.stateless_gamma([], k1, alpha)
    g2 = tf.random.stateless_gamma([], k2, alpha)
    return g1 / tf.maximum(g1 + g2, 1e-12)


def _mix_batch(images, labels, key, aug: Augment, num_classes: int):
    """Mixup or CutMix with the reversed batch; labels -> soft one-hot [b, num_classes]."""
    onehot = tf.one_hot(labels, num_classes, dtype=tf.float32)
    keys = tf.random.experimental.stateless_split(key, num=5)
    apply = tf.random.stateless_uniform([], keys[0]) < aug.mix_prob
    if aug.mixup_alpha > 0 and aug.cutmix_alpha > 0:
        use_cutmix = tf.random.stateless_uniform([], keys[1]) < aug.switch_prob
    else:
        use_cutmix = tf.constant(aug.cutmix_alpha > 0)
    other = tf.reverse(images, [0])

    def mixup():
        lam = _beta(keys[2], aug.mixup_alpha) if aug.mixup_alpha > 0 else tf.constant(1.0)
        return images * lam + other * (1.0 - lam), lam

    def cutmix():
        lam = _beta(keys[3], aug.cutmix_alpha) if aug.cutmix_alpha > 0 else tf.constant(1.0)
        h, w = tf.shape(images)[1], tf.shape(images)[2]
        cut = tf.sqrt(1.0 - lam)
        ch = tf.cast(tf.cast(h, tf.float32) * cut, tf.int32)
        cw = tf.cast(tf.cast(w, tf.float32) * cut, tf.int32)
        centre = tf.random.stateless_uniform([2], keys[4], 0, 1 << 30, dtype=tf.int32)
        cy, cx = centre[0] % h, centre[1] % w
        y0, y1 = tf.clip_by_value(cy - ch // 2, 0, h), tf.clip_by_value(cy + ch // 2, 0, h)
        x0, x1 = tf.clip_by_value(cx - cw // 2, 0, w), tf.clip_by_value(cx + cw // 2, 0, w)
        ys, xs = tf.range(h)[:, None], tf.range(w)[None, :]
        box = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
        mixed = tf.where(box[None, :, :, None], other, images)
        area = tf.cast((y1 - y0) * (x1 - x0), tf.float32)
        return mixed, 1.0 - area / tf.cast(h * w, tf.float32)

    mixed, lam = tf.cond(use_cutmix, cutmix, mixup)
    lam = tf.where(apply, lam, 1.0)
    images = tf.where(apply, mixed, images)
    return images, lam * onehot + (1.0 - lam) * tf.reverse(onehot, [0])


# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------


def _seed_pair(seed: int, salt: int):
    return tf.constant([_mix32((int(seed) ^ salt) & _M32), salt], tf.int64)


def train_dataset(source: Source, sampler: MultiScaleSampler, *, start_step: int = 0,
                  augment: Augment | None = Augment(), seed: int = 0) -> tf.data.Dataset:
    """Infinite stream of batches `(images float32 [b, s, s, 3] in [0, 1], labels)`.

    `(s, b) = sampler.plan(step)` for step = start_step, start_step + 1, ...; labels are int32
    [b], or float32 [b, num_classes] when `augment` mixes. `augment=None`: no augmentation (the
    eval resize + centre crop at each step's size). The spatial dims of `element_spec` are None:
    give a training `tf.function` an input_signature with None dims to avoid one trace per size. Examples are read in stateless
    per-epoch permutations of `seed`, and each image's crop/flip/RandAugment draws depend only
    on (seed, step, position in batch), so the stream from `start_step=s` equals the tail of the
    stream from 0, whatever the parallelism.
    """
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
        return tf.fill([b], step), tf.fill([b], k), pos, index

    def load(step, k, pos, index):
        image, label = source.decode(index)
        size = sizes[k]
        key = tf.random.experimental.stateless_fold_in(
            tf.random.experimental.stateless_fold_in(aug_seed, step), pos)
        if augment is None:
            image = _centre_crop(image, size, 0.875) / 255.0
        else:
            k_crop, k_flip, k_ra = tf.unstack(tf.random.experimental.stateless_split(key, 3))
            image = _random_resized_crop(image, size, k_crop, augment.scale, augment.ratio)
            image = tf.clip_by_value(image / 255.0, 0.0, 1.0)
            if augment.hflip:
                image = tf.image.stateless_random_flip_left_right(image, k_flip)
            if augment.randaugment > 0:
                image = _randaugment(image, k_ra, augment.randaugment,
                                     augment.randaugment_magnitude)
        image.set_shape([None, None, 3])
        return step, k, image, label

    ds = tf.data.Dataset.counter(int(start_step), dtype=tf.int64)
    ds = ds.scan(tf.constant(sampler.examples_before(int(start_step)), tf.int64), plan)
    ds = ds.map(expand).unbatch()
    ds = ds.map(load, num_parallel_calls=AUTOTUNE, deterministic=True)
    # The b examples of a step are consecutive and share the scale index k, so each window of
    # key k fills exactly at the step's last example: batches come out whole and in step order.
    ds = ds.group_by_window(
        key_func=lambda step, k, image, label: k,
        reduce_func=lambda k, window: window.batch(batches[k]),
        window_size_func=lambda k: batches[k])

    def finish(step, k, images, labels):
        if augment is not None and augment.mixes:
            key = tf.random.experimental.stateless_fold_in(mix_seed, step[0])
            return _mix_batch(images, labels, key, augment, source.num_classes)
        return images, labels

    ds = ds.map(finish, num_parallel_calls=AUTOTUNE, deterministic=True)
    return ds.prefetch(AUTOTUNE)


def eval_dataset(source: Source, *, size: int, batch_size: int, limit: int | None = None,
                 crop_pct: float = 0.875, drop_remainder: bool = False) -> tf.data.Dataset:
    """Finite, deterministic `(float32 [b, size, size, 3] in [0, 1], int32 [b])`.

    The shorter side is resized to floor(size / crop_pct), then the centre `size` crop is taken.
    `limit` keeps a class-balanced prefix (round-robin over classes) of that many examples.
    """
    order = np.arange(source.num_examples, dtype=np.int64)
    if limit is not None:
        order = np.sort(source.balanced_order()[:limit])

    def load(index):
        image, label = source.decode(index)
        image = _centre_crop(image, size, crop_pct) / 255.0
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
        return tf.clip_by_value(_centre_crop(image, size, crop_pct) / 255.0, 0.0, 1.0)

    ds = tf.data.Dataset.from_tensor_slices(order.astype(np.int64))
    ds = ds.map(load, num_parallel_calls=AUTOTUNE, deterministic=True).batch(max(1, min(n, 64)))
    return np.concatenate(list(ds.as_numpy_iterator()), axis=0).astype(np.float32)
