"""The stages of `experiments.pipeline`, one module each, each reading the previous stage's folder
through the run's shared context (`Run`, context.py) and the workdir API (experiments/workdir.py).

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

A stage module has one entry point, `run(ctx, stage)`: `ctx` is the `Run` (config, data
sources, strategy, the teacher's record and the helpers every stage shares: building and loading
students, training, evaluation, the teacher cache), `stage` its `StageDir`. results.csv is written
by the benchmark stage alone (compress.results.table), report.md by the report stage alone.

Every training stage also saves `val_predictions.npy` (its predicted class per validation
image), which the report pairs to measure the distillation gain (experiments/summary.py).
"""

from experiments.stages.context import (  # noqa: F401
    EXPORT_STAGES, TRAINING_STAGES, Run, StageRefused)
