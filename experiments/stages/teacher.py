"""The teacher stage: the --teacher as its record says (copied from a teacher folder;
pretrained with its head kept or sliced to the data's classes, evaluated, not trained; or trained
from labels, or fine-tuned with a new head); teacher/model.json holds the record."""

from __future__ import annotations

import os

from experiments.stages.context import Run
from experiments.workdir import StageDir, atomic_copy


def run(ctx: Run, stage: StageDir) -> None:
    """The teacher as its record says: copied from a teacher folder; pretrained with its head
    kept or sliced to the data's classes (evaluated, no training); or trained from labels or
    fine-tuned with a new head. `teacher/model.json` holds the record."""
    from compress.distill import Distiller
    from models import teachers

    t, rec, size = ctx.cfg.teacher, ctx.teacher_record, ctx.teacher_size
    stage.begin({"teacher": ctx.teacher_arg, **t.to_dict()})
    record = {**rec.to_json(), "name": rec.architecture, "num_classes": ctx.num_classes,
              "input_size": size}
    if rec.kind == "folder":
        if stage.writes:  # a non-chief worker reads the source folder instead
            atomic_copy(rec.weights, stage.weights)
        stage.save_model_json(**record)
        teacher = ctx.load_teacher_from(stage if stage.writes else
                                        StageDir(*os.path.split(rec.source)))[0]
        m = ctx.evaluate_and_save(stage.path, teacher, size)
        stage.finish({**m, "source": rec.source, "head": rec.head, "step": 0})
        return
    if not rec.trains:  # pretrained, teaching from step 0
        teacher = teachers.build(rec, ctx.num_classes, pretrained=True)
        stage.save_weights(teacher)
        stage.save_model_json(**record)
        m = ctx.evaluate_and_save(stage.path, teacher, size, logdir=ctx.tb / "teacher")
        stage.finish({**m, "source": rec.source, "head": rec.head, "step": 0})
        return

    def build():
        return Distiller(teachers.build(rec, ctx.num_classes, pretrained=True), None,
                         label_smoothing=t.label_smoothing)

    distiller, metrics = ctx.fit(stage, build, ctx.sampler(None, size=size,
                                                           batch=t.batch_size),
                                 t, tb_name="teacher", eval_size=size)
    stage.save_weights(distiller.student)
    stage.save_model_json(**record)
    stage.finish({**metrics, "source": rec.source, "head": rec.head})
