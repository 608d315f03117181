"""Is the distillation gain real? Labels-only and distilled students, paired, over seeds.

  python scripts/bench_gain.py --teacher=efficientnet_lite2 --workdir=runs/gain \
      [--data=$IMAGENETTE_DIR] [--student=mobilevit_xxs] [--preset=quick] [--seeds=0,1]
      [--precisions=auto] [--variants=labels,soft:1:1,soft:1:4] [--export_size=N]
      [--config.distill.steps=600 ...]

One pipeline run pairs one labels-only student with one distilled student: its interval covers
the sampling of validation images, not the training noise of one seed or of one float precision.
This script measures that noise. For every precision and seed it keeps a workdir
`<workdir>/<precision>/seed<seed>` holding the pipeline's teacher stage (run once, in the first
workdir, and copied to the others: the teacher is the same for every seed) and the teacher cache
of that seed and precision (`distill/teacher_cache`, the pipeline's own), then trains one
student per variant in `study/<variant>/` with the distill stage's code
(`experiments.stages.Run.student_fit`): same initial weights, same views, same steps.

Variants: `labels` (no teacher, the labels-only twin; always trained) and `soft:ALPHA:T` /
`hard:ALPHA:T` (compress.distill: the teacher's part, its weight against the labels and the
temperature). Printed: every student's top-1 on all validation images, each variant's paired
gain over `labels` per seed (bootstrap 95% CI, McNemar p), and per variant and precision the
mean gain over seeds with a t interval over seeds (the training noise). A finished student is
reused when its config is the same, refused in one line otherwise (`--overwrite` retrains).
The summary goes to `<workdir>/gain.json` too.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app, flags
from ml_collections import config_flags

from experiments.configs import PRESETS, preset_from_argv

REPO = pathlib.Path(__file__).resolve().parents[1]
FLAGS = flags.FLAGS
flags.DEFINE_string("student", "mobilevit_xxs", "registry name of the student")
flags.DEFINE_string("teacher", None, "as the pipeline's --teacher")
flags.DEFINE_string("data", os.environ.get("IMAGENETTE_DIR"),
                    "folder with train/ and val/ class subfolders, or tfds:NAME "
                    "(default: $IMAGENETTE_DIR)")
flags.DEFINE_string("workdir", None, "output folder")
flags.DEFINE_enum("preset", "quick", PRESETS, "the pipeline preset the --config.* overrides "
                  "apply to")
flags.DEFINE_list("seeds", ["0", "1"], "seeds (initial weights, views, sampler)")
flags.DEFINE_list("precisions", ["auto"], "compress.training.PRECISIONS of the teacher cache "
                  "and the students")
flags.DEFINE_list("variants", ["labels", "soft:1:1"], "labels, soft:ALPHA:T or hard:ALPHA:T")
flags.DEFINE_integer("export_size", None, "the size the students are evaluated at (default: "
                     "the preset's)")
flags.DEFINE_bool("overwrite", False, "retrain students whose config differs")


config_flags.DEFINE_config_file(
    "config", f"{REPO / 'experiments' / 'configs.py'}:{preset_from_argv(sys.argv, 'quick')}",
    "preset config; override keys as --config.a.b=v", lock_config=True)


def parse_variant(text: str) -> dict:
    """'labels' or 'KIND:ALPHA:T' -> {name, kind, alpha, temperature}; one-line error if not."""
    from compress.distill import KINDS

    if text == "labels":
        return {"name": "labels", "kind": "none", "alpha": 0.0, "temperature": 1.0}
    parts = text.split(":")
    try:
        kind, alpha, temp = parts[0], float(parts[1]), float(parts[2])
        assert len(parts) == 3 and kind in KINDS[1:] and 0 <= alpha <= 1 and temp > 0
    except (IndexError, ValueError, AssertionError):
        raise ValueError(f"--variants: {text!r} is not 'labels' or KIND:ALPHA:T with KIND in "
                         f"{'/'.join(KINDS[1:])}, 0 <= ALPHA <= 1, T > 0 (e.g. soft:1:1)") from None
    return {"name": f"{kind}_a{alpha:g}_T{temp:g}", "kind": kind, "alpha": alpha,
            "temperature": temp}


def train_variants(run, variants, *, overwrite):
    """Every variant's student in run.workdir/study/<name>; returns {name: predictions}."""
    from experiments.summary import load_predictions
    from experiments.workdir import StageDir
    from models.compat import keras

    d = run.cfg.distill
    study = StageDir(run.workdir, "study")
    preds = {}
    for v in variants:
        stage = study.child(v["name"])
        record = {"student": run.student, "seed": run.cfg.seed, "precision": run.policy,
                  "export_size": run.export_size, "data": run.cfg.data.to_dict(),
                  "distill": d.to_dict(), "variant": v}
        record = json.loads(json.dumps(record))
        cfg_path = stage.path / "config.json"
        old = json.loads(cfg_path.read_text()) if cfg_path.exists() else None
        if stage.done and old == record:
            print(f"  {v['name']}: done already, reused", flush=True)
        else:
            if old not in (None, record):
                if not overwrite:
                    sys.exit(f"FATAL {stage.path} holds a student of another config; "
                             "--overwrite retrains it, or use another --workdir")
                stage.reset()
            stage.begin(record)  # same config, unfinished: resumes from its checkpoint
            t0 = time.perf_counter()
            distiller, m = run.student_fit(
                stage, d, kind=v["kind"], alpha=v["alpha"], temperature=v["temperature"],
                student_fn=lambda: run.build_student(training_heads=True),
                tb_name=f"study_{v['name']}")
            stage.finish({**m, "stage_s": time.perf_counter() - t0})
            del distiller
            keras.backend.clear_session()
        preds[v["name"]] = load_predictions(stage.path, run.val_src.num_examples)
    return preds


