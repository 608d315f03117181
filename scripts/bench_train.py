"""Training throughput (images/s) of the engine on this machine, beside another Keras
implementation.

  python scripts/bench_train.py [--student=mobilevit_xxs] [--teacher=vit_tiny_patch16]
      [--size=256] [--teacher_size=224] [--batch=32] [--steps=6] [--warmup=3]
      [--precisions=fp32] [--reference=kecam] [--xla] [--device=cpu|gpu] [--data=DIR]
      [--pipeline_steps=8] [--skip_pipeline | --only_pipeline | --per_resolution] [--deterministic]

Part 1: one training step (forward, backward, AdamW) of the student at `--size` x `--batch`,
labels-only and with a frozen ViT teacher at `--teacher_size` (soft distillation), on in-memory
random batches (no input pipeline cost), for ours and for the same architecture from
`--reference` (keras-cv-attention-models' MobileViT_XXS, logits out), for each precision, all
through the same `compress.training.train`; the last column is ours / reference.
`--xla` adds our distillation step with `jit_compile=True` next to the same step without.
Part 2 (when the data exists): the labels-only student fed by the real pipeline from `--data`,
MobileViT's multi-scale sampler (160..320, base 256 x `--batch`) against a fixed 256 x `--batch`
sampler; an "epoch" is the train split's images, its time projected from `--pipeline_steps`
timed steps (the median of `--rounds` interleaved rounds); the ratio is fixed-epoch time /
multi-scale-epoch time.

`--deterministic`: seeded, with TF op determinism on, as the pipeline runs by default
(`config.deterministic`); compare with a run without it (interleave the two, the flag lasts
for the process).

Part-1 figures are the median images/s of the timed steps, after `--warmup` untimed steps
(tracing, allocator and oneDNN warm-up); part-2 figures are all timed images over all timed
seconds (the sizes differ from step to step). `--device=gpu` refuses to run without a GPU and
runs every step there (TF places ops on the first GPU by default); `--device=cpu` hides GPUs.
Threads: TensorFlow's defaults (intra-op = inter-op = the CPU count), printed first.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from compress.distill import Distiller  # noqa: E402
from compress.training import set_mixed_precision, train  # noqa: E402
from models.compat import keras, tf  # noqa: E402


def reference_student(impl: str, name: str, num_classes: int, size: int):
    """`name` built by the other implementation `impl` (`compress.bench.REFERENCES`), with
    logits out like ours; None when `impl` lacks it."""
    from compress.bench import reference_builder

    build = reference_builder(impl, name)
    return None if build is None else build(num_classes, size, classifier_activation=None)


def random_batches(size: int, batch: int, num_classes: int):
    images = tf.random.uniform((batch, size, size, 3), seed=0)
    labels = tf.random.uniform((batch,), maxval=num_classes, dtype=tf.int32, seed=1)
    return tf.data.Dataset.from_tensors((images, labels)).repeat()


class StepTimer(keras.callbacks.Callback):
    """Images/s of each step after the first `warmup` (tracing, allocator and oneDNN warm-up)."""

    def __init__(self, warmup: int):
        super().__init__()
        self.warmup, self.seen, self.last, self.rates = warmup, 0, None, []
        self.images = self.seconds = 0.0

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        self.seen += 1
        if self.seen > self.warmup and self.last is not None:
            self.rates.append(float(logs["images"]) / (now - self.last))
            self.images += float(logs["images"])
            self.seconds += now - self.last
        self.last = now

    def median(self) -> float:
        rates = sorted(self.rates)
        return rates[len(rates) // 2]

    def mean(self) -> float:
        return self.images / self.seconds


def run(model, make_ds, steps: int, warmup: int, precision: str | None,
        jit_compile: bool = False) -> StepTimer:
    """Trains `warmup + steps` steps; the timer holds the images/s of the last `steps`."""
    timer = StepTimer(warmup)
    with tempfile.TemporaryDirectory() as workdir:
        train(model, make_ds, steps=warmup + steps, workdir=workdir, lr=1e-4, weight_decay=0.05,
              log_every=10, mixed_precision=precision, jit_compile=jit_compile,
              callbacks=[timer], verbose=False)
    return timer


def part1(args, student_name: str) -> list[tuple]:
    """Rows (step, precision, student px, teacher px, ours img/s, reference img/s)."""
    rows = []
    ds = random_batches(args.size, args.batch, args.num_classes)
    for precision in args.precisions.split(","):
        policy = None if precision == "fp32" else precision
        got = {}
        for impl in ("ours", args.reference):
            keras.backend.clear_session()
            set_mixed_precision(policy)
            if impl == "ours":
                student = models.create_model(student_name, num_classes=args.num_classes,
                                              input_size=args.size)
            else:
                student = reference_student(impl, student_name, args.num_classes, args.size)
                if student is None:
                    print(f"  {impl} has no {student_name}: ours only", flush=True)
                    continue
            teacher = models.create_model(args.teacher, num_classes=args.num_classes,
                                          input_size=args.teacher_size)
            got[impl, "labels"] = run(student, lambda step: ds, args.steps, args.warmup,
                                      policy).median()
            d = Distiller(student, teacher, kind="soft", alpha=0.5, temperature=1.0)
            got[impl, "kd"] = run(d, lambda step: ds, args.steps, args.warmup, policy).median()
            print(f"  {impl} {precision}: labels only {got[impl, 'labels']:.1f} img/s, "
                  f"distillation {got[impl, 'kd']:.1f} img/s", flush=True)
        for kind, label, tsize in (("labels", "labels only", "-"),
                                   ("kd", f"soft KD, {args.teacher}", args.teacher_size)):
            rows.append((label, precision, args.size, tsize, got["ours", kind],
                         got.get((args.reference, kind))))
    set_mixed_precision(None)
    return rows


def part_xla(args, student_name: str) -> tuple[float, float]:
    """Our float32 distillation step without and with XLA (`jit_compile`), img/s medians."""
    ds = random_batches(args.size, args.batch, args.num_classes)
    out = []
    for jit in (False, True):
        keras.backend.clear_session()
        student = models.create_model(student_name, num_classes=args.num_classes,
                                      input_size=args.size)
        teacher = models.create_model(args.teacher, num_classes=args.num_classes,
                                      input_size=args.teacher_size)
        d = Distiller(student, teacher, kind="soft", alpha=0.5, temperature=1.0)
        out.append(run(d, lambda step: ds, args.steps, args.warmup, None, jit).median())
        print(f"  distillation, jit_compile={jit}: {out[-1]:.1f} img/s", flush=True)
    return out[0], out[1]


def pipeline_source(args, what: str):
    """(experiments.data, the train source limited to `--limit_per_class`, the split's image
    count), or None after printing why `what` is skipped (no data, or the pipeline not
    importable)."""
    try:
        from experiments import data as ip
    except ImportError as e:
        print(f"\nskipping {what}: {e}")
        return None
    if not pathlib.Path(args.data, "train").is_dir():
        print(f"\nskipping {what}: no data at {args.data}")
        return None
    source = ip.load_source(str(args.data), "train", limit_per_class=args.limit_per_class)
    epoch_images = ip.load_source(str(args.data), "train", verify=False).num_examples
    return ip, source, epoch_images


def pipeline_rate(args, student_name: str, ip, source, sampler) -> float:
    """Images/s of a fresh labels-only student fed by the real pipeline through `sampler`, over
    `--pipeline_steps` steps after `--warmup` untimed ones."""
    precision = None if args.pipeline_precision == "fp32" else args.pipeline_precision
    keras.backend.clear_session()
    set_mixed_precision(precision)
    student = models.create_model(student_name, num_classes=source.num_classes)
    return run(student, lambda step: ip.train_dataset(source, sampler, start_step=step),
               args.pipeline_steps, args.warmup, precision).mean()


def part2(args, student_name: str) -> tuple[list[tuple], int] | None:
    got = pipeline_source(args, "the multi-scale vs fixed-256 comparison")
    if got is None:
        return None
    ip, source, epoch_images = got
    samplers = {"multi-scale 160-320": ip.MultiScaleSampler(base_size=256, base_batch=args.batch),
                "fixed 256": ip.MultiScaleSampler.fixed(256, args.batch)}
    rates = {label: [] for label in samplers}
    walls = dict.fromkeys(samplers, 0.0)
    for _ in range(args.rounds):  # interleaved: a shared machine's load drifts
        for label, sampler in samplers.items():
            t0 = time.perf_counter()
            ips = pipeline_rate(args, student_name, ip, source, sampler)
            rates[label].append(ips)
            walls[label] += time.perf_counter() - t0
            print(f"  {label}: {ips:.1f} img/s", flush=True)
    set_mixed_precision(None)
    rows = []
    for label, sampler in samplers.items():
        ips = sorted(rates[label])[len(rates[label]) // 2]
        rows.append((label, args.pipeline_precision, str(sampler.pairs), ips,
                     epoch_images / ips / 60, walls[label]))
    return rows, epoch_images


def part_per_resolution(args, student_name: str):
    """Steady-state seconds per step at each (size, batch) pair of the multi-scale sampler, every
    pair timed alone after its own warm-up (a new shape's tracing and oneDNN set-up are not
    counted), fed by the real pipeline; the 256-px pair is the fixed-256 sampler's step. The
    sampler picks a pair uniformly per step, so a multi-scale epoch of N images takes
    N * mean(t) / mean(batch). None when there is no data."""
    got = pipeline_source(args, "the per-resolution profile")
    if got is None:
        return None
    ip, source, epoch_images = got
    rows = []
    for size, batch in ip.MultiScaleSampler(base_size=256, base_batch=args.batch).pairs:
        ips = pipeline_rate(args, student_name, ip, source, ip.MultiScaleSampler.fixed(size, batch))
        rows.append((size, batch, batch / ips, ips))
        print(f"  {size} px x {batch}: {batch / ips:.2f} s/step, {ips:.1f} img/s", flush=True)
    set_mixed_precision(None)
    fixed = next(r for r in rows if r[0] == 256)
    t_multi = epoch_images * np.mean([r[2] for r in rows]) / np.mean([r[1] for r in rows])
    t_fixed = epoch_images * fixed[2] / fixed[1]
    return rows, epoch_images, t_multi, t_fixed


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", default="mobilevit_xxs")
    p.add_argument("--teacher", default="vit_tiny_patch16")
    p.add_argument("--size", type=int, default=256, help="student input size of part 1")
    p.add_argument("--teacher_size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=6, help="timed steps per part-1 figure")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before each figure")
    p.add_argument("--num_classes", type=int, default=10)
    p.add_argument("--precisions", default="fp32",
                   help="comma list of fp32, mixed_bfloat16, mixed_float16 (GPU)")
    p.add_argument("--reference", default="kecam",
                   help="the other Keras implementation of part 1 (compress.bench.REFERENCES)")
    p.add_argument("--xla", action="store_true", help="also time our KD step under XLA")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--data", default=os.environ.get("IMAGENETTE_DIR"),
                   required=not os.environ.get("IMAGENETTE_DIR"),
                   help="Imagenette folder (default: $IMAGENETTE_DIR)")
    p.add_argument("--pipeline_steps", type=int, default=8)
    p.add_argument("--pipeline_precision", default="mixed_bfloat16")
    p.add_argument("--limit_per_class", type=int, default=100,
                   help="images per class the part-2 pipeline reads (throughput only)")
    p.add_argument("--skip_pipeline", action="store_true")
    p.add_argument("--deterministic", action="store_true",
                   help="seed and turn TF op determinism on (compress.training.set_seed)")
    p.add_argument("--only_pipeline", action="store_true", help="part 2 alone")
    p.add_argument("--per_resolution", action="store_true",
                   help="part 2 as a steady-state profile: each multi-scale (size, batch) pair "
                        "timed alone after its own warm-up (implies --only_pipeline)")
    p.add_argument("--rounds", type=int, default=1,
                   help="part 2: interleaved rounds of both samplers; the median is shown")
    args = p.parse_args(argv)
    if args.deterministic:
        from compress.training import set_seed

        set_seed(0, deterministic=True)
    for prec in args.precisions.split(",") + [args.pipeline_precision]:
        if prec not in ("fp32", "mixed_bfloat16", "mixed_float16"):
            p.error(f"--precisions/--pipeline_precision take fp32, mixed_bfloat16 or "
                    f"mixed_float16, got {prec!r}")
    if args.device == "cpu":
        tf.config.set_visible_devices([], "GPU")
    elif not tf.config.list_physical_devices("GPU"):
        p.error("--device=gpu: TensorFlow sees no GPU on this machine")
    student = args.student
    device = (tf.config.experimental.get_device_details(tf.config.list_physical_devices("GPU")[0])
              .get("device_name", "GPU") if args.device == "gpu" else "CPU")
    print(f"student {student}, teacher {args.teacher}; device {device}; {os.cpu_count()} CPUs, "
          f"intra-op threads {tf.config.threading.get_intra_op_parallelism_threads() or 'all'}, "
          f"inter-op {tf.config.threading.get_inter_op_parallelism_threads() or 'all'}; "
          f"load average {os.getloadavg()[0]:.1f}; TF {tf.__version__}; median of {args.steps} "
          f"steps after {args.warmup} untimed"
          f"{', op determinism on' if args.deterministic else ''}", flush=True)

    if not args.only_pipeline and not args.per_resolution:
        rows = part1(args, student)
        ref = args.reference
        print(f"\n| step | precision | student px | teacher px | ours img/s | {ref} img/s | "
              f"ours / {ref} |\n|---|---|---|---|---|---|---|")
        for r in rows:
            other = f"{r[5]:.1f} | {r[4] / r[5]:.2f}" if r[5] else "- | -"
            print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.1f} | {other} |")
        if args.xla:
            off, on = part_xla(args, student)
            print(f"\nXLA, our fp32 distillation step: jit_compile=False {off:.1f} img/s, "
                  f"jit_compile=True {on:.1f} img/s (on / off {on / off:.2f})")

    out = part_per_resolution(args, student) if args.per_resolution else None
    if out:
        rows3, epoch_images, t_multi, t_fixed = out
        print(f"\nlabels-only {student}, each multi-scale (size, batch) pair timed alone "
              f"({args.pipeline_steps} steps after {args.warmup} untimed at that shape); "
              f"epoch = {epoch_images} images\n"
              "| size | batch | s/step | img/s | s per Mpixel |\n|---|---|---|---|---|")
        for size, batch, t, ips in rows3:
            print(f"| {size} | {batch} | {t:.3f} | {ips:.1f} | {t / (size * size * batch / 1e6):.3f} |")
        print(f"steady-state epoch: multi-scale {t_multi / 60:.1f} min, fixed 256 "
              f"{t_fixed / 60:.1f} min: multi-scale {t_fixed / t_multi:.2f}x faster")
    if not args.skip_pipeline and not args.per_resolution:
        out = part2(args, student)
        if out:
            rows2, epoch_images = out
            print(f"\nlabels-only {student} on the input pipeline ({args.pipeline_steps} timed "
                  f"steps after {args.warmup} untimed); epoch = {epoch_images} images")
            print("| sampler | precision | (size, batch) pairs | img/s | epoch min | wall s |\n"
                  "|---|---|---|---|---|---|")
            for r in rows2:
                print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]:.1f} | {r[5]:.0f} |")
            print(f"multi-scale epoch {rows2[1][4] / rows2[0][4]:.2f}x faster than fixed 256")


if __name__ == "__main__":
    main()
