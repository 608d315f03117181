"""The training engine shared by every training stage (teacher, distill, prune, QAT).

`train(model_or_distiller, make_train_ds, steps=..., workdir=..., ...)` runs `Model.fit` of a
`compress.distill.Distiller` (a plain model is wrapped into a labels-only one) in chunks of
`eval_every` steps, with:
  * AdamW, linear warm-up then cosine decay to `min_lr` (`WarmupCosine`); no weight decay on
    biases, norms, position embeddings, class/distillation tokens and attention-bias tables
    (timm's `no_weight_decay` sets);
  * checkpoints (`tf.train.CheckpointManager` under `<workdir>/ckpt`: student, optimizer, step,
    the state of the student's random generators (dropout) and the last steps' training losses)
    every `checkpoint_every` steps and at the end. A killed run called again restores them and
    restarts the data pipeline with `make_train_ds(start_step=step)`, so the global step, the
    learning-rate schedule, the sampler's multi-scale plan and the dropout draws all continue
    where they stopped: with `set_seed(..., deterministic=True)` a resumed run ends with the
    figures of a run never stopped;
  * TensorBoard scalars under `logdir`: `train/{loss,label_loss,kd_loss,accuracy}` (means over
    the last `log_every` steps), `train/learning_rate`, `train/images_per_sec`,
    `train/resolution` and `train/batch_size` (every step), `val/{top1,loss}` at each evaluation;
  * a tqdm progress bar with the running loss, accuracy, images/s and the current resolution;
  * any `tf.distribute` strategy (`get_strategy`); models must be built under its scope, and
    each global batch must split evenly over the replicas (checked in the input stream).
    Tested: one device, MirroredStrategy (two logical CPUs) and MultiWorkerMirroredStrategy
    (two worker processes; input sharded with `AutoShardPolicy.DATA`, `_data_sharding`; only
    the chief writes checkpoints and TensorBoard). Not run here: TPU (XLA needs static shapes:
    a fixed-size sampler and `drop_remainder` batches).

Why `fit` in chunks rather than a custom loop: Keras callbacks that the pruning and QAT stages
pass (`UpdatePruningStep`, `PruningSummaries`) keep working unchanged, and `fit` already handles
distributed datasets. The dataset is recreated only at chunk boundaries that do not align
(resume, the last chunk), from the factory at the exact step, so no batch is seen twice.

Mixed precision: `set_mixed_precision('mixed_bfloat16')` must be called before the models are
built (Keras fixes each layer's dtype policy at construction); `train(mixed_precision=...)`
checks that the student was built that way. On this CPU (AVX512-BF16) it doubled ViT-Ti
training throughput; losses are always computed in float32. 'auto' picks the policy per device
type (`auto_mixed_precision`); under 'mixed_float16' Keras wraps the optimizer in a
LossScaleOptimizer. XLA: `train(jit_compile=True)` (config key `jit_compile`), off by default:
slower on CPUs (docs/scale_out.md).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from typing import Callable, Iterable

from compress.distill import Distiller
from models.compat import keras, tf

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
# Substrings of variable names that get no weight decay (besides every rank <= 1 variable).
NO_WEIGHT_DECAY = ("pos_embed", "cls", "token", "attention_bias")


# --------------------------------------------------------------------------------------------
# Strategy and precision


def get_strategy(name: str = "default", *, tpu: str | None = None) -> tf.distribute.Strategy:
    """The `tf.distribute` strategy named by the `--strategy` flag.

    'default' (one device), 'mirrored' (all local GPUs, or the CPU), 'multi_worker' (reads
    TF_CONFIG), 'tpu' (`tpu`: the TPU name or address; None: the local/Cloud TPU VM).
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"--strategy must be one of {', '.join(STRATEGIES)}; got {name!r}")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return {flag for line in f if line.startswith("flags") for flag in line.split()[2:]}
    except OSError:
        return set()


