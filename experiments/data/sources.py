"""Image sources: a folder with `train/` and `val/` class subfolders (the layout of Imagenette,
`train/<wnid>/*.JPEG`) or `tfds:<name>` (TensorFlow Datasets: prepared under TFDS_DATA_DIR, or
downloaded and prepared on first use where the machine is online).

Every file is decoded once at load time (`verify=True`); files that do not decode are skipped,
listed in `Source.skipped` and logged, never fatal. Images always decode to 3 channels.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import pathlib
from typing import Sequence

import numpy as np

from compress.io import write_json
from models.compat import tf

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
AUTOTUNE = tf.data.AUTOTUNE


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
            raise ValueError(f"--data={self.name}: split {self.split!r} has no decodable images "
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
        write_json(path, {"source": str(key[0]), "split": key[1], "bad": [int(i) for i in bad]})
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
        prepare = (f"prepare it on a machine with internet (`tfds build {name} --data_dir=DIR`), "
                   "copy DIR here and set TFDS_DATA_DIR=DIR, or pass a folder as --data")
        offline = _offline_reason()
        if offline:  # fail now, not after minutes of download retries
            raise RuntimeError(f"{flag}: the dataset is not prepared in {builder.data_dir} and "
                               f"this machine is offline ({offline}); {prepare}")
        try:
            builder.download_and_prepare()
        except Exception as e:
            raise RuntimeError(
                f"{flag}: the dataset is not prepared in {builder.data_dir} and could not be "
                f"downloaded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                f"{prepare}") from None
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
    src = Source(name=f"tfds:{name}", split=split, class_names=class_names, labels=labels,
                 encoded=encoded, ids=[f"{tfds_split}[{i}]" for i in range(len(labels))])
    src.version = str(builder.info.version)  # part of the data's identity (experiments/fingerprint)
    return src


# TFDS's own storage (dataset metadata and prepared copies): unreachable means offline.
TFDS_HOST = ("storage.googleapis.com", 443)


def _offline_reason(timeout: float = 5.0) -> str | None:
    """None when TFDS_HOST accepts a connection, else why not (one short phrase)."""
    import socket

    try:
        socket.create_connection(TFDS_HOST, timeout=timeout).close()
        return None
    except OSError as e:
        return f"cannot reach {TFDS_HOST[0]}: {e.strerror or e}"


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

