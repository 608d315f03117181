"""What every stage shares (`Run`): the config, the data sources, the distribution strategy,
the teacher's record, and the helpers the stage modules call: the student and teacher models of
finished stages, training with evaluation, the teacher cache, the rows of results.csv."""

from __future__ import annotations

import importlib
import os
import pathlib
import tempfile
import time

import numpy as np
from absl import logging

import models
from experiments.workdir import StageDir
from models.compat import keras

EXPORT_STAGES = ("distill", "prune", "qat")
TRAINING_STAGES = ("teacher", "distill", "prune", "qat")


class StageRefused(ValueError):
    """A stage's inputs fail a check that needs real work (e.g. timing a file), made when the
    stage starts and before it trains; the pipeline prints it as one line."""


class Run:
    """Everything one pipeline invocation shares: config, data sources, strategy, paths."""

    def __init__(self, *, student, teacher, data, workdir, config, strategy="default",
                 export_size=None, overwrite=False, teacher_record=None):
        from compress import training
        from experiments import data as input_data

        self.student, self.teacher_arg, self.data = student, teacher, data
        self.workdir = pathlib.Path(workdir)
        self.cfg = config
        self.overwrite = overwrite
        self.info = models.get_model_info(student)
        # a fixed-size student (EfficientFormer) is trained, evaluated and exported at its size
        self.export_size = self.info.input_size(export_size, config.export.size)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.tb = self.workdir / "tb"
        d = config.data
        self.train_src = input_data.load_source(data, "train",
                                                    limit_per_class=d.train_per_class or None)
        self.val_src = input_data.load_source(data, "val",
                                                  limit_per_class=d.val_per_class or None)
        self.num_classes = self.train_src.num_classes
        self.teacher_record = self._plan_teacher(teacher_record)
        self.strategy = training.get_strategy(strategy)
        self.replicas = self.strategy.num_replicas_in_sync
        # Multi-worker: every worker runs the training stages (collectives need all of them,
        # saving weights too); only the chief writes files and runs export, benchmark, report.
        self.chief = training.is_chief(self.strategy)
        if not self.chief:
            self.tb = pathlib.Path(tempfile.mkdtemp(prefix="tb-nonchief-"))  # pruning summaries

    def _plan_teacher(self, record):
        """The --teacher's record (models/teachers.py) with its head planned for the data's
        classes; a teacher that fits neither is refused here, before the first stage."""
        from models import teachers

        try:
            if record is None:
                record = teachers.resolve(self.teacher_arg,
                                          input_size=self.cfg.teacher.input_size or None)
            return teachers.plan_head(record, self.train_src.class_names)
        except ValueError as e:
            text = str(e)
            raise ValueError(f"--teacher{text}" if text.startswith("=") else
                             f"--teacher: {text}") from None

    @property
    def teacher_size(self) -> int:
        """The size the teacher sees its images at: --config.teacher.input_size, else the size
        its weights were made for."""
        rec = self.teacher_record
        if rec.kind in ("keras_file", "keras_app") and rec.input_size:
            return rec.input_size  # a Keras model built for one size runs at that size only
        return self.cfg.teacher.input_size or rec.input_size or 224

    # ------------------------------------------------------------------------------- a stage
    def run_stage(self, name: str) -> None:
        """Run stage `name` (experiments/stages/<name>.py) unless it is done: its fingerprint
        first, then its module's `run(ctx, stage)` under the stage's float policy."""
        if not self.chief and name not in TRAINING_STAGES:
            print(f"[{name}] left to the chief worker")
            return
        stage = StageDir(self.workdir, name, writes=self.chief)
        if self.overwrite:  # every stage, DONE first: a kill part-way leaves it unfinished
            stage.reset()
        if stage.done and not self.overwrite:
            logging.info("stage %s is DONE, skipped (use --overwrite to redo it)", name)
            print(f"[{name}] done already, skipped")
            return
        print(f"[{name}] starting")
        from compress import training
        from experiments import fingerprint

        fingerprint.prepare(self, stage)  # its begin() writes fingerprint.json before any work

        # Mixed precision speeds up the long float trainings; pruning wrappers, QAT fake-quant,
        # export and measurement run in float32.
        self.policy = training.set_mixed_precision(  # 'auto' resolved per device type
            self.cfg.mixed_precision if name in ("teacher", "distill") else "float32")
        importlib.import_module(f"experiments.stages.{name}").run(self, stage)

    def require(self, name: str) -> StageDir:
        """The folder of finished stage `name`; an error naming the stage when it is not."""
        stage = StageDir(self.workdir, name)
        if not stage.done:
            raise RuntimeError(f"stage {name!r} has not finished in {self.workdir}; run it first "
                               f"(--stages={name},...)")
        return stage

    # --------------------------------------------------------------------------- data helpers
    def sampler(self, section, *, size=None, batch=None):
        from experiments.data import MultiScaleSampler

        if size is not None:
            return MultiScaleSampler.fixed(size, batch, num_replicas=self.replicas)
        s = section.sampler
        if self.info.fixed_size:
            # EfficientFormer: the training graph is built at one size (its attention biases
            # are tied to the token grid), so every batch comes at that size, with the batch
            # that keeps the sampler's pixels per batch (base_size^2 x base_batch)
            return MultiScaleSampler(sizes=[self.info.default_size], base_size=s.base_size,
                                     base_batch=s.base_batch, seed=self.cfg.seed,
                                     num_replicas=self.replicas)
        if not s.multiscale:
            return MultiScaleSampler.fixed(s.base_size, s.base_batch, num_replicas=self.replicas)
        return MultiScaleSampler(min_size=s.min_size, max_size=s.max_size, n_scales=s.n_scales,
                                 base_size=s.base_size, base_batch=s.base_batch,
                                 seed=self.cfg.seed, num_replicas=self.replicas)

    def train_ds_factory(self, sampler, teacher_cache=None):
        from experiments import data as input_data

        d = self.cfg.data
        augment = input_data.Augment(scale=(d.scale_min, 1.0),
                                         randaugment=2 if d.randaugment else 0,
                                         mixup_alpha=d.mixup, cutmix_alpha=d.cutmix)

        def make(start_step: int):
            return input_data.train_dataset(self.train_src, sampler, start_step=start_step,
                                            augment=augment, seed=self.cfg.seed,
                                            crop_pct=d.crop_pct, teacher_cache=teacher_cache)

        return make

    def val_ds(self, size, limit=None):
        from experiments import data as input_data

        return input_data.eval_dataset(self.val_src, size=size,
                                       batch_size=self.cfg.eval_batch_size,
                                       crop_pct=self.cfg.data.crop_pct, limit=limit)

    # -------------------------------------------------------------------------- model helpers
    def build_student(self, input_size=None, *, training_heads=False, overrides=None):
        """The student; `overrides` (a stage's model.json `overrides`, e.g. the `widths` of a
        structured prune) rebuild that stage's architecture."""
        kwargs = dict(overrides or {})
        if training_heads and self.info.family == "efficientformer":
            kwargs["with_distillation_head"] = True
        if self.info.fixed_size and input_size is None:
            input_size = self.info.default_size
        return models.create_model(self.student, num_classes=self.num_classes,
                                   input_size=input_size, **kwargs)

    def load_teacher(self):
        return self.load_teacher_from(self.require("teacher"))

    def optim_kwargs(self, section):
        return dict(steps=section.steps, lr=section.lr, weight_decay=section.weight_decay,
                    warmup_steps=section.warmup_steps, min_lr=section.lr * section.min_lr_ratio,
                    label_smoothing=section.label_smoothing,
                    mixed_precision=self.policy, jit_compile=self.cfg.jit_compile)

    # ------------------------------------------------------------------- training, evaluation
    def fit(self, stage: StageDir, model_fn, sampler, section, *, tb_name, eval_size,
             callbacks_fn=None, teacher_cache=None):
        """Train `model_fn()` (built inside the strategy scope), then evaluate it at `eval_size`
        on the validation split, saving its per-image predictions in the stage folder."""
        from compress import training

        # The same seed gives the same initial weights and dropout draws (paired students:
        # the distilled one and its labels-only baseline start from identical weights).
        training.set_seed(self.cfg.seed, deterministic=self.cfg.deterministic)
        with self.strategy.scope():
            model = model_fn()
        callbacks = callbacks_fn() if callbacks_fn else []
        # eval_every > 0: the validation split at eval_size every that many steps (TensorBoard
        # val/top1 over steps, a progress line); the final evaluation below runs either way.
        every = int(section.get("eval_every", 0) or 0)
        metrics = training.train(
            model, self.train_ds_factory(sampler, teacher_cache), workdir=str(stage.path),
            logdir=str(self.tb / tb_name), strategy=self.strategy, callbacks=callbacks,
            checkpoint_every=section.checkpoint_every, **self.optim_kwargs(section),
            val_ds=self.val_ds(eval_size) if every else None, eval_every=every or None)
        metrics.update(self.evaluate_and_save(stage.path, model, eval_size,
                                              label_smoothing=section.label_smoothing,
                                              logdir=self.tb / tb_name, step=metrics["step"]))
        if metrics["step"] > metrics["start_step"]:
            metrics["s_per_step"] = metrics["wall_s"] / (metrics["step"] - metrics["start_step"])
        return model, metrics

    def val_logits(self, model, size, desc):
        """`(float32 logits, labels)` of `model` (a Distiller or a plain model) per batch of the
        whole validation split at `size`, in the split's order, under a progress bar `desc`."""
        from tqdm.auto import tqdm

        from models.compat import tf

        with tqdm(total=self.val_src.num_examples, desc=desc, unit="img",
                  disable=not self.chief) as bar:
            for images, y in self.val_ds(size):
                yield tf.cast(model(images, training=False), tf.float32), y
                bar.update(len(y))

    def evaluate_and_save(self, folder, model, size, *, label_smoothing=0.0, logdir=None,
                           step=0) -> dict:
        """Top-1 and label loss (smoothed as in training) of `model` (a Distiller or a plain
        model) on the whole validation split; its per-image predictions go to
        `folder/val_predictions.npy` for the paired gain (experiments.summary), and `val/top1`,
        `val/loss` to TensorBoard under `logdir`."""
        from compress.distill import label_loss
        from experiments.summary import save_predictions
        from models.compat import tf

        preds, losses, labels = [], [], []
        desc = f"[{os.path.basename(folder)}] validation"
        for logits, y in self.val_logits(model, size, desc):
            preds.append(np.argmax(logits.numpy(), -1))
            losses.append(label_loss(y, logits, label_smoothing=label_smoothing).numpy())
            labels.append(y.numpy())
        preds, labels = np.concatenate(preds), np.concatenate(labels)
        out = {"val_top1": float((preds == labels).mean()),
               "val_loss": float(np.concatenate(losses).mean())}
        if not self.chief:  # the chief alone writes the run's files
            return out
        save_predictions(folder, preds)
        if logdir is not None:
            with tf.summary.create_file_writer(str(logdir)).as_default(step=step):
                tf.summary.scalar("val/top1", out["val_top1"])
                tf.summary.scalar("val/loss", out["val_loss"])
        return out

    def load_teacher_from(self, stage, *, build=True):
        """The frozen teacher saved in `stage` and the size it sees images at (`build=False`:
        None and the size)."""
        from models import teachers

        spec = stage.model_json()
        size = spec.get("input_size") or models.get_model_info(spec["name"]).default_size
        if not build:
            return None, size
        teacher = teachers.build(teachers.TeacherRecord.from_json(spec), spec["num_classes"])
        teacher.load_weights(str(stage.weights))
        teacher.trainable = False
        return teacher, size

    def teacher_cache(self):
        """The teacher's outputs on `distill.teacher_cache.views` recorded views of every
        training image (experiments.data.teacher_cache), built on first use (resuming a partial
        build) under distill/teacher_cache/ and shared by the distill, prune and QAT stages;
        None when `views` is 0 (the teacher then runs online in every step)."""
        c = self.cfg.distill.teacher_cache
        if not c.views:
            return None
        if getattr(self, "_teacher_cache", None) is None:
            from experiments.data import teacher_cache

            size = self.load_teacher_from(self.require("teacher"), build=False)[1]
            spec = teacher_cache.ViewSpec(
                views=c.views, top_k=min(c.top_k, self.num_classes),
                scale=(self.cfg.data.scale_min, 1.0), teacher_size=size, seed=self.cfg.seed)
            t0 = time.perf_counter()
            self._teacher_cache = teacher_cache.build(
                self.workdir / "distill" / "teacher_cache", self.train_src,
                lambda: self.load_teacher()[0], spec,
                teacher_weights=self.require("teacher").weights,
                images_per_shard=c.images_per_shard, batch_size=c.batch_size,
                precision=self.policy)
            self._teacher_cache_s = time.perf_counter() - t0
            keras.backend.clear_session()  # the teacher is not needed any more
        return self._teacher_cache

    def student_fit(self, stage, section, *, kind, alpha, temperature, student_fn, tb_name,
                    callbacks_fn=None):
        """Train a student with `section`'s optimiser and sampler, the teacher's part given by
        `kind`, `alpha` and `temperature`; the teacher's outputs come from the teacher cache
        when there is one, else from the teacher run on every batch."""
        from compress.distill import Distiller

        cache = self.teacher_cache() if kind != "none" else None
        use_teacher = kind != "none" and cache is None
        teacher, teacher_size = self.load_teacher() if use_teacher else (None, None)

        def build():
            return Distiller(student_fn(), teacher, kind=kind, alpha=alpha,
                             temperature=temperature, teacher_size=teacher_size,
                             label_smoothing=section.label_smoothing,
                             teacher_from_data=cache is not None)

        sampler = self.sampler(section)
        model, metrics = self.fit(stage, build, sampler, section, tb_name=tb_name,
                                  eval_size=self.export_size, callbacks_fn=callbacks_fn,
                                  teacher_cache=cache)
        if cache is not None:
            m = cache.manifest
            metrics["teacher_cache"] = {
                "views": m["views"], "top_k": m["top_k"], "path": str(cache.path),
                "bytes": int(cache.records.nbytes),
                "bytes_per_image_view": int(cache.records.itemsize // m["views"]),
                "build_s_per_view": m.get("build_s_per_view"),
                "build_s_this_stage": round(getattr(self, "_teacher_cache_s", 0.0), 1)}
            self._teacher_cache_s = 0.0  # counted once, by the stage that built it
        return model, metrics

    # ----------------------------------------------------------------- finished stages' models
    def overrides(self, stage_name) -> dict:
        """The architecture overrides a finished stage's model was built with."""
        return self.require(stage_name).model_json().get("overrides") or {}

    def load_student(self, stage_name, *, input_size=None, training_heads=False):
        src = self.require(stage_name)
        model = self.build_student(input_size, training_heads=training_heads,
                                   overrides=self.overrides(stage_name))
        model.load_weights(str(src.weights))
        return model

    def prune_facts(self, stage_name) -> dict:
        """`prune_method` and `kept_fraction` of a stage's model (results.csv columns): the
        prune stage's, inherited by a QAT stage trained from it; none / 1 for a dense one."""
        spec = self.require(stage_name).model_json()
        if stage_name == "qat" and spec.get("source_stage") == "prune":
            spec = self.require("prune").model_json()
        elif stage_name != "prune":
            return {"prune_method": "none", "kept_fraction": 1.0}
        if spec.get("prune_method") == "structured":
            return {"prune_method": "structured", "kept_fraction": spec["kept_fraction"]}
        return {"prune_method": "magnitude",
                "kept_fraction": 1.0 - spec.get("prune", {}).get("target_sparsity", 0.0)}

    def inference_model(self, stage_name, input_size):
        """Rebuild the inference graph of a finished stage at a fixed input size."""
        from compress import quantize

        src = self.require(stage_name)
        if stage_name != "qat":
            return self.load_student(stage_name, input_size=input_size)
        overrides = self.overrides(stage_name)
        train_model = quantize.apply_qat(self.build_student(input_size, training_heads=True,
                                                            overrides=overrides),
                                         preserve_sparsity=False)
        train_model.load_weights(str(src.weights))
        if self.info.family != "efficientformer":
            return train_model
        infer = quantize.apply_qat(self.build_student(input_size, overrides=overrides),
                                   preserve_sparsity=False)
        infer.set_weights(train_model.get_weights())
        return infer

    # ---------------------------------------------------------------------------- results.csv
    def forget_results(self, rel: str) -> None:
        """Drop the rows of `rel` from results.csv; benchmark and report are then unfinished."""
        self.keep_results(lambda r: r["path"] != rel)

    def keep_results(self, keep) -> None:
        """Keep the rows of results.csv where `keep(row)`; when any goes, benchmark and report
        are unfinished."""
        from compress.results import table

        if os.path.exists(table.results_path(str(self.workdir))):
            old = table.read_results(str(self.workdir))
            rows = [r for r in old if keep(r)]
            if len(rows) < len(old):
                for name in ("benchmark", "report"):
                    StageDir(self.workdir, name).clear_done()
                table.write_results(str(self.workdir), rows, merge=False)

    def distillation_gain(self) -> dict:
        """Teacher, labels-only and distilled top-1 and the paired gain (experiments.summary)."""
        from experiments import summary

        return summary.distillation_gain(self.workdir, self.val_src.labels,
                                         kind=self.cfg.distill.kind)
