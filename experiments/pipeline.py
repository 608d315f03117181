"""The whole pipeline in one command: teacher -> distill -> prune -> qat -> export -> benchmark
-> report (flags and workdir layout: README.md, docs/pipeline.md).

    python -m experiments.pipeline --student=mobilevit_xxs --teacher=efficientnet_lite2 \
        --data=$IMAGENETTE_DIR --workdir=runs/xxs --preset=quick
    tensorboard --logdir runs/xxs/tb

Overrides: any preset value as `--config.<section>.<key>=value`, e.g.
`--config.distill.steps=500 --config.prune.target_sparsity=0.7` (see experiments/configs.py).
Resuming and --overwrite: every stage records what it is made from in `<stage>/fingerprint.json`
(experiments/fingerprint.py: the config keys it reads, the student, the data's files, the
teacher, the code and the fingerprints of the stages it reads) and its metrics.json carries that
fingerprint with the code version, runtime and host. Before the first stage runs, all of them
are checked:
- without --overwrite, a selected stage that is finished with the same fingerprint is skipped,
  and one killed part-way with the same fingerprint resumes (checkpoints, a partial teacher
  cache, export or benchmark); a different fingerprint stops the run in one line naming the
  stage and what differs (`distill: config differs from the finished stage: steps 6 -> 12`);
- --overwrite redoes the selected stages from scratch;
- a finished stage that is not selected is kept only while the stages it was made from are
  unchanged; one made from a stage this run redoes stops the run in one line
  (`prune: made from a distill stage that was redone; add prune to --stages`).
results.csv rows of another benchmark fingerprint are removed when the benchmark stage runs.

Every input is checked before the first stage, and every refusal is one line naming the flag, the
value and what is accepted: flag and --config values against their ranges (configs.check), the
--teacher file, the --workdir (created, locked against a second run), the --data splits, then
what needs the student built (how far a structured prune can shrink it, export.float_layers).
Environment failures during a stage (a full disk) are one line too.
"""

from __future__ import annotations

import errno
import os
import pathlib
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from compress.training import STRATEGIES
from experiments.configs import PRESETS, RENAMED, check, preset_from_argv
from experiments.fingerprint import STAGES
_CONFIG_FILE = str(pathlib.Path(__file__).with_name("configs.py"))

FLAGS = flags.FLAGS
flags.DEFINE_string("student", None, "registry name of the student (see models.list_models())")
flags.DEFINE_string("teacher", None, "a registry name (trained in the teacher stage; "
                    "efficientnet_lite0/1/2: ImageNet weights of the installed package), a "
                    "teacher folder saved by this project, a ViT checkpoint (timm .pth/"
                    ".safetensors, Hugging Face folder, Google .npz), a Keras classifier "
                    "(.keras, .h5, SavedModel folder) or keras.applications.NAME")
flags.DEFINE_string("data", None, "folder with train/ and val/ class subfolders, or tfds:NAME")
flags.DEFINE_string("workdir", None, "output folder (layout: README.md, \"The workdir\")")
flags.DEFINE_enum("preset", "smoke", PRESETS, "hyperparameter preset")
flags.DEFINE_list("stages", list(STAGES), f"stages to run, a subset of {','.join(STAGES)}")
flags.DEFINE_bool("overwrite", False, "redo the selected stages even if they are DONE")
flags.DEFINE_enum("strategy", "default", STRATEGIES, "tf.distribute strategy for training")
flags.DEFINE_integer("export_size", None, "square input size of every exported file "
                     "(default: the preset's evaluation size)")


def renamed_flags(argv: list[str]) -> list[str]:
    """`argv` with the renamed --config keys (configs.RENAMED) under their new names, and a
    one-line note on stderr for each."""
    out = []
    for a in argv:
        key = a[len("--config."):].split("=", 1)[0] if a.startswith("--config.") else ""
        if key in RENAMED:
            print(f"note: --config.{key} is now --config.{RENAMED[key]}", file=sys.stderr)
            a = f"--config.{RENAMED[key]}" + a[len("--config.") + len(key):]
        out.append(a)
    return out


