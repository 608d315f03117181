"""Training augmentation: random resized crop, flip, RandAugment-lite, Mixup/CutMix; the eval
centre crop.

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
- Evaluation (`centre_crop`) resizes the shorter side to `floor(size / crop_pct)` (bilinear,
  antialiased) and centre-crops `size`, as timm/ml-cvnets.
"""

from __future__ import annotations

import dataclasses

from models.compat import tf



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


def sample_crop_box(shape, key, scale, ratio):
    """An Inception crop of an image of `shape` [H, W, C]: (begin [y0, x0, 0], size [h, w, -1])."""
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=key,
        min_object_covered=0.0, aspect_ratio_range=list(ratio), area_range=list(scale),
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    return begin, crop_size


def random_resized_crop(image, size, key, scale, ratio):
    begin, crop_size = sample_crop_box(tf.shape(image), key, scale, ratio)
    crop = tf.slice(image, begin, crop_size)
    return tf.image.resize(crop, tf.stack([size, size]), method="bilinear")  # float32 0..255


def centre_crop(image, size, crop_pct):
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


def rand_augment(image, key, num_ops, magnitude):
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


def mix_batch(images, labels, key, aug: Augment, num_classes: int):
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