def auto_mixed_precision(devices: list[dict] | None = None,
                         cpu_flags: set[str] | None = None) -> str:
    """The dtype policy for the device type that trains: what `mixed_precision='auto'` picks.

      TPU                                           -> 'mixed_bfloat16' (the MXU's type)
      GPU of compute capability >= 7.0 (tensor cores) -> 'mixed_float16' (with loss scaling;
                                                       float16 is as fast as bfloat16 on >= 8.0)
      CPU with AVX512-BF16 or AMX-BF16              -> 'mixed_bfloat16' (2x ViT-Ti training
                                                       throughput on a 2-core Xeon with AMX)
      anything else                                 -> 'float32'

    `devices`: dicts with 'device_type' ('TPU', 'GPU', 'CPU') and, for GPUs,
    'compute_capability' (major, minor); default: this machine's (TPUs first, then GPUs).
    `cpu_flags`: the CPU's feature flags; default: /proc/cpuinfo's.
    """
    if devices is None:
        devices = [{"device_type": "TPU"} for _ in tf.config.list_logical_devices("TPU")]
        devices += [{"device_type": "GPU", **tf.config.experimental.get_device_details(d)}
                    for d in tf.config.list_physical_devices("GPU")]
    kinds = {d["device_type"] for d in devices}
    if "TPU" in kinds:
        return "mixed_bfloat16"
    gpus = [d for d in devices if d["device_type"] == "GPU"]
    if gpus:
        if all(tuple(d.get("compute_capability") or (0, 0)) >= (7, 0) for d in gpus):
            return "mixed_float16"
        return "float32"
    flags = _cpu_flags() if cpu_flags is None else cpu_flags
    return "mixed_bfloat16" if flags & {"avx512_bf16", "amx_bf16"} else "float32"


PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16", "auto")


def set_mixed_precision(policy: str | None) -> str:
    """Set the global Keras dtype policy: one of PRECISIONS or None (= 'float32'); 'auto' is
    `auto_mixed_precision()`. Returns the policy set.

    Call it before building the models that `train` will get.
    """
    policy = policy or "float32"
    if policy not in PRECISIONS:
        raise ValueError(f"mixed_precision must be one of {', '.join(PRECISIONS)}; "
                         f"got {policy!r}")
    if policy == "auto":
        policy = auto_mixed_precision()
    keras.mixed_precision.set_global_policy(policy)
    return policy


def _check_precision(student: keras.Model, policy: str | None) -> None:
    if policy is None:
        return
    if policy not in PRECISIONS[:-1]:
        raise ValueError(f"mixed_precision must be None or one of {', '.join(PRECISIONS[:-1])} "
                         f"(as returned by set_mixed_precision); got {policy!r}")
    want = {"float32": "float32", "mixed_bfloat16": "bfloat16",
            "mixed_float16": "float16"}[policy]
    got = {layer.compute_dtype for layer in student.layers if layer.weights}
    if got and want not in got:
        raise ValueError(
            f"mixed_precision={policy!r} but the student computes in {sorted(got)}: call "
            f"compress.training.set_mixed_precision({policy!r}) before building the models")


def set_seed(seed: int, *, deterministic: bool = True) -> None:
    """Seed every draw of the models built after it: weight initialisation (Python, NumPy and
    TF global seeds, `keras.utils.set_random_seed`) and dropout, whose layers then draw from a
    `tf.random.Generator` each (`enable_tf_random_generator`) that `train` checkpoints.
    `deterministic`: also make TF ops deterministic (`enable_op_determinism`; process-wide, on
    for the rest of the process). The input pipeline has its own seeds (experiments.data).
    """
    keras.backend.experimental.enable_tf_random_generator()
    keras.utils.set_random_seed(int(seed))
    if deterministic:
        tf.config.experimental.enable_op_determinism()


def _random_generators(model: keras.Model) -> dict:
    """The `tf.random.Generator` of each random layer (Dropout) of `model`, by layer name.

    Keras keeps them out of the layer's weights and checkpoints (`BaseRandomLayer`); layers
    built before `set_seed` use TF1 stateful ops instead, whose state cannot be saved.
    """
    out = {}
    for layer in model.submodules:
        generator = getattr(getattr(layer, "_random_generator", None), "_generator", None)
        if isinstance(generator, tf.random.Generator):
            out[layer.name] = generator
    return out


