"""The stages of `experiments.pipeline`, each reading the previous stage's folder.

teacher  -> teacher/   the --teacher resolved once (models/teachers.py): a registry model trained
                       from labels, a pretrained one whose ImageNet head is sliced to the data's
                       classes (no training), or one with a new head fine-tuned; saved with its
                       record in teacher/model.json
distill  -> distill/   the student trained from the frozen teacher (+ a labels-only baseline in
                       distill/baseline/; the teacher's outputs cached in distill/teacher_cache/)
prune    -> prune/     magnitude pruning while the teacher keeps teaching; stored stripped
qat      -> qat/       quantization-aware fine-tuning (sparsity preserved) with the teacher
export   -> export/    <model>.<stage>.<format>.tflite, audited (ops, partitions, parity)
benchmark-> results.csv  latency, accuracy and agreement of every file
report   -> report.md, *.png, tb/hparams

Every training stage also saves `val_predictions.npy` (its predicted class per validation
image), which the report pairs to measure the distillation gain (experiments/summary.py).
"""

from __future__ import annotations

import glob
import os
import pathlib
import tempfile
import time

import numpy as np
from absl import logging

import models
from experiments.workdir import StageDir, atomic_copy, read_json, write_json
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

    # ---------------------------------------------------------------------------------------
    def run_stage(self, name: str) -> None:
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
        getattr(self, f"stage_{name}")(stage)

    def _require(self, name: str) -> StageDir:
        stage = StageDir(self.workdir, name)
        if not stage.done:
            raise RuntimeError(f"stage {name!r} has not finished in {self.workdir}; run it first "
                               f"(--stages={name},...)")
        return stage

    # --------------------------------------------------------------------------- data helpers
    def _sampler(self, section, *, size=None, batch=None):
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

    def _train_ds_factory(self, sampler, teacher_cache=None):
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

    def _val_ds(self, size, limit=None):
        from experiments import data as input_data

        return input_data.eval_dataset(self.val_src, size=size,
                                       batch_size=self.cfg.eval_batch_size,
                                       crop_pct=self.cfg.data.crop_pct, limit=limit)

    # --------------------------------------------------------------------------- model helpers
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
        return self.load_teacher_from(self._require("teacher"))

    def _optim_kwargs(self, section):
        return dict(steps=section.steps, lr=section.lr, weight_decay=section.weight_decay,
                    warmup_steps=section.warmup_steps, min_lr=section.lr * section.min_lr_ratio,
                    label_smoothing=section.label_smoothing,
                    mixed_precision=self.policy, jit_compile=self.cfg.jit_compile)

    def _fit(self, stage: StageDir, model_fn, sampler, section, *, tb_name, eval_size,
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
            model, self._train_ds_factory(sampler, teacher_cache), workdir=str(stage.path),
            logdir=str(self.tb / tb_name), strategy=self.strategy, callbacks=callbacks,
            checkpoint_every=section.checkpoint_every, **self._optim_kwargs(section),
            val_ds=self._val_ds(eval_size) if every else None, eval_every=every or None)
        metrics.update(self._evaluate_and_save(stage.path, model, eval_size,
                                               label_smoothing=section.label_smoothing,
                                               logdir=self.tb / tb_name, step=metrics["step"]))
        if metrics["step"] > metrics["start_step"]:
            metrics["s_per_step"] = metrics["wall_s"] / (metrics["step"] - metrics["start_step"])
        return model, metrics

    def _evaluate_and_save(self, folder, model, size, *, label_smoothing=0.0, logdir=None,
                           step=0) -> dict:
        """Top-1 and label loss (smoothed as in training) of `model` (a Distiller or a plain
        model) on the whole validation split; its per-image predictions go to
        `folder/val_predictions.npy` for the paired gain (experiments.summary), and `val/top1`,
        `val/loss` to TensorBoard under `logdir`."""
        from tqdm.auto import tqdm

        from compress.distill import label_loss
        from experiments.summary import save_predictions
        from models.compat import tf

        preds, losses, labels = [], [], []
        desc = f"[{os.path.basename(folder)}] validation"
        with tqdm(total=self.val_src.num_examples, desc=desc, unit="img",
                  disable=not self.chief) as bar:
            for images, y in self._val_ds(size):
                logits = tf.cast(model(images, training=False), tf.float32)
                preds.append(np.argmax(logits.numpy(), -1))
                losses.append(label_loss(y, logits, label_smoothing=label_smoothing).numpy())
                labels.append(y.numpy())
                bar.update(len(labels[-1]))
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

    # ---------------------------------------------------------------------------------- stages
    def stage_teacher(self, stage: StageDir) -> None:
        """The teacher as its record says: copied from a teacher folder; pretrained with its head
        kept or sliced to the data's classes (evaluated, no training); or trained from labels or
        fine-tuned with a new head. `teacher/model.json` holds the record."""
        from compress.distill import Distiller
        from models import teachers

        t, rec, size = self.cfg.teacher, self.teacher_record, self.teacher_size
        stage.begin({"teacher": self.teacher_arg, **t.to_dict()})
        record = {**rec.to_json(), "name": rec.architecture, "num_classes": self.num_classes,
                  "input_size": size}
        if rec.kind == "folder":
            if stage.writes:  # a non-chief worker reads the source folder instead
                atomic_copy(rec.weights, stage.weights)
            stage.save_model_json(**record)
            teacher = self.load_teacher_from(stage if stage.writes else
                                             StageDir(*os.path.split(rec.source)))[0]
            m = self._evaluate_and_save(stage.path, teacher, size)
            stage.finish({**m, "source": rec.source, "head": rec.head, "step": 0})
            return
        if not rec.trains:  # pretrained, teaching from step 0
            teacher = teachers.build(rec, self.num_classes, pretrained=True)
            stage.save_weights(teacher)
            stage.save_model_json(**record)
            m = self._evaluate_and_save(stage.path, teacher, size, logdir=self.tb / "teacher")
            stage.finish({**m, "source": rec.source, "head": rec.head, "step": 0})
            return

        def build():
            return Distiller(teachers.build(rec, self.num_classes, pretrained=True), None,
                             label_smoothing=t.label_smoothing)

        distiller, metrics = self._fit(stage, build, self._sampler(None, size=size,
                                                                   batch=t.batch_size),
                                       t, tb_name="teacher", eval_size=size)
        stage.save_weights(distiller.student)
        stage.save_model_json(**record)
        stage.finish({**metrics, "source": rec.source, "head": rec.head})

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

            size = self.load_teacher_from(self._require("teacher"), build=False)[1]
            spec = teacher_cache.ViewSpec(
                views=c.views, top_k=min(c.top_k, self.num_classes),
                scale=(self.cfg.data.scale_min, 1.0), teacher_size=size, seed=self.cfg.seed)
            t0 = time.perf_counter()
            self._teacher_cache = teacher_cache.build(
                self.workdir / "distill" / "teacher_cache", self.train_src,
                lambda: self.load_teacher()[0], spec,
                teacher_weights=self._require("teacher").weights,
                images_per_shard=c.images_per_shard, batch_size=c.batch_size,
                precision=self.policy)
            self._teacher_cache_s = time.perf_counter() - t0
            keras.backend.clear_session()  # the teacher is not needed any more
        return self._teacher_cache

    def _student_fit(self, stage, section, *, kind, alpha, student_fn, tb_name, callbacks_fn=None):
        """Train a student with `section`'s optimiser, sampler and temperature; the teacher's
        outputs come from the teacher cache when there is one, else from the teacher run on
        every batch."""
        from compress.distill import Distiller

        cache = self.teacher_cache() if kind != "none" else None
        use_teacher = kind != "none" and cache is None
        teacher, teacher_size = self.load_teacher() if use_teacher else (None, None)

        def build():
            return Distiller(student_fn(), teacher, kind=kind, alpha=alpha,
                             temperature=section.temperature, teacher_size=teacher_size,
                             label_smoothing=section.label_smoothing,
                             teacher_from_data=cache is not None)

        sampler = self._sampler(section)
        model, metrics = self._fit(stage, build, sampler, section, tb_name=tb_name,
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

    def stage_distill(self, stage: StageDir) -> None:
        d = self.cfg.distill
        stage.begin({"student": self.student, **d.to_dict()})
        metrics = {}
        if d.baseline and d.kind != "none":
            base = stage.child("baseline")
            if not base.done:
                base.begin({"kind": "none"})
                distiller, m = self._student_fit(base, d, kind="none", alpha=0.0,
                                                 student_fn=lambda: self.build_student(
                                                     training_heads=True),
                                                 tb_name="distill_baseline")
                base.save_weights(distiller.student)
                base.finish(m)
            metrics["baseline_val_top1"] = base.metrics().get("val_top1")
        distiller, m = self._student_fit(stage, d, kind=d.kind, alpha=d.alpha,
                                         student_fn=lambda: self.build_student(training_heads=True),
                                         tb_name="distill")
        stage.save_weights(distiller.student)
        stage.save_model_json(name=self.student, num_classes=self.num_classes)
        stage.finish({**m, **metrics})

    def _overrides(self, stage_name) -> dict:
        """The architecture overrides a finished stage's model was built with."""
        return self._require(stage_name).model_json().get("overrides") or {}

    def _load_student(self, stage_name, *, input_size=None, training_heads=False):
        src = self._require(stage_name)
        model = self.build_student(input_size, training_heads=training_heads,
                                   overrides=self._overrides(stage_name))
        model.load_weights(str(src.weights))
        return model

    def _prune_kwargs(self):
        p = self.cfg.prune
        return dict(target_sparsity=p.target_sparsity, schedule=p.schedule,
                    begin_step=int(p.begin_frac * p.steps), end_step=max(1, int(p.end_frac * p.steps)),
                    frequency=p.frequency, m_by_n=(2, 4) if p.m_by_n == "2:4" else None,
                    skip=tuple(p.skip))

    def stage_prune(self, stage: StageDir) -> None:
        from compress import prune

        p = self.cfg.prune
        stage.begin({"student": self.student, **p.to_dict()})
        if p.method == "structured":
            if p.target_ms:
                self._check_latency_budget()
            self._prune_structured(stage)
            return

        def student_fn():
            return prune.apply_pruning(self._load_student("distill", training_heads=True),
                                       **self._prune_kwargs())

        distiller, m = self._student_fit(
            stage, p, kind=p.kind, alpha=p.kd_alpha, student_fn=student_fn,
            tb_name="prune", callbacks_fn=lambda: prune.pruning_callbacks(str(self.tb / "prune")))
        stripped = prune.strip(distiller.student)
        report = prune.sparsity_report(stripped)
        stage.save_weights(stripped)
        stage.save_model_json(name=self.student, num_classes=self.num_classes, wrappers=["prune"],
                              prune=self._prune_kwargs())
        stage.write_json("sparsity.json", report)
        overall = report.get("overall", {})
        stage.finish({**m, "sparsity": overall.get("sparsity") if isinstance(overall, dict) else overall})

    def _prune_structured(self, stage: StageDir) -> None:
        """Cut the distilled student to `prune.keep` of its MACs (compress/structured.py), then
        fine-tune the smaller dense model with the teacher as the magnitude prune does."""
        from compress import structured
        from compress.distill import Distiller

        p = self.cfg.prune
        cut_path = stage.path / "structured.json"

        def student_fn():
            if cut_path.exists():  # resumed: the same widths; the checkpoint holds the weights
                return self.build_student(training_heads=True,
                                          overrides={"widths": read_json(cut_path)["widths"]})
            dense = self._load_student("distill", training_heads=True)
            teacher, teacher_size = self.load_teacher() if p.kind != "none" else (None, None)
            objective = Distiller(dense, teacher, kind=p.kind, alpha=p.kd_alpha,
                                  temperature=p.temperature, teacher_size=teacher_size,
                                  label_smoothing=p.label_smoothing).batch_loss
            size = dense.input_shape[1] or self.export_size
            batches = self._train_ds_factory(self._sampler(
                None, size=size, batch=p.sampler.base_batch))(0)
            plan = structured.plan(dense, input_size=size, importance=p.importance,
                                   min_width=p.min_width, batches=batches.take(p.score_batches),
                                   loss_fn=objective)
            keep, budget = p.keep, {}
            if p.target_ms:
                keep, budget = self._keep_for_latency(stage, plan, structured.min_keep(
                    dense, size, p.min_width))
            small, cut = structured.cut(
                dense, lambda w: self.build_student(training_heads=True, overrides={"widths": w}),
                plan, keep=keep, input_size=size)
            cut.update(budget)
            write_json(cut_path, cut)
            print(f"[prune] structured: {cut['kept_fraction']:.3f} of {cut['dense_macs']:,} "
                  f"MACs kept ({p.importance} importance), widths {cut['widths']}")
            return small

        distiller, m = self._student_fit(stage, p, kind=p.kind, alpha=p.kd_alpha,
                                         student_fn=student_fn, tb_name="prune")
        cut = read_json(cut_path)
        stage.save_weights(distiller.student)
        stage.save_model_json(name=self.student, num_classes=self.num_classes,
                              overrides={"widths": cut["widths"]}, prune_method="structured",
                              kept_fraction=cut["kept_fraction"])
        params = int(sum(np.prod(w.shape) for w in distiller.student.trainable_weights))
        stage.finish({**m, "kept_fraction": cut["kept_fraction"], "macs": cut["macs"],
                      "dense_macs": cut["dense_macs"], "params": params})

    def _check_latency_budget(self) -> None:
        """`prune.target_ms`: the smallest model structured pruning reaches (its widths do not
        depend on the scores) must run in the budget, timed as the cuts are (its int8 file on
        this host's XNNPACK; about half a minute), before the stage trains. StageRefused
        otherwise."""
        from compress import structured
        from experiments.benchmark import int8_latency_ms

        p, e, size = self.cfg.prune, self.cfg.export, self.export_size
        dense = self.build_student(size)
        small = self.build_student(size, overrides={"widths": structured.smallest_widths(
            dense, p.min_width)})
        with tempfile.TemporaryDirectory() as tmp:
            ms = int8_latency_ms(small, os.path.join(tmp, "smallest.int8.tflite"),
                                 input_size=size, threads=p.target_threads,
                                 deny_amx=self.cfg.benchmark.deny_amx,
                                 xnnpack_friendly=e.xnnpack_friendly,
                                 float_layers=e.float_layers)
        keras.backend.clear_session()
        if ms > p.target_ms:
            raise StageRefused(
                f"--config.prune.target_ms={p.target_ms:g} is out of reach for {self.student} "
                f"at {size} px: its smallest structured cut (--config.prune.min_width="
                f"{p.min_width}) runs in {ms:.2f} ms as int8 on this host's XNNPACK at "
                f"--config.prune.target_threads={p.target_threads}")

    def _keep_for_latency(self, stage: StageDir, plan, smallest: float):
        """`prune.target_ms`: the largest MAC fraction whose cut of `plan`, exported as the
        export stage's int8 file at its size, runs in the budget on this host's XNNPACK at
        `prune.target_threads` (compress.structured.keep_for_latency); the probed files stay in
        prune/latency_probe/. Returns (keep, facts for structured.json)."""
        from compress import structured
        from experiments.benchmark import int8_latency_ms

        p, e, size = self.cfg.prune, self.cfg.export, self.export_size
        probe_dir = stage.path / "latency_probe"

        def latency_of(keep):
            widths = structured.widths_for(plan, keep)
            model = self.build_student(size, overrides={"widths": widths})
            ms = int8_latency_ms(model, str(probe_dir / f"keep{keep:.4f}.int8.tflite"),
                                 input_size=size, threads=p.target_threads,
                                 deny_amx=self.cfg.benchmark.deny_amx,
                                 xnnpack_friendly=e.xnnpack_friendly, float_layers=e.float_layers)
            print(f"[prune] latency budget {p.target_ms:g} ms: keep {keep:.3f} runs in "
                  f"{ms:.2f} ms ({p.target_threads} thread(s), int8, {size} px)", flush=True)
            return ms

        keep, ms, trials = structured.keep_for_latency(latency_of, p.target_ms,
                                                       lo=min(1.0, smallest + 1e-6))
        return keep, {"target_ms": p.target_ms, "target_threads": p.target_threads,
                      "measured_ms": ms, "keep": keep, "latency_probes": trials}

    def prune_facts(self, stage_name) -> dict:
        """`prune_method` and `kept_fraction` of a stage's model (results.csv columns): the
        prune stage's, inherited by a QAT stage trained from it; none / 1 for a dense one."""
        spec = self._require(stage_name).model_json()
        if stage_name == "qat" and spec.get("source_stage") == "prune":
            spec = self._require("prune").model_json()
        elif stage_name != "prune":
            return {"prune_method": "none", "kept_fraction": 1.0}
        if spec.get("prune_method") == "structured":
            return {"prune_method": "structured", "kept_fraction": spec["kept_fraction"]}
        return {"prune_method": "magnitude",
                "kept_fraction": 1.0 - spec.get("prune", {}).get("target_sparsity", 0.0)}

    def stage_qat(self, stage: StageDir) -> None:
        from compress import quantize

        q = self.cfg.qat
        stage.begin({"student": self.student, **q.to_dict()})
        source = "prune" if StageDir(self.workdir, "prune").done else "distill"
        # a structured prune leaves no zeros to preserve, only a smaller model
        sparse = source == "prune" and "prune" in self._require(source).model_json()["wrappers"]

        def student_fn():
            return quantize.apply_qat(self._load_student(source, training_heads=True),
                                      preserve_sparsity=q.preserve_sparsity and sparse)

        distiller, m = self._student_fit(stage, q, kind=q.kind, alpha=q.kd_alpha,
                                         student_fn=student_fn, tb_name="qat")
        stage.save_weights(distiller.student)
        stage.save_model_json(name=self.student, num_classes=self.num_classes,
                              overrides=self._overrides(source),
                              wrappers=["prune", "qat"] if sparse else ["qat"],
                              source_stage=source)
        stage.finish(m)

    # ---------------------------------------------------------------------------------- export
    def inference_model(self, stage_name, input_size):
        """Rebuild the inference graph of a finished stage at a fixed input size."""
        from compress import quantize

        src = self._require(stage_name)
        if stage_name != "qat":
            return self._load_student(stage_name, input_size=input_size)
        overrides = self._overrides(stage_name)
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

    def stage_export(self, stage: StageDir) -> None:
        from compress.tflite.audit import audit_tflite
        from compress.tflite.convert import export_tflite
        from experiments.data import representative_images

        e, size = self.cfg.export, self.export_size
        stage.begin({"size": size, **e.to_dict()})
        rep = representative_images(self.train_src, size, e.representative_images,
                                    seed=self.cfg.seed, crop_pct=self.cfg.data.crop_pct)
        manifest_path = stage.path / "manifest.json"
        manifest = read_json(manifest_path) if manifest_path.exists() else {}
        for stage_name in EXPORT_STAGES:
            if not StageDir(self.workdir, stage_name).done:
                print(f"[export] {stage_name} not trained, skipped")
                continue
            model = self.inference_model(stage_name, size)
            formats = e.formats[stage_name]
            if self.prune_facts(stage_name)["prune_method"] == "structured":
                formats = [f for f in formats if not f.endswith("_sparse")]  # dense: no zeros
            for fmt in formats:
                rel = f"export/{self.student}.{stage_name}.{fmt}.tflite"
                if rel in manifest and (self.workdir / rel).exists():
                    continue
                meta = export_tflite(model, str(self.workdir / rel), fmt=fmt, input_size=size,
                                     representative=rep, xnnpack_friendly=e.xnnpack_friendly,
                                     float_layers=e.float_layers)
                self._forget_results(rel)  # rows measured on an older file of that name
                manifest[rel] = {"stage": stage_name, "format": fmt, "input_size": size,
                                 **meta, "audit": audit_tflite(str(self.workdir / rel))}
                write_json(manifest_path, manifest)
                print(f"[export] {rel}: {meta.get('size_bytes', 0):,} bytes")
            keras.backend.clear_session()
        stage.finish({"files": sorted(manifest)})

    def _forget_results(self, rel: str) -> None:
        """Drop the rows of `rel` from results.csv; benchmark and report are then unfinished."""
        self._keep_results(lambda r: r["path"] != rel)

    def _keep_results(self, keep) -> None:
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

    # ------------------------------------------------------------------------------- benchmark
    def stage_benchmark(self, stage: StageDir) -> None:
        from compress.measure.costs import static_costs
        from experiments import fingerprint
        from experiments.benchmark import benchmark_files

        b = self.cfg.benchmark
        stage.begin(b.to_dict())
        manifest = read_json(self._require("export").path / "manifest.json")
        if self.overwrite:  # measure every file again; without --overwrite, finished rows stay
            for rel in manifest:
                self._forget_results(rel)
        fp = stage.provenance.get("fingerprint")
        self._keep_results(lambda r: r.get("benchmark_fingerprint") == fp and r["path"] in manifest)
        size = self.export_size
        val = self._val_ds(size, limit=b.val_limit or None)  # a class-balanced subset
        val = [(x.numpy(), y.numpy()) for x, y in val]  # scored once per file, same images
        per_stage = {}  # stage -> (Keras top-1 per image, static costs), computed once

        def stage_facts(stage_name):
            if stage_name not in per_stage:
                model = self.inference_model(stage_name, size)
                preds = np.concatenate([np.argmax(model(x, training=False).numpy(), -1)
                                        for x, _ in val])
                per_stage[stage_name] = (preds, static_costs(model, size))
                keras.backend.clear_session()
            return per_stage[stage_name]

        def rel(path):
            return os.path.relpath(path, self.workdir)

        def file_info(path):
            meta = manifest[rel(path)]
            costs = stage_facts(meta["stage"])[1]
            return {"model": self.student, "stage": meta["stage"], "format": meta["format"],
                    "input_size": size, "params": costs["params"], "macs": costs["macs"],
                    "memory_traffic_bytes": costs["memory_traffic_bytes"],
                    "sparsity": meta["audit"].get("sparsity"), **self.prune_facts(meta["stage"]),
                    **fingerprint.row_columns(self.workdir, meta["stage"], fp)}

        threads = [t or os.cpu_count() for t in b.threads]
        benchmark_files(
            str(self.workdir), [str(self.workdir / r) for r in sorted(manifest)],
            threads=threads, delegates=list(b.delegates), warmup=b.warmup, runs=b.runs,
            input_size=size, dataset=val, file_info=file_info, deny_amx=b.deny_amx,
            reference_predictions=lambda path: stage_facts(manifest[rel(path)]["stage"])[0])
        stage.finish({"files": len(manifest)})

    def distillation_gain(self) -> dict:
        """Teacher, labels-only and distilled top-1 and the paired gain (experiments.summary)."""
        from experiments import summary

        return summary.distillation_gain(self.workdir, self.val_src.labels,
                                         kind=self.cfg.distill.kind)

    def teacher_line(self) -> str:
        """report.md's second line: where the teacher came from, how its head was made, its
        top-1, and what its cached outputs cost."""
        t = StageDir(self.workdir, "teacher")
        if not t.done:
            return "Teacher: not run in this workdir."
        spec, m = t.model_json(), t.metrics()
        rec = spec.get("kind") and spec
        what = (f"{rec['architecture']} ({rec['kind']}, weights {rec['weights']}), head "
                f"{rec.get('head') or 'as saved'}" if rec else spec["name"])
        line = (f"Teacher: {what}; top-1 {_pct(m.get('val_top1'))} at {spec.get('input_size')} px "
                f"(Keras, whole validation split), {m.get('step', 0)} training steps.")
        cache = StageDir(self.workdir, "distill").metrics().get("teacher_cache")
        if cache:
            line += (f" Teacher cache: {cache['views']} views per image, "
                     f"{cache.get('build_s_this_stage', 0) / 60:.1f} min to build "
                     f"({cache['bytes'] / 2**20:.1f} MiB).")
        return line

    def stage_report(self, stage: StageDir) -> None:
        from compress.results import table
        from compress.results.hparams import write_hparams
        from compress.results.report import write_report
        from experiments import fingerprint, summary

        stage.begin({})
        report = write_report(str(self.workdir), title=f"{self.student} from "
                              f"{self.teacher_arg} ({self.cfg.preset} preset)")
        gain = self.distillation_gain()
        summary.insert_after_title(report, fingerprint.report_lines(self.workdir))
        summary.insert_after_title(report, [gain["line"], "", self.teacher_line()])
        rows = table.read_results(str(self.workdir))
        for r in rows:  # the run's training figures, appended columns (read by name)
            r.update(teacher_top1=gain["teacher_top1"], baseline_top1=gain["baseline_top1"])
        table.write_results(str(self.workdir), rows, merge=False)
        write_hparams(str(self.workdir), [
            *({**r, "distill.kind": self.cfg.distill.kind} for r in rows),  # each file's student
            *summary.student_trials(gain, model=self.student, input_size=self.export_size)])
        lines = ["", "## Training stages (Keras, validation split)", "",
                 "| stage | val top-1 | steps | minutes | note |", "|---|---|---|---|---|"]
        for name in ("teacher", "distill", "prune", "qat"):
            m = StageDir(self.workdir, name).metrics()
            if not m:
                continue
            note = {"teacher": f"{self.teacher_arg}: head {m.get('head', 'trained')}",
                    "distill": f"{self.cfg.distill.kind} KD, alpha {self.cfg.distill.alpha}, "
                               f"T {self.cfg.distill.temperature}" + (
                                   f", teacher cache of {m['teacher_cache']['views']} views"
                                   if m.get("teacher_cache") else ""),
                    "prune": f"sparsity {m.get('sparsity', float('nan')):.3f}",
                    "qat": "fake-quant model"}[name]
            minutes = f"{m['wall_s'] / 60:.1f}" if m.get("wall_s") else ""
            lines.append(f"| {name} | {_pct(m.get('val_top1'))} | {m.get('step', '')} | "
                         f"{minutes} | {note} |")
            if name == "distill" and m.get("baseline_val_top1") is not None:
                lines.append(f"| labels-only baseline | {_pct(m['baseline_val_top1'])} | | | "
                             "same student, steps and data, no teacher |")
        with open(report, "a") as f:
            f.write("\n".join(lines) + "\n")
        stage.finish({"report": report,
                      "plots": sorted(glob.glob(str(self.workdir / "*.png")))})


def _pct(value) -> str:
    return "" if value is None else f"{100 * float(value):.1f}%"
