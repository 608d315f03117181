"""Knowledge distillation: the losses and a `Distiller` model that trains a student against a
frozen teacher (or against labels only).

References: DeiT (Touvron et al., arXiv:2012.12877, `facebookresearch/deit` `losses.py`) and
EfficientFormer (Li et al., arXiv:2206.01191, snap-research `util/losses.py`, the same class);
Hinton et al. (arXiv:1503.02531) for the temperature and the T^2 factor.

  total = (1 - alpha) * label_loss + alpha * kd_loss          (kind 'none': total = label_loss)
  label_loss = cross-entropy with label smoothing, int labels [B] or soft (mixup) labels [B, C]
  kd 'soft'  = T^2 * KL(softmax(teacher / T) || softmax(student / T)), summed over classes,
               mean over the batch
  kd 'hard'  = cross-entropy of the student on argmax(teacher) (DeiT hard distillation, no
               smoothing)

Differences from the reference:
  * 'soft' is normalised per example (sum over classes, mean over the batch: PyTorch's
    `reduction='batchmean'`, Keras' `KLDivergence`, ml-cvnets' `soft_kl_loss`). DeiT divides the
    summed KL by batch * num_classes (`outputs_kd.numel()`, deit#61), so DeiT's soft term is
    num_classes times smaller than ours and a DeiT `alpha` does not carry over unchanged.
  * Label smoothing is applied by the loss to int and soft labels alike (timm folds it into its
    mixup targets instead); a pipeline that already smooths its soft labels should pass 0.
  * With a two-head student (EfficientFormer `[class, distill]`) and kind 'none', each head takes
    the label loss and the two losses are averaged (DeiT trains only the class head then).

`Distiller` feeds the teacher the student's augmented batch resized (bilinear) to the teacher's
input size, in inference mode; only the student's variables are trained. With
`teacher_from_data=True` there is no teacher model: each batch carries the teacher's top-k logits
on the same crop, precomputed (`experiments.data.teacher_cache`), as `(images, labels,
(values, indices))`; `logits_from_topk` rebuilds full logits from them (exact when k is the
number of classes; otherwise the missing classes get -1e4, so the student matches the teacher's
softmax renormalised over its top k). It is never saved: the
student is saved on its own. Losses are summed per replica and divided by the global batch, so
gradients summed across replicas by the optimizer are those of the global mean (variable batch
sizes included, as long as each global batch splits evenly over the replicas).
"""

from __future__ import annotations

from models.compat import keras, tf

KINDS = ("none", "soft", "hard")


def label_loss(labels, logits, *, label_smoothing: float = 0.0):
    """Per-example cross-entropy [B] of `logits` [B, C] against int labels [B] or soft [B, C]."""
    logits = tf.cast(logits, tf.float32)
    labels = tf.convert_to_tensor(labels)
    num_classes = tf.shape(logits)[-1]
    if labels.shape.rank == 1:  # int class ids
        targets = tf.one_hot(tf.cast(labels, tf.int32), num_classes)
    else:
        targets = tf.cast(labels, tf.float32)
    if label_smoothing:
        targets = targets * (1.0 - label_smoothing) + label_smoothing / tf.cast(
            num_classes, tf.float32)
    return -tf.reduce_sum(targets * tf.nn.log_softmax(logits, axis=-1), axis=-1)


