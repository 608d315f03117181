"""The whole pipeline in one command: teacher -> distill -> prune -> qat -> export -> benchmark
-> report (../shared/CONTRACT.md).

    python -m experiments.pipeline --student=mobilevit_xxs --teacher=vit_tiny_patch16 \
        --data=../shared/data/imagenette2-160 --workdir=runs/xxs --preset=quick
    tensorboard --logdir runs/xxs/tb

Overrides: any preset value as `--config.<section>.<key>=value`, e.g.
`--config.distill.steps=500 --config.prune.target_sparsity=0.7` (see experiments/configs.py).
A finished stage (its folder has DONE) is skipped; `--overwrite` redoes the selected stages;
a stage killed part-way resumes from its last checkpoint.
"""

from __future__ import annotations

import os
import pathlib
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from compress.training import STRATEGIES
from experiments.configs import PRESETS

STAGES = ("teacher", "distill", "prune", "qat", "export", "benchmark", "report")
_CONFIG_FILE = str(pathlib.Path(__file__).with_name("configs.py"))

FLAGS = flags.FLAGS
flags.DEFINE_string("student", None, "registry name of the student (see models.list_models())")
flags.DEFINE_string("teacher", None, "registry name of a ViT teacher (trained in the teacher "
                    "stage), a teacher stage folder saved by this project, or a Google ViT .npz")
flags.DEFINE_string("data", None, "folder with train/ and val/ class subfolders, or tfds:NAME")
flags.DEFINE_string("workdir", None, "output folder (see CONTRACT.md for its layout)")
flags.DEFINE_enum("preset", "smoke", PRESETS, "hyperparameter preset")
flags.DEFINE_list("stages", list(STAGES), f"stages to run, a subset of {','.join(STAGES)}")
flags.DEFINE_bool("overwrite", False, "redo the selected stages even if they are DONE")
flags.DEFINE_enum("strategy", "default", STRATEGIES, "tf.distribute strategy for training")
flags.DEFINE_integer("export_size", None, "square input size of every exported file "
                     "(default: the preset's evaluation size)")


def _preset_from_argv(argv: list[str]) -> str:
    """The --preset value, read before flag parsing: it picks the config that the --config.*
    overrides apply to (config_flags builds those override flags from the default config)."""
    preset = "smoke"
    for i, a in enumerate(argv):
        if a.startswith("--preset="):
            preset = a.split("=", 1)[1]
        elif a == "--preset" and i + 1 < len(argv):
            preset = argv[i + 1]
    return preset if preset in PRESETS else "smoke"  # DEFINE_enum reports it


try:
    config_flags.DEFINE_config_file(
        "config", f"{_CONFIG_FILE}:{_preset_from_argv(sys.argv)}",
        "preset config; set by --preset, override keys as --config.a.b=v", lock_config=True)
except (KeyError, AttributeError) as e:  # an unknown --config.* key on the command line
    while e.args and isinstance(e.args[0], BaseException):  # AttributeError(KeyError(msg))
        e = e.args[0]
    detail = " ".join(str(e.args[0] if e.args else e).replace("'", "").split())
    sys.exit(f"FATAL Flags parsing error: unknown --config key {detail} (see experiments/configs.py)")
flags.mark_flags_as_required(["student", "teacher", "data", "workdir"])


def _fail(message: str):
    """Exit with a one-line error naming the flag (absl's format, without the help dump)."""
    sys.exit(f"FATAL Flags parsing error: {message}")


def validate_flags() -> None:
    """Refuse bad names and values up front, naming the flag and what is accepted."""
    import models

    unknown = [s for s in FLAGS.stages if s not in STAGES]
    if unknown:
        _fail(f"--stages: unknown stage(s) {unknown}; accepted: {','.join(STAGES)}")
    students = [n for n in models.list_models() if models.get_model_info(n).role == "student"]
    if FLAGS.student not in models.list_models():
        _fail(f"--student: unknown model {FLAGS.student!r}; accepted: "
                             f"{', '.join(students)}")
    teacher = FLAGS.teacher
    if teacher not in models.list_models() and not os.path.exists(teacher):
        teachers = [n for n in models.list_models() if models.get_model_info(n).role == "teacher"]
        _fail(f"--teacher: {teacher!r} is neither a registry name ({', '.join(teachers)})"
                             " nor an existing teacher folder or .npz file")
    info = models.get_model_info(FLAGS.student)
    if FLAGS.export_size is not None and (FLAGS.export_size <= 0 or
                                          FLAGS.export_size % info.size_divisor):
        _fail(f"--export_size: {FLAGS.export_size} is not a positive multiple of "
                             f"{info.size_divisor}, which {FLAGS.student} needs")
    from compress.distill import KINDS
    from compress.prune import SCHEDULES
    from compress.training import PRECISIONS

    c = FLAGS.config
    checks = {"mixed_precision": (c.mixed_precision, PRECISIONS),
              "distill.kind": (c.distill.kind, KINDS), "prune.kind": (c.prune.kind, KINDS),
              "qat.kind": (c.qat.kind, KINDS), "prune.schedule": (c.prune.schedule, SCHEDULES),
              "prune.m_by_n": (c.prune.m_by_n, ("", "2:4"))}
    for key, (value, accepted) in checks.items():
        if value not in accepted:
            _fail(f"--config.{key}: {value!r} is not accepted; accepted: {accepted}")
    if not 0 <= c.prune.target_sparsity < 1:
        _fail(f"--config.prune.target_sparsity must be in [0, 1), got "
                             f"{c.prune.target_sparsity}")
    if c.export.float_layers:  # globs of student layer names: check them before any training
        from compress.tflite.fast_int8 import layers_matching

        try:
            layers_matching(models.create_model(FLAGS.student, num_classes=10),
                             c.export.float_layers)
        except ValueError as e:
            _fail(f"--config.export.{e}")


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:  # TF's INFO chatter would bury the progress bars
        logging.set_verbosity(logging.WARNING)
    validate_flags()
    from experiments import stages

    try:  # data sources and strategy: bad --data / --strategy values end here, in one line
        run = stages.Run(student=FLAGS.student, teacher=FLAGS.teacher, data=FLAGS.data,
                         workdir=FLAGS.workdir, config=FLAGS.config, strategy=FLAGS.strategy,
                         export_size=FLAGS.export_size, overwrite=FLAGS.overwrite)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    start = time.time()
    for stage in STAGES:
        if stage in FLAGS.stages:
            run.run_stage(stage)
    logging.info("pipeline finished in %.1f min; workdir %s", (time.time() - start) / 60,
                 FLAGS.workdir)
    print(f"done in {(time.time() - start) / 60:.1f} min: {FLAGS.workdir}")


def run_cli():
    if any(a == "--config" or a.startswith("--config=") for a in sys.argv):
        sys.exit("FATAL Flags parsing error: choose the preset with --preset, not --config")
    app.run(main)


if __name__ == "__main__":
    run_cli()