if __name__ == "__main__":  # before config_flags defines the --config.* overrides from argv
    sys.argv[:] = renamed_flags(sys.argv)

try:
    config_flags.DEFINE_config_file(
        "config", f"{_CONFIG_FILE}:{preset_from_argv(sys.argv)}",
        "preset config; set by --preset, override keys as --config.a.b=v", lock_config=True)
except (KeyError, AttributeError) as e:  # an unknown --config.* key on the command line
    while e.args and isinstance(e.args[0], BaseException):  # AttributeError(KeyError(msg))
        e = e.args[0]
    detail = " ".join(str(e.args[0] if e.args else e).replace("'", "").split())
    sys.exit(f"FATAL Flags parsing error: unknown --config key {detail} (see experiments/configs.py)")
flags.mark_flags_as_required(["student", "teacher", "data", "workdir"])


def _fail(message: str):
    """Exit with a one-line error naming the flag (absl's format, without the help dump)."""
    sys.exit(f"FATAL Flags parsing error: {' '.join(str(message).split())}")


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with its errors as one line (absl adds a second one, a pointer to
    --helpshort, so the last line would not name the flag)."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        _fail(str(e))


def resolve_teacher():
    """--teacher resolved once (models/teachers.py): a registry name, a package's pretrained
    weights, a teacher folder, a checkpoint, a Keras file or keras.applications name; its
    problems end here in one line naming the flag."""
    from models import teachers

    try:
        return teachers.resolve(FLAGS.teacher,
                                input_size=FLAGS.config.teacher.input_size or None)
    except ValueError as e:
        text = " ".join(str(e).split())
        _fail(f"--teacher{text}" if text.startswith("=") else f"--teacher: {text}")


def validate_flags():
    """Refuse bad names and values up front, naming the flag and what is accepted; returns the
    --teacher's record."""
    import models

    unknown = [s for s in FLAGS.stages if s not in STAGES]
    if unknown:
        _fail(f"--stages: unknown stage(s) {unknown}; accepted: {','.join(STAGES)}")
    students = [n for n in models.list_models() if models.get_model_info(n).role == "student"]
    if FLAGS.student not in models.list_models():
        _fail(f"--student: unknown model {FLAGS.student!r}; accepted: "
                             f"{', '.join(students)}")
    info = models.get_model_info(FLAGS.student)
    teacher = resolve_teacher()
    teacher_divisor = (models.get_model_info(teacher.architecture).size_divisor
                       if teacher.architecture in models.list_models() else
                       teacher.spec.get("overrides", {}).get("patch", 16)
                       if teacher.kind == "checkpoint" else 32)
    problems = check(FLAGS.config, size_divisor=info.size_divisor,
                     teacher_divisor=teacher_divisor)
    if problems:
        _fail(problems[0])
    if info.fixed_size and FLAGS.export_size not in (None, info.default_size):
        _fail(f"--export_size: {FLAGS.student} is built for {info.default_size} px only (its "
              f"attention biases are tied to the token grid); accepted: {info.default_size}")
    if FLAGS.export_size is not None and (FLAGS.export_size <= 0 or
                                          FLAGS.export_size % info.size_divisor):
        _fail(f"--export_size: {FLAGS.export_size} is not a positive multiple of "
                             f"{info.size_divisor}, which {FLAGS.student} needs")
    from compress import structured
    from compress.distill import KINDS
    from compress.prune import SCHEDULES
    from compress.tflite.convert import FORMATS
    from compress.tflite.interpreter import DELEGATES
    from compress.training import PRECISIONS

    c = FLAGS.config
    checks = {"mixed_precision": (c.mixed_precision, PRECISIONS),
              "distill.kind": (c.distill.kind, KINDS), "prune.kd_kind": (c.prune.kd_kind, KINDS),
              "qat.kd_kind": (c.qat.kd_kind, KINDS), "prune.schedule": (c.prune.schedule, SCHEDULES),
              "prune.m_by_n": (c.prune.m_by_n, ("", "2:4")),
              "prune.method": (c.prune.method, structured.METHODS),
              "prune.importance": (c.prune.importance, structured.IMPORTANCE)}
    checks.update({f"benchmark.delegates[{i}]": (d, DELEGATES)
                   for i, d in enumerate(c.benchmark.delegates)})
    checks.update({f"export.formats.{s}[{i}]": (f, FORMATS)
                   for s in c.export.formats for i, f in enumerate(c.export.formats[s])})
    for key, (value, accepted) in checks.items():
        if value not in accepted:
            _fail(f"--config.{key}: {value!r} is not accepted; accepted: {accepted}")
    if _prunes_structured(c):
        try:
            structured.check_family(FLAGS.student)
        except ValueError as e:
            _fail(f"--config.prune.method=structured: {e}")
    elif c.prune.target_ms:
        _fail("--config.prune.target_ms: a latency budget needs --config.prune.method=structured "
              "(magnitude pruning leaves the file's work as it is)")
    tc = c.distill.teacher_cache
    if tc.views and (c.data.randaugment or c.data.mixup or c.data.cutmix):
        _fail("--config.distill.teacher_cache.views: the teacher cache cannot be combined with "
              "data.randaugment, data.mixup or data.cutmix (the teacher scored unmodified views); "
              "turn those off or set --config.distill.teacher_cache.views=0")
    return teacher


