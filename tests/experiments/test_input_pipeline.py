"""Input pipeline: sources, MobileViT multi-scale sampler, train/eval streams.

Most tests use a tiny JPEG folder written here (3 classes, a grayscale image, a corrupt file);
a few read real Imagenette files through IMAGENETTE_DIR with `limit_per_class`.
"""

import logging
import pathlib

import numpy as np
import pytest
from PIL import Image

from experiments import data as ip
from experiments.data import augment, sources
from models.compat import tf
from tests.helpers import require_module

CLASSES = ("cat", "dog", "fish")
# A small sampler for the tiny folder: sizes {32, 64, 96}, batches keep 64*64*4 pixels.
SMALL = dict(min_size=32, max_size=96, n_scales=3, base_size=64, base_batch=4, check_scale=32)


def _write_jpeg(path, rng, gray=False, size=None):
    h, w = size or (int(rng.integers(40, 90)), int(rng.integers(40, 90)))
    if gray:
        Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), mode="L").save(path)
    else:
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


@pytest.fixture(autouse=True, scope="module")
def _cache_dir(tmp_path_factory):
    """Keeps the decode-check disk cache of these tests out of the home directory."""
    mp = pytest.MonkeyPatch()
    mp.setenv("VIT_COMPRESS_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """train: 4 JPEGs per class (one grayscale, one corrupt extra in 'dog'); val: 2 per class."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for c in CLASSES:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                gray = split == "train" and c == "cat" and i == 0
                _write_jpeg(d / f"{c}_{i}.JPEG", rng, gray=gray)
    good = (root / "train" / "dog" / "dog_0.JPEG").read_bytes()
    (root / "train" / "dog" / "broken.JPEG").write_bytes(good[: len(good) // 3])
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def train_src(folder):
    return ip.load_source(str(folder), "train")


def _batches(ds, n):
    return [(x.numpy(), y.numpy()) for x, y in ds.take(n)]


# --- sampler ----------------------------------------------------------------------------------


def test_resolution_set_and_batches_match_ml_cvnets():
    s = ip.MultiScaleSampler()
    # MobileViT's sampler: computed with the ml-cvnets functions (base 256 x 128).
    assert s.sizes == [160, 192, 256, 288, 320]
    assert s.batches == [327, 227, 128, 101, 81]
    assert ip.MultiScaleSampler(base_batch=64).batches == [163, 113, 64, 50, 40]
    assert all(size % 32 == 0 for size in s.sizes)


def test_make_divisible_matches_reference_rule():
    assert [ip.make_divisible(v, 32) for v in (160, 200, 240, 280, 320, 256)] == [
        160, 192, 256, 288, 320, 256]
    assert ip.make_divisible(8, 32) == 32  # never below the divisor
    assert ip.make_divisible(47, 32) == 64  # 32 would be < 90% of 47


@pytest.mark.parametrize("base_batch", [128, 64, 37])
def test_pixel_budget_is_constant(base_batch):
    s = ip.MultiScaleSampler(base_batch=base_batch)
    budget = 256 * 256 * base_batch
    for size, b in s.pairs:
        # one image of rounding at most
        assert abs(b * size * size - budget) <= size * size, (size, b)


@pytest.mark.parametrize("replicas", [2, 3, 8])
def test_batches_divide_across_replicas(replicas):
    plain = ip.MultiScaleSampler()
    s = ip.MultiScaleSampler(num_replicas=replicas)
    for b, b1 in zip(s.batches, plain.batches):
        assert b % replicas == 0 and b >= replicas
        assert b1 - replicas < b <= b1  # rounded down, by less than one replica's share
    tiny = ip.MultiScaleSampler(base_batch=2, num_replicas=8)
    assert all(b == 8 for b in tiny.batches)  # at least one image per replica


def test_fixed_sampler_and_config_round_trip():
    f = ip.MultiScaleSampler.fixed(224, 64, num_replicas=8)
    assert f.pairs == [(224, 64)]
    assert {f.plan(t) for t in range(50)} == {(224, 64)}
    s = ip.MultiScaleSampler(seed=5, num_replicas=2)
    s2 = ip.MultiScaleSampler.from_config(s.get_config())
    assert s2.pairs == s.pairs
    assert [s2.plan(t) for t in range(100)] == [s.plan(t) for t in range(100)]
    g = ip.MultiScaleSampler(sizes=[128, 256, 128])
    assert g.sizes == [128, 256] and g.batches == [512, 128]
    assert ip.MultiScaleSampler.from_config(g.get_config()).pairs == g.pairs


def test_plan_is_deterministic_uniform_and_seeded():
    s = ip.MultiScaleSampler(seed=0)
    plans = [s.plan(t) for t in range(3000)]
    assert plans == [ip.MultiScaleSampler(seed=0).plan(t) for t in range(3000)]
    counts = np.bincount(s.indices(np.arange(3000)), minlength=5)
    assert counts.min() > 3000 / 5 * 0.8, counts  # every scale, roughly uniform
    assert plans != [ip.MultiScaleSampler(seed=1).plan(t) for t in range(3000)]
    # the plan from step s onwards is the tail of the plan from step 0
    assert [s.plan(t) for t in range(1234, 1300)] == plans[1234:1300]
    # graph-side choice equals the Python one
    steps = np.arange(0, 400, 7)
    tf_idx = [int(s.index_tf(tf.constant(int(t), tf.int64))) for t in steps]
    assert tf_idx == list(s.indices(steps))
    assert s.examples_before(50) == sum(b for _, b in plans[:50])


# --- sources ------------------------------------------------------------------------------------


def test_folder_source_counts_skips_corrupt_and_lists_classes(folder, caplog):
    with caplog.at_level(logging.WARNING, logger="experiments.data.sources"):
        src = ip.load_source(str(folder), "train")
    assert src.class_names == list(CLASSES) and src.num_classes == 3
    assert src.num_examples == 12  # 13 JPEG files, one undecodable; the .txt is ignored
    assert src.num_skipped == 1 and src.skipped[0].endswith("broken.JPEG")
    assert "skipped 1 undecodable" in caplog.text and "broken.JPEG" in caplog.text
    assert np.bincount(src.labels).tolist() == [4, 4, 4]
    val = ip.load_source(str(folder), "val")
    assert val.num_examples == 6 and val.class_names == list(CLASSES)


def test_decode_check_is_cached_on_disk(folder, monkeypatch):
    ip.load_source(str(folder), "train")
    monkeypatch.setattr(sources, "_VERIFIED", {})

    def fail(self):
        raise AssertionError("decode check ran again")

    monkeypatch.setattr(ip.Source, "_decode_check", fail)
    src = ip.load_source(str(folder), "train")
    assert src.num_examples == 12 and src.skipped[0].endswith("broken.JPEG")
    monkeypatch.setenv("VIT_COMPRESS_CACHE", "")  # disk cache off: the check runs
    monkeypatch.setattr(sources, "_VERIFIED", {})
    with pytest.raises(AssertionError, match="ran again"):
        ip.load_source(str(folder), "train")


def test_every_image_decodes_to_three_channels(train_src):
    gray = [i for i, p in enumerate(train_src.paths) if p.endswith("cat_0.JPEG")]
    assert Image.open(train_src.paths[gray[0]]).mode == "L"
    for image, label in train_src.as_dataset():
        assert image.dtype == tf.uint8 and image.shape[-1] == 3 and image.shape.rank == 3
        assert label.dtype == tf.int32
    image, _ = train_src.decode(tf.constant(gray[0], tf.int64))
    assert image.shape[-1] == 3
    assert np.array_equal(image[..., 0], image[..., 2])  # grey replicated into RGB


def test_limits_give_small_balanced_subsets(folder):
    src = ip.load_source(str(folder), "train", limit_per_class=2)
    assert np.bincount(src.labels).tolist() == [2, 2, 2]
    src = ip.load_source(str(folder), "val", limit=4)
    assert src.num_examples == 4 and len(set(src.labels.tolist())) == 3


def test_clear_errors(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ip.load_source(str(tmp_path / "nowhere"), "train")
    with pytest.raises(FileNotFoundError, match="split 'test'"):
        ip.load_source(str(folder), "test")
    empty = tmp_path / "empty_class"
    (empty / "train" / "a").mkdir(parents=True)
    (empty / "train" / "b").mkdir(parents=True)
    _write_jpeg(empty / "train" / "a" / "x.jpg", np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"class folder .*train/b has no images"):
        ip.load_source(str(empty), "train")
    bad = tmp_path / "all_bad"
    (bad / "train" / "a").mkdir(parents=True)
    (bad / "train" / "a" / "x.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="no decodable images"):
        ip.load_source(str(bad), "train")
    with pytest.raises(ValueError, match="no_such_dataset_xyz"):
        ip.load_source("tfds:no_such_dataset_xyz", "train")


def test_tfds_not_prepared_error_names_flag(monkeypatch):
    tfds = require_module("tensorflow_datasets")

    def offline(self, *a, **k):
        raise ConnectionError("no internet")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: False)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
    monkeypatch.setattr(sources, "_offline_reason", lambda: None)  # as if online
    with pytest.raises(RuntimeError, match=r"tfds:mnist.*not prepared.*no internet.*tfds build"):
        ip.load_source("tfds:mnist", "train")


def test_tfds_offline_fails_at_once_with_how_to_prepare(monkeypatch, tmp_path):
    def unreachable(*args, **kwargs):
        raise OSError(101, "Network is unreachable")

    import socket

    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(RuntimeError, match=r"tfds:mnist: the dataset is not prepared in .* this "
                                           r"machine is offline .*Network is unreachable.*"
                                           r"tfds build mnist.*TFDS_DATA_DIR"):
        ip.load_source("tfds:mnist", "train", data_dir=str(tmp_path))


def test_tfds_download_path_reaches_the_network(monkeypatch, tmp_path):
    """TFDS's download path imports everything it needs (importlib_resources, in 4.9.10) and
    fails on the network request itself: here every HTTP request is refused."""
    tfds = require_module("tensorflow_datasets")
    requests = require_module("requests")
    asked = []

    def refuse(self, url, *args, **kwargs):
        asked.append(url)
        raise requests.exceptions.ConnectionError(f"refused by the test: {url}")

    monkeypatch.setattr(sources, "_offline_reason", lambda: None)  # as if online
    monkeypatch.setattr(requests.Session, "get", refuse)
    from tensorflow_datasets.core.download import downloader
    from tensorflow_datasets.core.utils import gcs_utils

    monkeypatch.setattr(downloader, "MAX_RETRIES", 0)
    monkeypatch.setattr(gcs_utils, "is_dataset_on_gcs", lambda *a, **k: False)
    with pytest.raises(RuntimeError, match=r"could not be downloaded \(ConnectionError: refused by "
                                           r"the test"):
        ip.load_source("tfds:imagenette/160px-v2", "train", data_dir=str(tmp_path))
    assert asked and "imagenette" in asked[0]


def test_tfds_split_mapping():
    assert sources._map_split("val", ["train", "validation"], "f") == "validation"
    assert sources._map_split("val", ["train", "test"], "f") == "test"
    assert sources._map_split("train", ["train", "test"], "f") == "train"
    with pytest.raises(ValueError, match="split 'val' not found"):
        sources._map_split("val", ["train"], "--data=tfds:x")


def test_tfds_source_offline_under_mock_data(monkeypatch):
    """The tfds: loader end to end without the network: mock_data stands in for the download
    and the prepared files (the connectivity probe is told the machine is online)."""
    tfds = require_module("tensorflow_datasets")
    monkeypatch.setattr(sources, "_offline_reason", lambda: None)
    with tfds.testing.mock_data(num_examples=8):
        src = ip.load_source("tfds:imagenette/160px-v2", "val")
    assert src.num_examples == 8 and src.num_classes == 10
    assert src.class_names[0] == "n01440764"
    ds = ip.train_dataset(src, ip.MultiScaleSampler(**SMALL))
    x, y = next(iter(ds))
    assert x.shape[1:] == (ip.MultiScaleSampler(**SMALL).plan(0)[0],) * 2 + (3,)
    assert 0 <= y.numpy().min() and y.numpy().max() < 10
    xe, _ = next(iter(ip.eval_dataset(src, size=48, batch_size=8)))
    assert xe.shape == (8, 48, 48, 3)


# --- train / eval streams -----------------------------------------------------------------------


def test_train_batches_follow_the_plan(train_src):
    s = ip.MultiScaleSampler(**SMALL, seed=3)
    assert s.pairs == [(32, 16), (64, 4), (96, 1)]  # int(round(64*64*4 / 96**2, 2)) = 1
    for step, (x, y) in enumerate(_batches(ip.train_dataset(train_src, s), 12)):
        size, b = s.plan(step)
        assert x.shape == (b, size, size, 3) and x.dtype == np.float32
        assert y.shape == (b,) and y.dtype == np.int32
        assert x.min() >= 0.0 and x.max() <= 1.0 and x.std() > 0.01
        assert y.min() >= 0 and y.max() < 3


def test_train_stream_is_deterministic_and_resumes_exactly(train_src):
    s = ip.MultiScaleSampler(**SMALL, seed=1)
    aug = ip.Augment(randaugment=2)
    full = _batches(ip.train_dataset(train_src, s, augment=aug, seed=7), 9)
    again = _batches(ip.train_dataset(train_src, s, augment=aug, seed=7), 3)
    for (x0, y0), (x1, y1) in zip(full, again):
        np.testing.assert_array_equal(x0, x1)
        np.testing.assert_array_equal(y0, y1)
    resumed = _batches(ip.train_dataset(train_src, s, augment=aug, seed=7, start_step=5), 4)
    for (x0, y0), (x1, y1) in zip(full[5:], resumed):
        np.testing.assert_array_equal(x0, x1)
        np.testing.assert_array_equal(y0, y1)
    other = _batches(ip.train_dataset(train_src, s, augment=aug, seed=8), 1)
    assert other[0][0].shape != full[0][0].shape or not np.array_equal(other[0][0], full[0][0])


def test_train_stream_reads_epochs_without_replacement(train_src):
    s = ip.MultiScaleSampler.fixed(32, 4)
    labels = np.concatenate([y for _, y in _batches(ip.train_dataset(train_src, s), 6)])
    # 24 draws = two full passes over the 12 examples: each class exactly 8 times
    assert np.bincount(labels, minlength=3).tolist() == [8, 8, 8]


def test_mixup_cutmix_give_soft_labels(train_src):
    s = ip.MultiScaleSampler.fixed(32, 6)
    aug = ip.Augment(mixup_alpha=0.8, cutmix_alpha=1.0)
    for x, y in _batches(ip.train_dataset(train_src, s, augment=aug), 4):
        assert y.shape == (6, 3) and y.dtype == np.float32
        np.testing.assert_allclose(y.sum(1), 1.0, atol=1e-5)
        assert x.min() >= 0 and x.max() <= 1
    off = ip.Augment(mixup_alpha=0.8, mix_prob=0.0)
    for _, y in _batches(ip.train_dataset(train_src, s, augment=off), 2):
        assert set(np.unique(y).tolist()) <= {0.0, 1.0}  # unmixed batches: plain one-hot


def test_eval_dataset_is_finite_deterministic_and_centre_crops(train_src):
    ds = ip.eval_dataset(train_src, size=40, batch_size=5)
    a, b = _batches(ds, 100), _batches(ds, 100)
    assert [x.shape[0] for x, _ in a] == [5, 5, 2]
    for (x0, y0), (x1, y1) in zip(a, b):
        np.testing.assert_array_equal(x0, x1)
        np.testing.assert_array_equal(y0, y1)
    assert a[0][0].dtype == np.float32 and 0 <= a[0][0].min() and a[0][0].max() <= 1
    # a constant image stays constant; a 100x50 image -> short side 57 -> centre 40x40
    img = tf.fill([100, 50, 3], tf.constant(200, tf.uint8))
    out = augment.centre_crop(img, 40, 0.875)
    assert out.shape == (40, 40, 3)
    np.testing.assert_allclose(out.numpy(), 200.0, atol=1e-3)
    limited = _batches(ip.eval_dataset(train_src, size=40, batch_size=8, limit=6), 10)
    assert sum(len(y) for _, y in limited) == 6
    assert sorted(np.concatenate([y for _, y in limited]).tolist()) == [0, 0, 1, 1, 2, 2]


def test_centre_crop_eager_equals_tf_data(train_src):
    eager = [augment.centre_crop(train_src.decode(tf.constant(i, tf.int64))[0], 40, 0.875) / 255.0
             for i in range(3)]
    x, _ = next(iter(ip.eval_dataset(train_src, size=40, batch_size=3)))
    np.testing.assert_allclose(x.numpy(), np.stack([e.numpy() for e in eager]), atol=1e-6)


def test_representative_images(train_src):
    r = ip.representative_images(train_src, 48, 20)
    assert r.shape == (20, 48, 48, 3) and r.dtype == np.float32
    assert 0 <= r.min() and r.max() <= 1 and r.std() > 0.01
    np.testing.assert_array_equal(r, ip.representative_images(train_src, 48, 20))


# --- real Imagenette ----------------------------------------------------------------------------


def test_real_imagenette_subset(imagenette_dir):
    src = ip.load_source(str(imagenette_dir), "train", limit_per_class=3)
    assert src.num_classes == 10 and src.num_examples == 30
    assert src.class_names == sorted(p.name for p in pathlib.Path(imagenette_dir, "train").iterdir()
                                     if p.is_dir())
    s = ip.MultiScaleSampler(base_batch=4)
    for step, (x, y) in enumerate(_batches(ip.train_dataset(src, s), 3)):
        size, b = s.plan(step)
        assert x.shape == (b, size, size, 3) and y.shape == (b,)
        assert 0 <= x.min() and x.max() <= 1
    val = ip.load_source(str(imagenette_dir), "val", limit=10)
    x, y = next(iter(ip.eval_dataset(val, size=256, batch_size=10)))
    assert x.shape == (10, 256, 256, 3) and sorted(y.numpy().tolist()) == list(range(10))


_MIRRORED = r'''
import sys
from models.compat import tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from experiments import data as ip
src = ip.load_source(sys.argv[1], "train")
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
s = ip.MultiScaleSampler(min_size=32, max_size=96, n_scales=3, base_size=64, base_batch=6,
                         check_scale=32, num_replicas=2)
dds = strategy.experimental_distribute_dataset(ip.train_dataset(src, s))
for step, (x, y) in zip(range(6), dds):
    size, b = s.plan(step)
    shapes = [tuple(t.shape) for t in strategy.experimental_local_results(x)]
    assert shapes == [(b // 2, size, size, 3)] * 2, (step, shapes)
print("OK")
'''


@pytest.mark.slow
def test_mirrored_strategy_splits_each_batch_evenly(folder):
    """Every replica gets half of each batch, at the same resolution (2 logical CPUs)."""
    import os
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", _MIRRORED, str(folder)], cwd=root, timeout=300,
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def test_fixed_size_student_trains_and_exports_at_its_size(folder, tmp_path):
    """EfficientFormer's training graph is built at 224 (attention biases tied to the grid): the
    student sections' samplers give 224 px batches with the sampler's pixel budget, and every
    evaluation and export is at 224 (a multi-scale batch crashed its distill stage before)."""
    from experiments.configs import get_config
    from experiments.stages import Run

    c = get_config("quick")
    run = Run(student="efficientformer_l1", teacher="vit_tiny_patch16", data=str(folder),
              workdir=tmp_path / "ef", config=c, export_size=64)
    s = c.distill.sampler
    batch = round(s.base_batch * s.base_size**2 / 224**2)
    for section in (c.distill, c.prune, c.qat):
        assert run.sampler(section).pairs == [(224, batch)]
    assert run.export_size == 224
    xxs = Run(student="mobilevit_xxs", teacher="vit_tiny_patch16", data=str(folder),
              workdir=tmp_path / "xxs", config=c)
    assert len(xxs.sampler(c.distill).pairs) == s.n_scales  # the multi-scale sampler as is
