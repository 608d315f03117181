"""The prune stage: magnitude pruning (tfmot zeros, stored stripped) or structured pruning (a
smaller dense model, compress/structured.py, to `prune.keep` of the MACs or to a latency budget),
fine-tuned while the teacher keeps teaching."""

from __future__ import annotations

import os
import tempfile

import numpy as np

from experiments.stages.context import Run, StageRefused
from experiments.workdir import StageDir, read_json, write_json
from models.compat import keras


def run(ctx: Run, stage: StageDir) -> None:
    from compress import prune

    p = ctx.cfg.prune
    stage.begin({"student": ctx.student, **p.to_dict()})
    if p.method == "structured":
        if p.target_ms:
            check_latency_budget(ctx)
        _structured(ctx, stage)
        return

    def student_fn():
        return prune.apply_pruning(ctx.load_student("distill", training_heads=True),
                                   **_prune_kwargs(ctx))

    distiller, m = ctx.student_fit(
        stage, p, kind=p.kd_kind, alpha=p.kd_alpha, temperature=p.kd_temperature,
        student_fn=student_fn,
        tb_name="prune", callbacks_fn=lambda: prune.pruning_callbacks(str(ctx.tb / "prune")))
    stripped = prune.strip(distiller.student)
    report = prune.sparsity_report(stripped)
    stage.save_weights(stripped)
    stage.save_model_json(name=ctx.student, num_classes=ctx.num_classes, wrappers=["prune"],
                          prune=_prune_kwargs(ctx))
    stage.write_json("sparsity.json", report)
    overall = report.get("overall", {})
    sparsity = overall.get("sparsity") if isinstance(overall, dict) else overall
    stage.finish({**m, "sparsity": sparsity})


def _prune_kwargs(ctx: Run):
    p = ctx.cfg.prune
    return dict(target_sparsity=p.target_sparsity, schedule=p.schedule,
                begin_step=int(p.begin_frac * p.steps), end_step=max(1, int(p.end_frac * p.steps)),
                frequency=p.frequency, m_by_n=(2, 4) if p.m_by_n == "2:4" else None,
                skip=tuple(p.skip))


def _structured(ctx: Run, stage: StageDir) -> None:
    """Cut the distilled student to `prune.keep` of its MACs (compress/structured.py), then
    fine-tune the smaller dense model with the teacher as the magnitude prune does."""
    from compress import structured
    from compress.distill import Distiller

    p = ctx.cfg.prune
    cut_path = stage.path / "structured.json"

    def student_fn():
        if cut_path.exists():  # resumed: the same widths; the checkpoint holds the weights
            return ctx.build_student(training_heads=True,
                                     overrides={"widths": read_json(cut_path)["widths"]})
        dense = ctx.load_student("distill", training_heads=True)
        teacher, teacher_size = ctx.load_teacher() if p.kd_kind != "none" else (None, None)
        objective = Distiller(dense, teacher, kind=p.kd_kind, alpha=p.kd_alpha,
                              temperature=p.kd_temperature, teacher_size=teacher_size,
                              label_smoothing=p.label_smoothing).batch_loss
        size = dense.input_shape[1] or ctx.export_size
        batches = ctx.train_ds_factory(ctx.sampler(
            None, size=size, batch=p.sampler.base_batch))(0)
        plan = structured.plan(dense, input_size=size, importance=p.importance,
                               min_width=p.min_width, batches=batches.take(p.score_batches),
                               loss_fn=objective)
        keep, budget = p.keep, {}
        if p.target_ms:
            keep, budget = _keep_for_latency(ctx, stage, plan, structured.min_keep(
                dense, size, p.min_width))
        small, cut = structured.cut(
            dense, lambda w: ctx.build_student(training_heads=True, overrides={"widths": w}),
            plan, keep=keep, input_size=size)
        cut.update(budget)
        write_json(cut_path, cut)
        print(f"[prune] structured: {cut['kept_fraction']:.3f} of {cut['dense_macs']:,} "
              f"MACs kept ({p.importance} importance), widths {cut['widths']}")
        return small

    distiller, m = ctx.student_fit(stage, p, kind=p.kd_kind, alpha=p.kd_alpha,
                                   temperature=p.kd_temperature, student_fn=student_fn,
                                   tb_name="prune")
    cut = read_json(cut_path)
    stage.save_weights(distiller.student)
    stage.save_model_json(name=ctx.student, num_classes=ctx.num_classes,
                          overrides={"widths": cut["widths"]}, prune_method="structured",
                          kept_fraction=cut["kept_fraction"])
    params = int(sum(np.prod(w.shape) for w in distiller.student.trainable_weights))
    stage.finish({**m, "kept_fraction": cut["kept_fraction"], "macs": cut["macs"],
                  "dense_macs": cut["dense_macs"], "params": params})


