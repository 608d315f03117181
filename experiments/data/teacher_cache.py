"""The teacher's outputs computed once: a fixed set of augmented views per training image with
the teacher's top-k logits on each (FKD, Shen & Xing, arXiv:2112.01528), so students train from
the store without running the teacher.

A view is an Inception crop box (pixel rows/columns of the decoded image: y0, x0, h, w) and a
flip bit, drawn from (seed, image, view) alone (`view_params`). The teacher saw the box resized
to its input size (`crop_view`); a student step shows the same box, flipped the same way,
resized to the step's sampler resolution, so student and teacher always look at the same crop
("consistent" views, Beyer et al., arXiv:2106.05237). Boxes are stored in pixels, not relative
coordinates, so the student's crop is exactly the teacher's (no rounding in between).

Layout under the cache folder (`workdir/distill/teacher_cache/` in the pipeline):

    manifest.json         what the cache was built from (source, teacher weights, views, top-k,
                          seed, crop ranges, teacher size, precision), whether it is complete
                          and each shard's checksum (SHA-1 of its file, recorded as it is written)
    shard_00000.npy ...   `images_per_shard` images each: one structured NumPy array with fields
                          values float16 [V, k]   the teacher's top-k logits, largest first
                          indices uint16 [V, k]   their classes
                          boxes uint16 [V, 4]     y0, x0, h, w in pixels of the decoded image
                          flip uint8 [V]          1: mirrored left-right

Storage: `4k + 9` bytes per image and view (k = 10: 49 bytes; Imagenette's 9,469 training
images x 8 views: 3.7 MB). Each shard is written to a temporary name and renamed, so a killed
build leaves only whole shards and resumes at the first missing one; `.npy` files (unlike
`.npz` zips, which carry timestamps) make a rebuilt shard byte-identical. A manifest that does
not match the request (another teacher, view count, seed...) means the shards are stale: they
are deleted and rebuilt. A shard whose checksum is not the one recorded when it was written
(truncated, altered, copied from another cache) is named, deleted and rebuilt; `load` never
reads one.

Top-k: for Imagenette's 10 classes `top_k = num_classes` stores the exact logits. With fewer
stored classes than the teacher has, `compress.distill.logits_from_topk` gives the missing
classes a logit of -1e4, i.e. the student matches the teacher's softmax renormalised over its
top k classes (at any temperature); the teacher's argmax (hard distillation) is exact.

What cannot be cached consistently, and is refused by the pipeline: RandAugment (photometric
ops drawn per step would change the image the teacher scored) and Mixup/CutMix (the teacher's
output on a mixed image is not the mix of its outputs).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import time

import numpy as np

from experiments.data.augment import sample_crop_box
from experiments.data.sampler import M32, mix32
from experiments.data.sources import AUTOTUNE, Source
from experiments.workdir import write_json
from models.compat import tf

VERSION = 1


def shard_dtype(views: int, top_k: int) -> np.dtype:
    return np.dtype([("values", np.float16, (views, top_k)), ("indices", np.uint16, (views, top_k)),
                     ("boxes", np.uint16, (views, 4)), ("flip", np.uint8, (views,))])


def bytes_per_view(top_k: int) -> int:
    """Stored bytes per image and view (the .npy header aside)."""
    return shard_dtype(1, top_k).itemsize


@dataclasses.dataclass(frozen=True)
class ViewSpec:
    """How the views are drawn and scored: `views` per image, `top_k` logits kept, Inception
    crop `scale` (area) and `ratio` ranges, `hflip`, the `teacher_size` they are scored at."""

    views: int = 8
    top_k: int = 10
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    teacher_size: int = 224
    seed: int = 0

    def __post_init__(self):
        if self.views < 1 or self.top_k < 1 or self.teacher_size < 1:
            raise ValueError(f"teacher cache: views, top_k and teacher_size must be >= 1: {self}")


def view_params(image, index, spec: ViewSpec):
    """Boxes int32 [V, 4] (y0, x0, h, w) and flips bool [V] of image `index` (its decoded
    uint8 [H, W, 3] `image` gives the shape): a pure function of (seed, index, view)."""
    base = tf.constant([mix32((int(spec.seed) ^ 0x7C) & M32), 0x7C], tf.int64)
    key = tf.random.experimental.stateless_fold_in(base, tf.cast(index, tf.int64))
    boxes, flips = [], []
    for v in range(spec.views):
        k_crop, k_flip = tf.unstack(tf.random.experimental.stateless_split(
            tf.random.experimental.stateless_fold_in(key, v), 2))
        begin, size = sample_crop_box(tf.shape(image), k_crop, spec.scale, spec.ratio)
        boxes.append(tf.concat([begin[:2], size[:2]], 0))
        flips.append(tf.logical_and(spec.hflip, tf.random.stateless_uniform([], k_flip) < 0.5))
    return tf.stack(boxes), tf.stack(flips)


def crop_view(image, box, flip, size):
    """The view `box` (y0, x0, h, w) of a uint8 image, resized (bilinear) to size x size and
    mirrored when `flip`: float32 [size, size, 3] in [0, 1]. Teacher and student views alike."""
    box = tf.cast(box, tf.int32)
    crop = tf.slice(image, tf.stack([box[0], box[1], 0]), tf.stack([box[2], box[3], 3]))
    out = tf.image.resize(crop, tf.stack([size, size]), method="bilinear")
    out = tf.clip_by_value(out / 255.0, 0.0, 1.0)
    return tf.cond(tf.cast(flip, tf.bool), lambda: tf.reverse(out, [1]), lambda: out)


def _fingerprint_file(path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _checksum(path) -> str | None:
    """SHA-1 of a shard file; None when it is missing."""
    return _fingerprint_file(path) if os.path.exists(path) else None


def source_fingerprint(source: Source) -> str:
    h = hashlib.sha1(repr((source.name, source.split, [str(i) for i in source.ids])).encode())
    h.update(np.asarray(source.labels, np.int32).tobytes())
    return h.hexdigest()


class TeacherCache:
    """A complete cache loaded into memory (`load`), read by `experiments.data.train_dataset`
    through `view_of()` (which view an example shows) and `lookup()` (that view's record)."""

    def __init__(self, path, manifest: dict, records: np.ndarray):
        self.path = pathlib.Path(path)
        self.manifest = manifest
        self.views, self.top_k = int(manifest["views"]), int(manifest["top_k"])
        self.num_classes = int(manifest["num_classes"])
        self.records = records
        self._tensors = None

    @classmethod
    def load(cls, path) -> "TeacherCache":
        path = pathlib.Path(path)
        manifest = json.loads((path / "manifest.json").read_text())
        if not manifest.get("complete"):
            raise ValueError(f"teacher cache {path} is not complete; build it first")
        sums = manifest.get("checksums") or {}
        for s in range(manifest["shards"]):
            if sums.get(_shard_name(s)) != _checksum(path / _shard_name(s)):
                raise ValueError(f"teacher cache {path}: {_shard_name(s)} fails its checksum; "
                                 "build the cache again")
        records = np.concatenate([np.load(path / _shard_name(s))
                                  for s in range(manifest["shards"])])
        if len(records) != manifest["num_examples"]:
            raise ValueError(f"teacher cache {path}: {len(records)} records, manifest says "
                             f"{manifest['num_examples']}")
        return cls(path, manifest, records)

    def check_source(self, source: Source) -> None:
        if self.manifest["source"] != source_fingerprint(source):
            raise ValueError(f"teacher cache {self.path} was built for another training set")

    def lookup(self, index, view):
        """(box int32 [4], flip bool, values float32 [k], indices int32 [k]) inside tf.data."""
        if self._tensors is None:
            r = self.records
            with tf.init_scope():  # eager constants, captured by the tf.data functions
                self._tensors = (tf.constant(r["boxes"].astype(np.int32)),
                                 tf.constant(r["flip"].astype(bool)),
                                 tf.constant(r["values"].astype(np.float32)),
                                 tf.constant(r["indices"].astype(np.int32)))
        boxes, flips, values, indices = self._tensors
        at = tf.stack([tf.cast(index, tf.int32), tf.cast(view, tf.int32)])
        return (tf.gather_nd(boxes, at), tf.gather_nd(flips, at), tf.gather_nd(values, at),
                tf.gather_nd(indices, at))

    def view_of(self, index, epoch):
        """The view an example shows in `epoch`: each image cycles through its views in epoch
        order from a per-image offset, so V epochs show every view once (no repeats before)."""
        salt = tf.constant(mix32((int(self.manifest["seed"]) ^ 0x7D) & M32), tf.int64)
        offset = mix32(tf.bitwise.bitwise_xor(
            tf.bitwise.bitwise_and(tf.cast(index, tf.int64), M32), salt))
        return tf.math.floormod(tf.cast(epoch, tf.int64) + offset, self.views)


def _shard_name(s: int) -> str:
    return f"shard_{s:05d}.npy"


def build(path, source: Source, teacher, spec: ViewSpec, *, teacher_weights=None,
          images_per_shard: int = 1024, batch_size: int = 128, precision: str = "float32",
          verbose: bool = True) -> TeacherCache:
    """Builds (or resumes, or confirms) the cache of `teacher` on `source` under `path`.

    `teacher` maps float32 [n, s, s, 3] images in [0, 1] at `spec.teacher_size` to logits; it
    may be a zero-argument function returning that model, called only when a shard is missing
    (a complete cache is confirmed without loading the teacher). `teacher_weights` (its weights
    file) goes into the manifest's fingerprint. `batch_size`
    is the number of views per teacher call. Returns the loaded cache.
    """
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    n, views, k = source.num_examples, spec.views, spec.top_k
    if k > source.num_classes:
        raise ValueError(f"teacher cache: top_k {k} > {source.num_classes} classes")
    if source.num_classes > np.iinfo(np.uint16).max:
        raise ValueError("teacher cache: more than 65535 classes do not fit uint16 indices")
    shards = -(-n // images_per_shard)
    want = {"version": VERSION, **dataclasses.asdict(spec), "num_examples": n,
            "num_classes": source.num_classes, "images_per_shard": images_per_shard,
            "shards": shards, "source": source_fingerprint(source), "precision": precision,
            "teacher": _fingerprint_file(teacher_weights) if teacher_weights else None}
    want = json.loads(json.dumps(want))  # tuples as lists, as they read back
    mpath = path / "manifest.json"
    previous_rate, sums = None, {}
    if mpath.exists():
        have = json.loads(mpath.read_text())
        have.pop("complete", None)
        previous_rate = have.pop("build_s_per_view", None)
        sums = have.pop("checksums", None) or {}
        # the precision the teacher ran in is recorded, not checked: a later stage running in
        # float32 reads a cache that the distill stage built in bfloat16
        have_precision = have.pop("precision", None)
        if have == {k: v for k, v in want.items() if k != "precision"}:
            want["precision"] = have_precision
        else:
            previous_rate, sums = None, {}
            if verbose:
                print(f"[teacher cache] {path} was built for other settings: rebuilt", flush=True)
            for f in path.glob("shard_*.npy"):
                f.unlink()
    for s in range(shards):  # a shard is read only with the checksum recorded when written
        target = path / _shard_name(s)
        if target.exists() and sums.get(target.name) != _checksum(target):
            if verbose:
                print(f"[teacher cache] {target} fails its checksum (truncated, altered or from "
                      "another build): rebuilt", flush=True)
            target.unlink()
    sums = {k: v for k, v in sums.items() if (path / k).exists()}
    write_json(mpath, {**want, "complete": False, "checksums": sums})
    predict = None
    size = spec.teacher_size
    per_batch = max(1, batch_size // views)
    dtype = shard_dtype(views, k)
    built = seconds = 0
    for s in range(shards):
        target = path / _shard_name(s)
        if target.exists():
            continue
        t0 = time.perf_counter()
        if predict is None:
            model = teacher() if not hasattr(teacher, "predict") else teacher
            predict = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
        lo, hi = s * images_per_shard, min(n, (s + 1) * images_per_shard)

        def load(index):
            image, _ = source.decode(index)
            boxes, flips = view_params(image, index, spec)
            crops = tf.map_fn(lambda bf: crop_view(image, bf[0], bf[1], size), (boxes, flips),
                              fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))
            return crops, boxes, flips

        ds = tf.data.Dataset.range(lo, hi).map(load, num_parallel_calls=AUTOTUNE,
                                               deterministic=True)
        rec = np.zeros(hi - lo, dtype)
        at = 0
        for crops, boxes, flips in ds.batch(per_batch).prefetch(2):
            b = int(crops.shape[0])
            logits = predict(tf.reshape(crops, [b * views, size, size, 3]))
            top = tf.math.top_k(tf.cast(logits, tf.float32), k=k)
            rec["values"][at:at + b] = top.values.numpy().reshape(b, views, k)
            rec["indices"][at:at + b] = top.indices.numpy().reshape(b, views, k)
            rec["boxes"][at:at + b] = boxes.numpy()
            rec["flip"][at:at + b] = flips.numpy()
            at += b
        tmp = path / f".{target.name}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            np.save(f, rec)
        sums[target.name] = _checksum(tmp)
        os.replace(tmp, target)
        write_json(mpath, {**want, "complete": False, "checksums": sums})
        built += (hi - lo) * views
        seconds += time.perf_counter() - t0
        if verbose:
            print(f"[teacher cache] shard {s + 1}/{shards}: {hi - lo} images x {views} views "
                  f"in {time.perf_counter() - t0:.1f} s", flush=True)
    # seconds per view of this call's build (of the earlier one when nothing was left to do)
    rate = seconds / built if built else previous_rate
    write_json(mpath, {**want, "complete": True, "build_s_per_view": rate, "checksums": sums})
    return TeacherCache.load(path)