def validate_against_the_student(c) -> None:
    """The checks that need the student built (seconds, so they come after the cheap ones: the
    flags, the workdir, the data): how far a structured prune can shrink it, and the layers
    `export.float_layers` names. Still before any stage."""
    import models

    structured_keep = _prunes_structured(c)
    if not structured_keep and not c.export.float_layers:
        return
    info = models.get_model_info(FLAGS.student)
    # the MACs are counted at the size the prune stage counts them: the training model's fixed
    # size, else the export size
    size = info.input_size(FLAGS.export_size, c.export.size)
    student = models.create_model(FLAGS.student, num_classes=10, input_size=size)
    if structured_keep:
        _check_structured_keep(c, student, size)
    if c.export.float_layers:  # globs of student layer names
        from compress.tflite.fast_int8 import layers_matching

        try:
            layers_matching(student, c.export.float_layers)
        except ValueError as e:
            _fail(f"--config.export.{e}")


def open_workdir(path: str) -> int:
    """Create --workdir and lock it for this run (workdir.lock_workdir; a multi-worker run's
    tasks other than the chief each take their own lock: workdir.lock_name); one line on
    failure."""
    from experiments.workdir import WorkdirLocked, lock_name, lock_workdir

    p = pathlib.Path(path)
    if p.exists() and not p.is_dir():
        _fail(f"--workdir={path}: exists and is not a folder; accepted: a folder, or a path "
              "where one can be created")
    try:
        name = lock_name(FLAGS.strategy, os.environ.get("TF_CONFIG"))
    except ValueError as e:
        _fail(f"--strategy=multi_worker: {e}; accepted: the cluster and this task as JSON "
              '(docs/scale_out.md, "Two machines")')
    try:
        p.mkdir(parents=True, exist_ok=True)
        return lock_workdir(p, name)
    except WorkdirLocked as e:
        _fail(f"--workdir={path}: another run (pid {e.pid}) is using this workdir; wait for it "
              "or pick another --workdir")
    except OSError as e:
        _fail(f"--workdir={path}: cannot create or write it ({e.strerror or e}"
              f"{f': {e.filename}' if e.filename else ''}); accepted: a writable folder")


def _disk_full(e: BaseException) -> bool:
    text = str(e)
    return (getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
            or "No space left on device" in text or "errno = 28" in text)