def check_latency_budget(ctx: Run) -> None:
    """`prune.target_ms`: the smallest model structured pruning reaches (its widths do not
    depend on the scores) must run in the budget, timed as the cuts are (its int8 file on
    this host's XNNPACK; about half a minute), before the stage trains. StageRefused
    otherwise."""
    from compress import structured
    from experiments.benchmark import int8_latency_ms

    p, e, size = ctx.cfg.prune, ctx.cfg.export, ctx.export_size
    dense = ctx.build_student(size)
    small = ctx.build_student(size, overrides={"widths": structured.smallest_widths(
        dense, p.min_width)})
    with tempfile.TemporaryDirectory() as tmp:
        ms = int8_latency_ms(small, os.path.join(tmp, "smallest.int8.tflite"),
                             input_size=size, threads=p.target_threads,
                             deny_amx=ctx.cfg.benchmark.deny_amx,
                             xnnpack_friendly=e.xnnpack_friendly,
                             float_layers=e.float_layers)
    keras.backend.clear_session()
    if ms > p.target_ms:
        raise StageRefused(
            f"--config.prune.target_ms={p.target_ms:g} is out of reach for {ctx.student} "
            f"at {size} px: its smallest structured cut (--config.prune.min_width="
            f"{p.min_width}) runs in {ms:.2f} ms as int8 on this host's XNNPACK at "
            f"--config.prune.target_threads={p.target_threads}")


def _keep_for_latency(ctx: Run, stage: StageDir, plan, smallest: float):
    """`prune.target_ms`: the largest MAC fraction whose cut of `plan`, exported as the
    export stage's int8 file at its size, runs in the budget on this host's XNNPACK at
    `prune.target_threads` (compress.structured.keep_for_latency); the probed files stay in
    prune/latency_probe/. Returns (keep, facts for structured.json)."""
    from compress import structured
    from experiments.benchmark import int8_latency_ms

    p, e, size = ctx.cfg.prune, ctx.cfg.export, ctx.export_size
    probe_dir = stage.path / "latency_probe"

    def latency_of(keep):
        widths = structured.widths_for(plan, keep)
        model = ctx.build_student(size, overrides={"widths": widths})
        ms = int8_latency_ms(model, str(probe_dir / f"keep{keep:.4f}.int8.tflite"),
                             input_size=size, threads=p.target_threads,
                             deny_amx=ctx.cfg.benchmark.deny_amx,
                             xnnpack_friendly=e.xnnpack_friendly, float_layers=e.float_layers)
        print(f"[prune] latency budget {p.target_ms:g} ms: keep {keep:.3f} runs in "
              f"{ms:.2f} ms ({p.target_threads} thread(s), int8, {size} px)", flush=True)
        return ms

    keep, ms, trials = structured.keep_for_latency(latency_of, p.target_ms,
                                                   lo=min(1.0, smallest + 1e-6))
    return keep, {"target_ms": p.target_ms, "target_threads": p.target_threads,
                  "measured_ms": ms, "keep": keep, "latency_probes": trials}