def is_chief(strategy) -> bool:
    """Whether this process writes the run's files (checkpoints, TensorBoard, stage files).

    One process: always. `MultiWorkerMirroredStrategy`: the 'chief' task, or worker 0 when the
    cluster has no 'chief' job (TF's convention, as in its multi-worker tutorial).
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True
    return chief_task(resolver.task_type, resolver.task_id, resolver.cluster_spec().jobs)


def chief_task(task_type: str | None, task_id: int | None, jobs) -> bool:
    """TF's chief rule on a cluster's task: the 'chief' task (or no task type), else worker 0
    when the cluster (`jobs`: its job names) has no 'chief' job. `is_chief` applies it to a
    strategy; `experiments.workdir.lock_name` to TF_CONFIG before any strategy exists."""
    if task_type in (None, "chief"):
        return True
    return task_type == "worker" and task_id == 0 and "chief" not in jobs


# --------------------------------------------------------------------------------------------
# Optimizer


class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from `warmup_init_lr` (default `min_lr`) to `peak_lr` over `warmup_steps`,
    then cosine decay to `min_lr` at `total_steps` (constant after)."""

    def __init__(self, peak_lr: float, total_steps: int, warmup_steps: int = 0,
                 min_lr: float = 0.0, warmup_init_lr: float | None = None):
        super().__init__()
        self.peak_lr = float(peak_lr)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.min_lr = float(min_lr)
        self.warmup_init_lr = float(min_lr if warmup_init_lr is None else warmup_init_lr)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warm = self.warmup_init_lr + (self.peak_lr - self.warmup_init_lr) * step / max(
            self.warmup_steps, 1)
        progress = tf.clip_by_value(
            (step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 0.0, 1.0)
        cosine = self.min_lr + 0.5 * (self.peak_lr - self.min_lr) * (
            1.0 + tf.cos(math.pi * progress))
        return tf.where(step < self.warmup_steps, warm, cosine)

    def get_config(self):
        return dict(peak_lr=self.peak_lr, total_steps=self.total_steps,
                    warmup_steps=self.warmup_steps, min_lr=self.min_lr,
                    warmup_init_lr=self.warmup_init_lr)


def make_optimizer(variables, *, lr: float, weight_decay: float, steps: int,
                   warmup_steps: int = 0, min_lr: float = 0.0, warmup_init_lr: float | None = None,
                   clip_norm: float | None = None, beta_1: float = 0.9, beta_2: float = 0.999,
                   ) -> keras.optimizers.Optimizer:
    """AdamW on a `WarmupCosine` schedule, built for `variables` (checkpoints restore at once)."""
    schedule = WarmupCosine(lr, steps, warmup_steps, min_lr, warmup_init_lr)
    opt = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=weight_decay,
                                 beta_1=beta_1, beta_2=beta_2, global_clipnorm=clip_norm)
    opt.exclude_from_weight_decay(var_list=[
        v for v in variables
        if v.shape.rank <= 1 or any(key in v.name for key in NO_WEIGHT_DECAY)])
    opt.build(variables)
    return opt


# --------------------------------------------------------------------------------------------
# Callback: progress bar, TensorBoard, checkpoints