def main(argv):
    del argv
    import ml_collections
    import numpy as np

    from compress import training
    from compress.io import write_json
    from compress.stats import paired_difference, seed_interval
    from experiments import stages

    def fail(msg):
        sys.exit(f"FATAL Flags parsing error: {msg}")

    if not FLAGS.data:
        fail("--data is required (or set IMAGENETTE_DIR)")
    try:
        variants = [parse_variant(t) for t in FLAGS.variants]
        seeds = [int(s) for s in FLAGS.seeds]
    except ValueError as e:
        fail(str(e) if str(e).startswith("--") else f"--seeds: {FLAGS.seeds} are not integers")
    if variants[0]["name"] != "labels":
        variants = [parse_variant("labels")] + [v for v in variants if v["name"] != "labels"]
    for p in FLAGS.precisions:
        if p not in training.PRECISIONS:
            fail(f"--precisions: {p!r} is not one of {', '.join(training.PRECISIONS)}")
    root = pathlib.Path(FLAGS.workdir)
    results, first_teacher = [], None
    for precision in FLAGS.precisions:
        policy = training.set_mixed_precision(precision)
        for seed in seeds:
            cfg = ml_collections.ConfigDict(FLAGS.config.to_dict())
            cfg.seed, cfg.mixed_precision = seed, policy
            wd = root / policy / f"seed{seed}"
            if first_teacher is not None and not (wd / "teacher" / "DONE").exists():
                shutil.rmtree(wd / "teacher", ignore_errors=True)
                shutil.copytree(first_teacher, wd / "teacher")
            run = stages.Run(student=FLAGS.student, teacher=FLAGS.teacher, data=FLAGS.data,
                             workdir=wd, config=cfg, export_size=FLAGS.export_size)
            print(f"[{policy} seed {seed}] {wd}", flush=True)
            run.run_stage("teacher")
            first_teacher = first_teacher or wd / "teacher"
            run.policy = training.set_mixed_precision(policy)
            preds = train_variants(run, variants, overwrite=FLAGS.overwrite)
            labels = np.asarray(run.val_src.labels)
            correct = {k: p == labels for k, p in preds.items()}
            for v in variants:
                row = {"precision": policy, "seed": seed, "variant": v["name"],
                       "top1": float(correct[v["name"]].mean())}
                if v["name"] != "labels":
                    row["paired"] = paired_difference(correct["labels"], correct[v["name"]])
                results.append(row)
                gain = row.get("paired")
                extra = "" if gain is None else (
                    f"  gain {100 * gain['diff']:+.1f} [{100 * gain['low']:+.1f}, "
                    f"{100 * gain['high']:+.1f}] p={gain['p_mcnemar']:.2g}")
                print(f"  {v['name']:>16}: top-1 {100 * row['top1']:.1f}%{extra}", flush=True)

    summary = []
    print("\nmean gain over seeds (t interval over seeds: the training noise)")
    for policy in dict.fromkeys(r["precision"] for r in results):
        for v in variants[1:]:
            gains = [r["paired"]["diff"] for r in results
                     if r["precision"] == policy and r["variant"] == v["name"]]
            s = seed_interval(gains)
            mean, low, high = s["mean"], s["low"], s["high"]
            summary.append({"precision": policy, "variant": v["name"], "gains": gains, **s})
            ci = "" if low is None else f" [95% CI over seeds {100 * low:+.1f}, {100 * high:+.1f}]"
            print(f"  {policy:>15} {v['name']:>16}: {100 * mean:+.1f}{ci}; per seed "
                  f"{', '.join(f'{100 * g:+.1f}' for g in gains)}")
    write_json(root / "gain.json", {"students": results, "summary": summary})


if __name__ == "__main__":
    flags.mark_flags_as_required(["teacher", "workdir"])
    app.run(main)
