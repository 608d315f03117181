"""The QAT stage: quantization-aware fine-tuning with the teacher, from the prune stage's model
when there is one (its zeros preserved), else the distilled one."""

from __future__ import annotations

from experiments.stages.context import Run
from experiments.workdir import StageDir


def run(ctx: Run, stage: StageDir) -> None:
    from compress import quantize

    q = ctx.cfg.qat
    stage.begin({"student": ctx.student, **q.to_dict()})
    source = "prune" if StageDir(ctx.workdir, "prune").done else "distill"
    # a structured prune leaves no zeros to preserve, only a smaller model
    sparse = source == "prune" and "prune" in ctx.require(source).model_json()["wrappers"]

    def student_fn():
        return quantize.apply_qat(ctx.load_student(source, training_heads=True),
                                  preserve_sparsity=q.preserve_sparsity and sparse)

    distiller, m = ctx.student_fit(stage, q, kind=q.kd_kind, alpha=q.kd_alpha,
                                   temperature=q.kd_temperature,
                                   student_fn=student_fn, tb_name="qat")
    stage.save_weights(distiller.student)
    stage.save_model_json(name=ctx.student, num_classes=ctx.num_classes,
                          overrides=ctx.overrides(source),
                          wrappers=["prune", "qat"] if sparse else ["qat"],
                          source_stage=source)
    stage.finish(m)