class _Engine(keras.callbacks.Callback):
    """Counts global steps; logs to TensorBoard and the console; saves checkpoints."""

    def __init__(self, *, start_step, total_steps, manager, step_var, recent_var, schedule,
                 writer, checkpoint_every, log_every, verbose):
        super().__init__()
        # (loss, accuracy) of the last len(recent) steps, row = step % len(recent); saved with
        # each checkpoint so a resumed run reports the same training figures
        self.recent_var = recent_var
        self.recent = recent_var.numpy()
        self.step = start_step
        self.start_step = start_step
        self.total_steps = total_steps
        self.manager, self.step_var = manager, step_var
        self.schedule = schedule
        self.writer = writer
        self.checkpoint_every = checkpoint_every
        self.log_every = max(1, int(log_every))
        self.bar = None
        if verbose:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step",
                            dynamic_ncols=True, mininterval=1.0)
        self.last_time = None
        self.last_saved = start_step
        self.acc = {}  # sums of per-step values since the last TensorBoard write
        self.timed_images = self.timed_seconds = 0.0  # whole run, for the final figure
        self.win_images = self.win_seconds = 0.0  # since the last TensorBoard write
        self.last_logs = {}
        self.val = {}
        self.step_rates = []  # images/s of each timed step

    def on_train_begin(self, logs=None):
        self.last_time = None  # the first step of each fit call includes tracing: not timed

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        logs = logs or {}
        self.step += 1
        images = float(logs.get("images", 0.0))
        if self.last_time is not None:
            dt = now - self.last_time
            self.timed_images += images
            self.timed_seconds += dt
            self.win_images += images
            self.win_seconds += dt
            self.step_rates.append(images / dt)
        self.last_time = now
        for key in ("step_loss", "step_label_loss", "step_kd_loss", "step_accuracy"):
            if key in logs:
                self.acc[key] = self.acc.get(key, 0.0) + float(logs[key])
        self.acc["n"] = self.acc.get("n", 0) + 1
        self.recent[(self.step - 1) % len(self.recent)] = (
            float(logs.get("step_loss", float("nan"))),
            float(logs.get("step_accuracy", float("nan"))))
        self.last_logs = logs
        if self.writer is not None:
            with self.writer.as_default(step=self.step):
                tf.summary.scalar("train/resolution", float(logs.get("resolution", 0.0)))
                tf.summary.scalar("train/batch_size", images)
                if self.step % self.log_every == 0 or self.step == self.total_steps:
                    n = self.acc.pop("n")
                    for key, total in self.acc.items():
                        tf.summary.scalar("train/" + key[len("step_"):], total / n)
                    tf.summary.scalar("train/learning_rate", float(self.schedule(self.step - 1)))
                    if self.win_seconds > 0:
                        tf.summary.scalar("train/images_per_sec",
                                          self.win_images / self.win_seconds)
                    self.acc, self.win_images, self.win_seconds = {}, 0.0, 0.0
        if self.checkpoint_every and self.step % self.checkpoint_every == 0:
            self.save()
        if self.bar is not None:
            post = {"loss": f"{logs.get('loss', float('nan')):.4f}",
                    "acc": f"{logs.get('accuracy', float('nan')):.3f}"}
            if logs.get("kd_loss"):
                post["kd"] = f"{logs['kd_loss']:.4f}"
            if self.timed_seconds:
                post["img/s"] = f"{self.timed_images / self.timed_seconds:.1f}"
            post["res"] = int(round(float(logs.get("resolution", 0))))
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if "val_accuracy" in logs:
            self.val = {"val_top1": float(logs["val_accuracy"]),
                        "val_loss": float(logs["val_loss"])}
            if self.writer is not None:
                with self.writer.as_default(step=self.step):
                    tf.summary.scalar("val/top1", self.val["val_top1"])
                    tf.summary.scalar("val/loss", self.val["val_loss"])
                self.writer.flush()
            if self.bar is not None:
                self.bar.write(f"step {self.step}: val top-1 {self.val['val_top1']:.4f}  "
                               f"val loss {self.val['val_loss']:.4f}")

    def train_figures(self) -> dict:
        """Means over the last len(recent) steps (fewer in a shorter run)."""
        import numpy as np

        done = self.recent[~np.isnan(self.recent[:, 0])]
        if not len(done):
            return {}
        return {"train_loss": float(np.mean(done[:, 0])),
                "train_accuracy": float(np.mean(done[:, 1]))}

    def save(self):
        self.step_var.assign(self.step)
        self.recent_var.assign(self.recent)
        self.manager.save(checkpoint_number=self.step)
        self.last_saved = self.step
        if self.writer is not None:
            self.writer.flush()

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()


# --------------------------------------------------------------------------------------------
# The engine


def _segments(start: int, steps: int, chunk: int) -> list[tuple[int, int, int]]:
    """(first_step, steps_per_epoch, epochs) fit calls covering [start, steps) whose epochs end
    on multiples of `chunk` (and at `steps`)."""
    out, s = [], start
    if s % chunk and s < steps:
        n = min(chunk - s % chunk, steps - s)
        out.append((s, n, 1))
        s += n
    if steps - s >= chunk:
        k = (steps - s) // chunk
        out.append((s, chunk, k))
        s += k * chunk
    if s < steps:
        out.append((s, steps - s, 1))
    return out


