"""The distill stage: the student trained from the frozen teacher (its outputs from the teacher
cache), and, with `distill.baseline`, the same student from labels alone in distill/baseline/."""

from __future__ import annotations

from experiments.stages.context import Run
from experiments.workdir import StageDir


def run(ctx: Run, stage: StageDir) -> None:
    d = ctx.cfg.distill
    stage.begin({"student": ctx.student, **d.to_dict()})
    metrics = {}
    if d.baseline and d.kind != "none":
        base = stage.child("baseline")
        if not base.done:
            base.begin({"kind": "none"})
            distiller, m = ctx.student_fit(
                base, d, kind="none", alpha=0.0, temperature=d.temperature,
                student_fn=lambda: ctx.build_student(training_heads=True),
                tb_name="distill_baseline")
            base.save_weights(distiller.student)
            base.finish(m)
        metrics["baseline_val_top1"] = base.metrics().get("val_top1")
    distiller, m = ctx.student_fit(stage, d, kind=d.kind, alpha=d.alpha,
                                   temperature=d.temperature,
                                   student_fn=lambda: ctx.build_student(training_heads=True),
                                   tb_name="distill")
    stage.save_weights(distiller.student)
    stage.save_model_json(name=ctx.student, num_classes=ctx.num_classes)
    stage.finish({**m, **metrics})
