"""The stages of `experiments.pipeline`, each reading the previous stage's folder.

teacher  -> teacher/   a ViT trained from labels, loaded from a folder, or a Google .npz fine-tuned
distill  -> distill/   the student trained from the frozen teacher (+ a labels-only baseline)
prune    -> prune/     magnitude pruning while the teacher keeps teaching; stored stripped
qat      -> qat/       quantization-aware fine-tuning (sparsity preserved) with the teacher
export   -> export/    <model>.<stage>.<format>.tflite, audited (ops, partitions, parity)
benchmark-> results.csv  latency, accuracy and agreement of every file
report   -> report.md, *.png, tb/hparams
"""

from __future__ import annotations

import glob
import os
import pathlib
import shutil
import tempfile

import numpy as np
from absl import logging

import models
from experiments.workdir import StageDir, read_json, write_json
from models.compat import keras

EXPORT_STAGES = ("distill", "prune", "qat")
TRAINING_STAGES = ("teacher", "distill", "prune", "qat")


class Run:
    """Everything one pipeline invocation shares: config, data sources, strategy, paths."""

    def __init__(self, *, student, teacher, data, workdir, config, strategy="default",
                 export_size=None, overwrite=False):
        from compress import training
        from experiments import data as input_data

        self.student, self.teacher_arg, self.data = student, teacher, data
        self.workdir = pathlib.Path(workdir)
        self.cfg = config
        self.overwrite = overwrite
        self.info = models.get_model_info(student)
        self.export_size = export_size or config.export.size or self.info.default_size
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.tb = self.workdir / "tb"
        d = config.data
        self.train_src = input_data.load_source(data, "train",
                                                    limit_per_class=d.train_per_class or None)
        self.val_src = input_data.load_source(data, "val",
                                                  limit_per_class=d.val_per_class or None)
        self.num_classes = self.train_src.num_classes
        self.strategy = training.get_strategy(strategy)
        self.replicas = self.strategy.num_replicas_in_sync
        # Multi-worker: every worker runs the training stages (collectives need all of them,
        # saving weights too); only the chief writes files and runs export, benchmark, report.
        self.chief = training.is_chief(self.strategy)
        if not self.chief:
            self.tb = pathlib.Path(tempfile.mkdtemp(prefix="tb-nonchief-"))  # pruning summaries

    # ---------------------------------------------------------------------------------------
    def run_stage(self, name: str) -> None:
        if not self.chief and name not in TRAINING_STAGES:
            print(f"[{name}] left to the chief worker")
            return
        stage = StageDir(self.workdir, name, writes=self.chief)
        if self.overwrite and name in ("teacher", "distill", "prune", "qat", "export"):
            stage.reset()
        if stage.done and not self.overwrite:
            logging.info("stage %s is DONE, skipped (use --overwrite to redo it)", name)
            print(f"[{name}] done already, skipped")
            return
        print(f"[{name}] starting")
        from compress import training

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
        if not s.multiscale:
            return MultiScaleSampler.fixed(s.base_size, s.base_batch, num_replicas=self.replicas)
        return MultiScaleSampler(min_size=s.min_size, max_size=s.max_size, n_scales=s.n_scales,
                                 base_size=s.base_size, base_batch=s.base_batch,
                                 seed=self.cfg.seed, num_replicas=self.replicas)

    def _train_ds_factory(self, sampler):
        from experiments import data as input_data

        d = self.cfg.data
        augment = input_data.Augment(scale=(d.scale_min, 1.0),
                                         randaugment=2 if d.randaugment else 0,
                                         mixup_alpha=d.mixup, cutmix_alpha=d.cutmix)

        def make(start_step: int):
            return input_data.train_dataset(self.train_src, sampler, start_step=start_step,
                                            augment=augment, seed=self.cfg.seed,
                                            crop_pct=d.crop_pct)

        return make

    def _val_ds(self, size, limit=None):
        from experiments import data as input_data

        return input_data.eval_dataset(self.val_src, size=size,
                                       batch_size=self.cfg.eval_batch_size,
                                       crop_pct=self.cfg.data.crop_pct, limit=limit)

    # --------------------------------------------------------------------------- model helpers
    def build_student(self, input_size=None, *, training_heads=False):
        kwargs = {}
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
             callbacks_fn=None):
        """Train `model_fn()` (built inside the strategy scope) and evaluate at `eval_size`."""
        from compress import training

        with self.strategy.scope():
            model = model_fn()
        callbacks = callbacks_fn() if callbacks_fn else []
        return model, training.train(
            model, self._train_ds_factory(sampler), workdir=str(stage.path),
            logdir=str(self.tb / tb_name), val_ds=self._val_ds(eval_size),
            strategy=self.strategy, callbacks=callbacks,
            checkpoint_every=section.checkpoint_every, **self._optim_kwargs(section))

    # ---------------------------------------------------------------------------------- stages
    def stage_teacher(self, stage: StageDir) -> None:
        from compress.distill import Distiller

        t = self.cfg.teacher
        stage.begin({"teacher": self.teacher_arg, **t.to_dict()})
        arg = self.teacher_arg
        if os.path.isdir(arg):  # a teacher stage folder saved by this project
            src = StageDir(pathlib.Path(arg).parent, pathlib.Path(arg).name)
            spec = src.model_json()
            if spec["num_classes"] != self.num_classes:
                raise ValueError(f"--teacher: {arg} has {spec['num_classes']} classes, the data "
                                 f"has {self.num_classes}")
            if stage.writes:  # a non-chief worker reads the source folder instead
                shutil.copy(src.weights, stage.weights)
            stage.save_model_json(**spec)
            teacher, size = self.load_teacher_from(stage if stage.writes else src)
            top1 = self._evaluate_keras(teacher, size)
            stage.finish({"val_top1": top1, "source": arg, "trained_steps": 0})
            return
        npz = arg if arg.endswith(".npz") else None
        name = self._teacher_name_for_npz(npz) if npz else arg
        size = t.input_size

        def build():
            m = models.create_model(name, num_classes=self.num_classes)
            if npz:
                from models.vit import load_google_npz

                load_google_npz(m, npz)
            return Distiller(m, None, label_smoothing=t.label_smoothing)

        distiller, metrics = self._fit(stage, build, self._sampler(None, size=size,
                                                                   batch=t.batch_size),
                                       t, tb_name="teacher", eval_size=size)
        stage.save_weights(distiller.student)
        stage.save_model_json(name=name, num_classes=self.num_classes, input_size=size,
                              source=npz or "scratch")
        stage.finish(metrics)

    def load_teacher_from(self, stage):
        """The frozen teacher saved in `stage` and the input size it was trained at."""
        spec = stage.model_json()
        teacher = models.create_model(spec["name"], num_classes=spec["num_classes"])
        teacher.load_weights(str(stage.weights))
        teacher.trainable = False
        return teacher, spec.get("input_size", models.get_model_info(spec["name"]).default_size)

    @staticmethod
    def _teacher_name_for_npz(path):
        width = np.load(path)["embedding/kernel"].shape[-1]
        by_width = {192: "vit_tiny_patch16", 384: "vit_small_patch16", 768: "vit_base_patch16"}
        if width not in by_width:
            raise ValueError(f"--teacher: {path} has width {width}; supported ViT widths "
                             f"{sorted(by_width)}")
        return by_width[width]

    def _evaluate_keras(self, model, size) -> float:
        correct = total = 0
        for images, labels in self._val_ds(size):
            pred = np.argmax(model(images, training=False).numpy(), -1)
            correct += int((pred == labels.numpy()).sum())
            total += len(pred)
        return correct / max(total, 1)

    def _student_fit(self, stage, section, *, kind, alpha, student_fn, tb_name, callbacks_fn=None):
        """Train a student with `section`'s optimiser, sampler and temperature."""
        from compress.distill import Distiller

        teacher, teacher_size = self.load_teacher() if kind != "none" else (None, None)

        def build():
            return Distiller(student_fn(), teacher, kind=kind, alpha=alpha,
                             temperature=section.temperature, teacher_size=teacher_size,
                             label_smoothing=section.label_smoothing)

        sampler = self._sampler(section)
        return self._fit(stage, build, sampler, section, tb_name=tb_name,
                         eval_size=self.export_size, callbacks_fn=callbacks_fn)

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

    def _load_student(self, stage_name, *, input_size=None, training_heads=False):
        src = self._require(stage_name)
        model = self.build_student(input_size, training_heads=training_heads)
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

    def stage_qat(self, stage: StageDir) -> None:
        from compress import quantize

        q = self.cfg.qat
        stage.begin({"student": self.student, **q.to_dict()})
        source = "prune" if StageDir(self.workdir, "prune").done else "distill"

        def student_fn():
            return quantize.apply_qat(self._load_student(source, training_heads=True),
                                      preserve_sparsity=q.preserve_sparsity and source == "prune")

        distiller, m = self._student_fit(stage, q, kind=q.kind, alpha=q.kd_alpha,
                                         student_fn=student_fn, tb_name="qat")
        stage.save_weights(distiller.student)
        stage.save_model_json(name=self.student, num_classes=self.num_classes,
                              wrappers=[w for w in ("prune", "qat") if w != "prune" or
                                        source == "prune"], source_stage=source)
        stage.finish(m)

    # ---------------------------------------------------------------------------------- export
    def inference_model(self, stage_name, input_size):
        """Rebuild the inference graph of a finished stage at a fixed input size."""
        from compress import quantize

        src = self._require(stage_name)
        if stage_name != "qat":
            return self._load_student(stage_name, input_size=input_size)
        train_model = quantize.apply_qat(self.build_student(input_size, training_heads=True),
                                         preserve_sparsity=False)
        train_model.load_weights(str(src.weights))
        if self.info.family != "efficientformer":
            return train_model
        infer = quantize.apply_qat(self.build_student(input_size), preserve_sparsity=False)
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
            for fmt in e.formats[stage_name]:
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
        from compress.results import table

        if os.path.exists(table.results_path(str(self.workdir))):
            rows = [r for r in table.read_results(str(self.workdir)) if r["path"] != rel]
            table.write_results(str(self.workdir), rows, merge=False)

    # ------------------------------------------------------------------------------- benchmark
    def stage_benchmark(self, stage: StageDir) -> None:
        from compress.measure.costs import static_costs
        from experiments.benchmark import benchmark_files

        b = self.cfg.benchmark
        stage.begin(b.to_dict())
        manifest = read_json(self._require("export").path / "manifest.json")
        if self.overwrite:  # measure every file again; without --overwrite, finished rows stay
            for rel in manifest:
                self._forget_results(rel)
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
                    "sparsity": meta["audit"].get("sparsity")}

        threads = [t or os.cpu_count() for t in b.threads]
        benchmark_files(
            str(self.workdir), [str(self.workdir / r) for r in sorted(manifest)],
            threads=threads, delegates=list(b.delegates), warmup=b.warmup, runs=b.runs,
            input_size=size, dataset=val, file_info=file_info, deny_amx=b.deny_amx,
            reference_predictions=lambda path: stage_facts(manifest[rel(path)]["stage"])[0])
        stage.finish({"files": len(manifest)})

    def stage_report(self, stage: StageDir) -> None:
        from compress.results.hparams import write_hparams
        from compress.results.report import write_report

        stage.begin({})
        report = write_report(str(self.workdir), title=f"{self.student} from "
                              f"{self.teacher_arg} ({self.cfg.preset} preset)")
        write_hparams(str(self.workdir))
        lines = ["", "## Training stages (Keras, validation split)", "",
                 "| stage | val top-1 | steps | minutes | note |", "|---|---|---|---|---|"]
        for name in ("teacher", "distill", "prune", "qat"):
            m = StageDir(self.workdir, name).metrics()
            if not m:
                continue
            note = {"teacher": f"{self.teacher_arg}",
                    "distill": f"{self.cfg.distill.kind} KD, alpha {self.cfg.distill.alpha}, "
                               f"T {self.cfg.distill.temperature}",
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