def _disk_full_line(e: BaseException, stage: str, workdir: str) -> str:
    import shutil

    where = getattr(e, "filename", None) or workdir
    free = shutil.disk_usage(workdir).free
    detail = getattr(e, "strerror", None) or " ".join(str(e).split())[:300]
    return (f"FATAL disk full in the {stage} stage writing {where}: {detail}; {free:,} bytes "
            f"free under --workdir={workdir}; free some space and run the same command again "
            "(finished stages and checkpoints are kept)")


def _prunes_structured(c) -> bool:
    return c.prune.method == "structured" and "prune" in FLAGS.stages


def _check_structured_keep(c, dense, size: int) -> None:
    """--config.prune.method=structured: whether the model can shrink as far as `keep` says
    (compress/structured.py); `configs.check` has the ranges."""
    from compress import structured

    p = c.prune
    smallest = structured.min_keep(dense, size, p.min_width)
    if not p.target_ms and p.keep < smallest:  # a latency budget: checked when prune starts
        _fail(f"--config.prune.keep={p.keep} is out of reach for {FLAGS.student}: structured "
              f"pruning keeps at least {smallest:.3f} of its MACs (--config.prune.min_width="
              f"{p.min_width} of every block's units)")


def _checked_run(teacher):
    """The run's shared state, once data, strategy, the student and every requested stage's
    inputs are checked (one line on failure, before any stage)."""
    from experiments import stages

    try:  # data sources and strategy: bad --data / --strategy values end here, in one line
        run = stages.Run(student=FLAGS.student, teacher=FLAGS.teacher, data=FLAGS.data,
                         workdir=FLAGS.workdir, config=FLAGS.config, strategy=FLAGS.strategy,
                         export_size=FLAGS.export_size, overwrite=FLAGS.overwrite,
                         teacher_record=teacher)
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # RuntimeError: tfds offline
        _fail(" ".join(str(e).split()))
    validate_against_the_student(FLAGS.config)
    if run.chief:  # what each stage is made from, checked before any work (fingerprint.py)
        from experiments.fingerprint import check_stages

        refusal = check_stages(run, [s for s in STAGES if s in FLAGS.stages],
                               overwrite=FLAGS.overwrite)
        if refusal:
            sys.exit(f"FATAL {refusal}")
    return run


def _remove_if_untouched(workdir: pathlib.Path) -> None:
    """Remove `workdir` if it holds nothing but lock files (workdir.lock_name) and empty
    folders: what a refused run that created it leaves. Anything else in it is kept."""
    entries = sorted(workdir.rglob("*"), reverse=True)  # children before their folders
    if any(e.is_file() and not e.name.startswith(".lock") for e in entries):
        return
    for e in entries:
        e.unlink() if e.is_file() else e.rmdir()
    workdir.rmdir()


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:  # TF's INFO chatter would bury the progress bars
        logging.set_verbosity(logging.WARNING)
    teacher = validate_flags()
    created = not pathlib.Path(FLAGS.workdir).exists()
    lock = open_workdir(FLAGS.workdir)  # noqa: F841 - held until this process ends
    try:
        run = _checked_run(teacher)
    except SystemExit:  # refused before any stage: a workdir this run made is not left behind
        if created:
            _remove_if_untouched(pathlib.Path(FLAGS.workdir))
        raise
    from experiments import stages

    start = time.time()
    for stage in STAGES:
        if stage in FLAGS.stages:
            try:
                run.run_stage(stage)
            except stages.StageRefused as e:  # a stage's own input check, before its work
                _fail(str(e))
            except Exception as e:  # noqa: BLE001 - a full disk is one line; the rest re-raised
                if _disk_full(e):
                    sys.exit(_disk_full_line(e, stage, FLAGS.workdir))
                raise
    logging.info("pipeline finished in %.1f min; workdir %s", (time.time() - start) / 60,
                 FLAGS.workdir)
    print(f"done in {(time.time() - start) / 60:.1f} min: {FLAGS.workdir}")


def run_cli():
    if any(a == "--config" or a.startswith("--config=") for a in sys.argv):
        sys.exit("FATAL Flags parsing error: choose the preset with --preset, not --config")
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run_cli()