def _check_divisible(ds: tf.data.Dataset, replicas: int) -> tf.data.Dataset:
    def check(*batch):
        n = tf.shape(tf.nest.flatten(batch)[0])[0]
        tf.debugging.assert_equal(
            n % replicas, 0,
            message=f"the global batch must split evenly over the {replicas} replicas")
        return batch if len(batch) > 1 else batch[0]

    return ds.map(check)


def _data_sharding() -> tf.data.Options:
    """Multi-worker input sharding: `AutoShardPolicy.DATA`.

    The training streams are generated (a step counter mapped to examples), not read from
    per-worker files, so FILE sharding does not apply. Under DATA every worker runs the whole
    stream and keeps its own slice of each global batch: the global batch, its images and
    their order stay those of a one-process run (the cost: each worker decodes every image).
    OFF would feed each worker the whole batch, multiplying the global batch by the workers.
    """
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA)
    return options


def train(model: keras.Model, train_ds: tf.data.Dataset | Callable[[int], tf.data.Dataset], *,
          steps: int, workdir: str, lr: float, weight_decay: float,
          val_ds: tf.data.Dataset | None = None, warmup_steps: int = 0, min_lr: float = 0.0,
          warmup_init_lr: float | None = None, clip_norm: float | None = None,
          label_smoothing: float | None = None, strategy: tf.distribute.Strategy | None = None,
          callbacks: Iterable[keras.callbacks.Callback] = (), checkpoint_every: int | None = None,
          eval_every: int | None = None, log_every: int = 10, logdir: str | None = None,
          mixed_precision: str | None = None, jit_compile: bool = False, max_to_keep: int = 2,
          verbose: bool = True) -> dict:
    """Train (or resume training) for `steps` global steps in total.

    Args:
      model: a `Distiller`, or a plain student model (trained on labels only). Build it, and
        the teacher, under `strategy.scope()`.
      train_ds: `make_train_ds(start_step) -> tf.data.Dataset`, an infinite dataset of
        `(images, labels)` whose first batch is the one of global step `start_step`; or one
        dataset (then a resumed run cannot skip the batches already seen).
      steps: total optimizer steps of the run (the schedule's length), resumed runs included.
      workdir: checkpoints go to `<workdir>/ckpt`; TensorBoard to `logdir` (default
        `<workdir>/tb`).
      lr, weight_decay, warmup_steps, min_lr, warmup_init_lr, clip_norm: AdamW and its
        warm-up + cosine schedule (`make_optimizer`).
      val_ds: finite `(images, labels)` dataset, evaluated every `eval_every` steps (None: at
        the end only).
      label_smoothing: overrides the Distiller's (a plain model: default 0).
      strategy: the strategy the models were built under (default: the current one).
      callbacks: extra Keras callbacks (e.g. `UpdatePruningStep`); their `model` is the Distiller.
      checkpoint_every: steps between checkpoints (None: only at the end).
      log_every: steps between TensorBoard writes of the averaged training scalars.
      mixed_precision: the policy the models were built with (checked, see
        `set_mixed_precision`).
      jit_compile: compile the train step with XLA (`Model.compile(jit_compile=...)`).

    Returns:
      dict with `step`, `start_step`, `val_top1`, `val_loss` (when `val_ds`), `train_loss`,
      `train_accuracy` (means over the last `log_every` steps, resumed runs included),
      `images_per_sec` (all timed steps of this
      call: images / seconds), `images_per_sec_median` (median over those steps) and `wall_s`.
    """
    t0 = time.perf_counter()
    steps = int(steps)
    if steps <= 0:
        raise ValueError(f"steps must be > 0, got {steps}")
    strategy = strategy or tf.distribute.get_strategy()
    replicas = strategy.num_replicas_in_sync
    chief = is_chief(strategy)

    with strategy.scope():
        if isinstance(model, Distiller):
            distiller = model
            if label_smoothing is not None:
                distiller.label_smoothing = float(label_smoothing)
        else:
            distiller = Distiller(model, kind="none", label_smoothing=label_smoothing or 0.0)
        student = distiller.student
        if not all(strategy.extended.variable_created_in_scope(v) for v in student.variables):
            raise ValueError("build the student (and teacher) under `strategy.scope()` of the "
                             "strategy passed to train()")
        _check_precision(student, mixed_precision)
        optimizer = make_optimizer(student.trainable_variables, lr=lr, weight_decay=weight_decay,
                                   steps=steps, warmup_steps=warmup_steps, min_lr=min_lr,
                                   warmup_init_lr=warmup_init_lr, clip_norm=clip_norm)
        distiller.compile(optimizer=optimizer, jit_compile=bool(jit_compile))
        step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        recent_var = tf.Variable(tf.fill([min(max(1, int(log_every)), steps), 2], float("nan")),
                                 trainable=False, name="recent_train_figures")
        ckpt = tf.train.Checkpoint(model=student, optimizer=optimizer, step=step_var,
                                   rng=_random_generators(student), recent=recent_var)

    ckpt_dir = os.path.join(workdir, "ckpt")
    # Every worker saves (saving distributed variables may need all of them), but only the chief
    # into `ckpt`: the others write to a private temporary folder deleted at the end, and every
    # worker restores from the chief's folder (TF's multi-worker pattern; `workdir` must be on
    # storage that every host sees).
    scratch = None if chief else tempfile.mkdtemp(prefix="ckpt-nonchief-")
    manager = tf.train.CheckpointManager(ckpt, scratch or ckpt_dir,
                                         max_to_keep=1 if scratch else max_to_keep)
    latest = tf.train.latest_checkpoint(ckpt_dir)
    start = 0
    if latest:
        ckpt.restore(latest).assert_existing_objects_matched()
        start = int(step_var.numpy())
        if int(optimizer.iterations.numpy()) != start:
            raise RuntimeError(f"checkpoint step {start} != optimizer iterations "
                               f"{int(optimizer.iterations.numpy())}")
        if verbose and chief:
            print(f"resumed from {latest} at step {start}/{steps}", flush=True)
    if start > steps:
        raise ValueError(f"the checkpoint is at step {start}, beyond steps={steps}")

    logdir = logdir or os.path.join(workdir, "tb")
    writer = tf.summary.create_file_writer(logdir) if chief else None
    engine = _Engine(start_step=start, total_steps=steps, manager=manager, step_var=step_var,
                     recent_var=recent_var,
                     schedule=WarmupCosine(lr, steps, warmup_steps, min_lr, warmup_init_lr),
                     writer=writer,
                     checkpoint_every=checkpoint_every, log_every=log_every,
                     verbose=verbose and chief)
    chunk = int(eval_every or steps)
    all_callbacks = [*callbacks, engine]

    def dataset_at(step):
        if callable(train_ds) and not isinstance(train_ds, tf.data.Dataset):
            ds = train_ds(step)
        else:
            if step and verbose and chief:
                print(f"warning: train_ds is a dataset, not a factory: step {step} starts it "
                      "from its beginning", flush=True)
            ds = train_ds
        if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            ds = ds.with_options(_data_sharding())
        return _check_divisible(ds, replicas) if replicas > 1 else ds

    try:
        for first, per_epoch, epochs in _segments(start, steps, chunk):
            initial = first // chunk
            distiller.fit(dataset_at(first), steps_per_epoch=per_epoch, initial_epoch=initial,
                          epochs=initial + epochs, validation_data=val_ds,
                          callbacks=all_callbacks, verbose=0)
        if engine.step != steps:
            raise RuntimeError(f"trained to step {engine.step}, expected {steps}")
        if engine.last_saved != steps or not manager.latest_checkpoint:
            engine.save()
        if int(optimizer.iterations.numpy()) != steps:
            raise RuntimeError(f"optimizer iterations {int(optimizer.iterations.numpy())} != "
                               f"{steps}")
    finally:
        engine.close()
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)

    metrics = {"step": engine.step, "start_step": start}
    if engine.val:
        metrics.update(engine.val)
    elif val_ds is not None:  # nothing was trained (already finished): evaluate now
        res = distiller.evaluate(val_ds, verbose=0, return_dict=True)
        metrics.update(val_top1=float(res["accuracy"]), val_loss=float(res["loss"]))
    metrics.update(engine.train_figures())
    if engine.timed_seconds:
        metrics["images_per_sec"] = engine.timed_images / engine.timed_seconds
        rates = sorted(engine.step_rates)
        metrics["images_per_sec_median"] = rates[len(rates) // 2]
    metrics["wall_s"] = time.perf_counter() - t0
    return metrics
