"""The teacher cache (experiments/data/teacher_cache.py): built and resumed shard by shard, and
the cached training stream shows the student exactly the crop the teacher scored."""

import json

import numpy as np
import pytest
from PIL import Image

from experiments import data as ip
from experiments.data import teacher_cache as tc
from models.compat import keras, tf

CLASSES = ("a", "b", "c")
TEACHER_SIZE = 24


@pytest.fixture(autouse=True, scope="module")
def _cache_dir(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("VIT_COMPRESS_CACHE", str(tmp_path_factory.mktemp("decode")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """4 JPEGs per class of assorted sizes (one grayscale)."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (root / "train" / c).mkdir(parents=True)
        for i in range(4):
            h, w = int(rng.integers(30, 70)), int(rng.integers(30, 70))
            pixels = rng.integers(0, 256, (h, w) if c == "a" and i == 0 else (h, w, 3), np.uint8)
            Image.fromarray(pixels).save(root / "train" / c / f"{c}{i}.JPEG")
    return ip.load_source(str(root), "train")


def make_teacher():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((TEACHER_SIZE, TEACHER_SIZE, 3))
    x = keras.layers.Conv2D(6, 3, strides=2, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(len(CLASSES))(x))


SPEC = tc.ViewSpec(views=3, top_k=3, scale=(0.1, 1.0), teacher_size=TEACHER_SIZE, seed=5)


@pytest.fixture(scope="module")
def built(source, tmp_path_factory):
    path = tmp_path_factory.mktemp("cache") / "teacher_cache"
    teacher = make_teacher()
    cache = tc.build(path, source, teacher, SPEC, images_per_shard=5, batch_size=4,
                     verbose=False)
    return path, cache, teacher


def test_build_records_every_view_and_resumes_byte_identical(source, built):
    path, cache, teacher = built
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["complete"] and manifest["shards"] == 3 and manifest["num_examples"] == 12
    r = cache.records
    assert r.shape == (12,) and r["values"].shape == (12, 3, 3)
    assert tc.bytes_per_view(3) == 3 * 4 + 9 and r.itemsize == 3 * tc.bytes_per_view(3)
    # largest first, all classes (k = num_classes), boxes inside the images
    assert (np.diff(r["values"].astype(np.float32), axis=-1) <= 0).all()
    assert (np.sort(r["indices"], -1) == np.arange(3)).all()
    before = {f.name: f.read_bytes() for f in path.glob("shard_*.npy")}
    (path / "shard_00001.npy").unlink()
    again = tc.build(path, source, lambda: teacher, SPEC, images_per_shard=5, batch_size=4,
                     verbose=False)
    assert {f.name: f.read_bytes() for f in path.glob("shard_*.npy")} == before
    assert not list(path.glob(".*tmp*"))  # written under temporary names, then renamed
    np.testing.assert_array_equal(again.records, r)

    def no_teacher():
        raise AssertionError("a complete cache must not load the teacher")

    # nor a stage running in another precision (the prune stage's float32 after a bf16 distill)
    tc.build(path, source, no_teacher, SPEC, images_per_shard=5, batch_size=4,
             precision="mixed_bfloat16", verbose=False)


def test_other_settings_rebuild_the_cache(source, built, tmp_path):
    path, _, teacher = built
    other = tc.build(tmp_path / "c", source, teacher, SPEC, images_per_shard=5, verbose=False)
    fewer = tc.build(tmp_path / "c", source, teacher,
                     tc.ViewSpec(**{**SPEC.__dict__, "views": 2}), images_per_shard=5,
                     verbose=False)
    assert other.views == 3 and fewer.views == 2 and fewer.records["values"].shape == (12, 2, 3)
    np.testing.assert_array_equal(fewer.records["boxes"], other.records["boxes"][:, :2])


def test_cached_stream_shows_the_recorded_crop_and_cycles_views(source, built):
    """Each example of the stream is matched to its (image, view) by its teacher logits; its
    image must equal that recorded crop at the step's size, the teacher recomputed on the same
    crop at its own size must give the cached logits, and V epochs show every view once."""
    _, cache, teacher = built
    sampler = ip.MultiScaleSampler.fixed(32, 6)
    ds = ip.train_dataset(source, sampler, teacher_cache=cache, seed=1)
    r = cache.records
    flat = r["values"].astype(np.float32).reshape(-1, 3)
    flat_idx = r["indices"].reshape(-1, 3)
    seen = []
    for images, labels, (values, indices) in ds.take(6).as_numpy_iterator():  # 3 epochs of 12
        assert images.shape == (6, 32, 32, 3)
        for img, label, val, ind in zip(images, labels, values, indices):
            hit = int(np.argmin(np.abs(flat - val).sum(1) + 1e3 * (flat_idx != ind).any(1)))
            i, v = divmod(hit, cache.views)
            assert label == source.labels[i]
            image, _ = source.decode(i)
            want = tc.crop_view(image, r["boxes"][i, v], r["flip"][i, v], 32).numpy()
            np.testing.assert_array_equal(img, want)
            view = tc.crop_view(image, r["boxes"][i, v], r["flip"][i, v], TEACHER_SIZE)
            logits = teacher(view[None], training=False).numpy()[0]
            np.testing.assert_allclose(val, logits[ind], rtol=2e-3, atol=2e-3)  # float16
            seen.append((i, v))
    assert sorted(seen) == [(i, v) for i in range(12) for v in range(3)]
    assert r["flip"].any() and not r["flip"].all()


def test_cached_stream_refuses_randaugment_and_mixup(source, built):
    _, cache, _ = built
    sampler = ip.MultiScaleSampler.fixed(32, 6)
    for augment in (ip.Augment(randaugment=2), ip.Augment(mixup_alpha=0.8)):
        with pytest.raises(ValueError, match="cannot be combined"):
            ip.train_dataset(source, sampler, teacher_cache=cache, augment=augment)