def kd_loss(student_logits, teacher_logits, *, kind: str, temperature: float = 1.0):
    """Per-example distillation loss [B] (zeros for kind 'none'); see the module docstring."""
    if kind not in KINDS:
        raise ValueError(f"distillation kind must be one of {KINDS}, got {kind!r}")
    s = tf.cast(student_logits, tf.float32)
    if kind == "none":
        return tf.zeros(tf.shape(s)[:1], tf.float32)
    t = tf.stop_gradient(tf.cast(teacher_logits, tf.float32))
    if kind == "hard":
        return tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=tf.argmax(t, axis=-1, output_type=tf.int32), logits=s)
    log_p_t = tf.nn.log_softmax(t / temperature, axis=-1)
    log_p_s = tf.nn.log_softmax(s / temperature, axis=-1)
    kl = tf.reduce_sum(tf.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
    return kl * (temperature**2)


def logits_from_topk(values, indices, num_classes: int, *, fill: float = -1e4):
    """Full logits [B, C] from the top-k logits `values` [B, k] at class `indices` [B, k];
    classes outside the top k get `fill` (probability 0 at any temperature)."""
    onehot = tf.one_hot(tf.cast(indices, tf.int32), num_classes, dtype=tf.float32)  # [B, k, C]
    logits = tf.einsum("bk,bkc->bc", tf.cast(values, tf.float32), onehot)
    return logits + (1.0 - tf.reduce_sum(onehot, axis=1)) * fill


def distillation_loss(labels, class_logits, distill_logits=None, teacher_logits=None, *,
                      kind: str, alpha: float = 0.5, temperature: float = 1.0,
                      label_smoothing: float = 0.0):
    """Per-example (total, label, kd) losses, each [B].

    `distill_logits` is the student's distillation head (EfficientFormer); None for a one-head
    student, whose single output then takes both terms.
    """
    if kind not in KINDS:
        raise ValueError(f"distillation kind must be one of {KINDS}, got {kind!r}")
    if kind != "none" and teacher_logits is None:
        raise ValueError(f"distillation kind {kind!r} needs teacher logits")
    two_heads = distill_logits is not None
    distill_logits = class_logits if distill_logits is None else distill_logits
    lab = label_loss(labels, class_logits, label_smoothing=label_smoothing)
    if kind == "none":
        if two_heads:
            lab = 0.5 * (lab + label_loss(labels, distill_logits, label_smoothing=label_smoothing))
        return lab, lab, tf.zeros_like(lab)
    kd = kd_loss(distill_logits, teacher_logits, kind=kind, temperature=temperature)
    return (1.0 - alpha) * lab + alpha * kd, lab, kd


def _split_heads(outputs):
    """Student outputs -> (class_logits, distill_logits or None)."""
    if isinstance(outputs, (list, tuple)):
        if len(outputs) == 1:
            return outputs[0], None
        if len(outputs) != 2:
            raise ValueError(f"a student returns 1 or 2 outputs, got {len(outputs)}")
        return outputs[0], outputs[1]
    return outputs, None


def _eval_logits(outputs):
    cls, dist = _split_heads(outputs)
    cls = tf.cast(cls, tf.float32)
    return cls if dist is None else 0.5 * (cls + tf.cast(dist, tf.float32))


def _correct(labels, logits):
    labels = tf.convert_to_tensor(labels)
    pred = tf.argmax(logits, axis=-1, output_type=tf.int32)
    if labels.shape.rank == 1:
        target = tf.cast(labels, tf.int32)
    else:
        target = tf.argmax(labels, axis=-1, output_type=tf.int32)
    return tf.cast(tf.equal(pred, target), tf.float32)


class Distiller(keras.Model):
    """Trains `student` on labels and, optionally, a frozen `teacher`'s logits.

    Args:
      student: a functional model; one output (logits) or two (`[class, distill]`).
      teacher: a model returning logits, frozen here (`trainable = False`) and run in inference
        mode; None for labels-only training (then `kind` must be 'none').
      kind: 'soft', 'hard' or 'none'.
      alpha: weight of the distillation term.
      temperature: softmax temperature of 'soft'.
      label_smoothing: smoothing of the label cross-entropy.
      teacher_size: square input size the teacher sees; None: the teacher's static input size,
        or the student's batch unchanged when the teacher takes any size.
      teacher_from_data: no teacher model; the batches carry the teacher's top-k logits
        (module docstring).

    Metrics: loss, label_loss, kd_loss, accuracy (epoch means, shown on the progress bar). Each
    train step also returns `step_loss`, `step_label_loss`, `step_kd_loss`, `step_accuracy`
    (means over this step's global batch), `images` (global batch) and `resolution`, for
    per-step logging; `distribute_reduction_method` is 'sum' so these add up across replicas.
    `test_step` scores the student alone (average of its heads): accuracy and the label loss
    (with the same smoothing as in training, so the two losses compare).
    """

    def __init__(self, student: keras.Model, teacher: keras.Model | None = None, *,
                 kind: str = "none", alpha: float = 0.5, temperature: float = 1.0,
                 label_smoothing: float = 0.0, teacher_size: int | None = None,
                 teacher_from_data: bool = False, **kwargs):
        kwargs.setdefault("name", "distiller")
        super().__init__(**kwargs)
        if kind not in KINDS:
            raise ValueError(f"distillation kind must be one of {KINDS}, got {kind!r}")
        if teacher is not None and teacher_from_data:
            raise ValueError("give a teacher model or teacher_from_data, not both")
        if kind != "none" and teacher is None and not teacher_from_data:
            raise ValueError(f"distillation kind {kind!r} needs a teacher (or teacher_from_data)")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.student = student
        self.teacher = teacher if kind != "none" else None
        if self.teacher is not None:
            self.teacher.trainable = False
            if teacher_size is None:
                shape = self.teacher.input_shape
                if shape[1] is not None and shape[2] is not None:
                    if shape[1] != shape[2]:
                        raise ValueError(f"teacher input must be square, got {shape}")
                    teacher_size = int(shape[1])
        self.kind = kind
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.label_smoothing = float(label_smoothing)
        self.teacher_size = teacher_size
        self.teacher_from_data = bool(teacher_from_data) and kind != "none"
        # Per-replica values returned by train_step are summed across replicas (see class doc).
        self.distribute_reduction_method = "sum"
        self.loss_tracker = keras.metrics.Mean("loss")
        self.label_loss_tracker = keras.metrics.Mean("label_loss")
        self.kd_loss_tracker = keras.metrics.Mean("kd_loss")
        self.accuracy_tracker = keras.metrics.Mean("accuracy")

    @property
    def metrics(self):
        return [self.loss_tracker, self.label_loss_tracker, self.kd_loss_tracker,
                self.accuracy_tracker]

    def call(self, inputs, training=False):
        return _eval_logits(self.student(inputs, training=training))

    def teacher_logits(self, images):
        """Teacher logits [B, C] for the student's batch, resized to the teacher's size."""
        if self.teacher_size is not None:
            images = tf.image.resize(images, (self.teacher_size, self.teacher_size),
                                     method="bilinear")
        return tf.stop_gradient(tf.cast(self.teacher(images, training=False), tf.float32))

    def batch_loss(self, images, labels, *, training: bool = False):
        """The mean training objective of one batch, the student in inference mode by default
        (BN statistics untouched, no dropout): what structured pruning's Taylor importance
        differentiates (compress/structured.py)."""
        t_logits = self.teacher_logits(images) if self.teacher is not None else None
        cls, dist = _split_heads(self.student(images, training=training))
        total, _, _ = distillation_loss(labels, cls, dist, t_logits, kind=self.kind,
                                        alpha=self.alpha, temperature=self.temperature,
                                        label_smoothing=self.label_smoothing)
        return tf.reduce_mean(total)

    def train_step(self, data):
        images, labels = data[0], data[1]
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        local_batch = tf.shape(images)[0]
        global_batch = tf.cast(local_batch * replicas, tf.float32)
        t_logits = self.teacher_logits(images) if self.teacher is not None else None
        if self.teacher_from_data and len(data) < 3:
            raise ValueError("teacher_from_data: batches must be (images, labels, (values, "
                             "indices)), as a teacher cache's training stream gives")
        with tf.GradientTape() as tape:
            outputs = self.student(images, training=True)
            cls, dist = _split_heads(outputs)
            if self.teacher_from_data:
                t_logits = logits_from_topk(*data[2], num_classes=cls.shape[-1])
            total, lab, kd = distillation_loss(
                labels, cls, dist, t_logits, kind=self.kind, alpha=self.alpha,
                temperature=self.temperature, label_smoothing=self.label_smoothing)
            loss = tf.reduce_sum(total) / global_batch
            if self.student.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(self.student.losses))
        # minimize (not tape.gradient + apply_gradients): under mixed_float16 the optimizer is a
        # LossScaleOptimizer, which scales the loss here and unscales the gradients.
        self.optimizer.minimize(loss, self.student.trainable_variables, tape=tape)

        correct = _correct(labels, _eval_logits(outputs))
        self.loss_tracker.update_state(total)
        self.label_loss_tracker.update_state(lab)
        self.kd_loss_tracker.update_state(kd)
        self.accuracy_tracker.update_state(correct)
        # In replica context a tracker's result is this replica's mean; the 'sum' reduction
        # adds them, so divide here (replicas see equal batches: the mean of means is the mean).
        logs = {m.name: m.result() / replicas for m in self.metrics}
        logs.update(
            step_loss=tf.reduce_sum(total) / global_batch,
            step_label_loss=tf.reduce_sum(lab) / global_batch,
            step_kd_loss=tf.reduce_sum(kd) / global_batch,
            step_accuracy=tf.reduce_sum(correct) / global_batch,
            images=tf.cast(local_batch, tf.float32),
            resolution=tf.cast(tf.shape(images)[1], tf.float32) / replicas,
        )
        return logs

    def test_step(self, data):
        images, labels = data[0], data[1]
        logits = _eval_logits(self.student(images, training=False))
        self.loss_tracker.update_state(
            label_loss(labels, logits, label_smoothing=self.label_smoothing))
        self.accuracy_tracker.update_state(_correct(labels, logits))
        return {"loss": self.loss_tracker.result(), "accuracy": self.accuracy_tracker.result()}

    def get_config(self):
        raise NotImplementedError("Distiller is never saved; save its student instead")
