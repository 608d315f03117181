"""Training throughput (images/s) of the engine on this machine.

  python scripts/bench_train.py [--student=NAME] [--teacher=vit_tiny_patch16] [--size=128]
      [--teacher_size=224] [--batch=32] [--steps=10] [--warmup=3]
      [--precisions=fp32,mixed_bfloat16] [--data=DIR] [--pipeline_steps=8]

Part 1: a labels-only step and a soft-distillation step (teacher at `--teacher_size`) of the
student at `--size`, on in-memory random batches (no input pipeline cost), for each precision.
Part 2 (when `experiments.data` exists): the labels-only student fed by the real
pipeline from `--data`, MobileViT's multi-scale sampler (160..320, base 256 x `--batch`) against a
fixed 256 x `--batch` sampler, with the time of one epoch-equivalent (the train split's images)
projected from `--pipeline_steps` timed steps.

Part-1 figures are the median images/s of the timed steps of `compress.training.train`, after
`--warmup` untimed steps (tracing, allocator and oneDNN warm-up); part-2 figures are all timed
images over all timed seconds (the sizes differ from step to step). The student defaults to the
first registered
student, or `vit_tiny_patch16` as a placeholder when no student family is registered yet.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from compress.distill import Distiller  # noqa: E402
from compress.training import set_mixed_precision, train  # noqa: E402
from models.compat import keras, tf  # noqa: E402

DEFAULT_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenette2-160"


def default_student() -> str:
    students = [n for n in models.list_models() if models.get_model_info(n).role == "student"]
    return students[0] if students else "vit_tiny_patch16"


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


def run(model, make_ds, steps: int, warmup: int, precision: str | None) -> StepTimer:
    """Trains `warmup + steps` steps; the timer holds the images/s of the last `steps`."""
    timer = StepTimer(warmup)
    with tempfile.TemporaryDirectory() as workdir:
        train(model, make_ds, steps=warmup + steps, workdir=workdir, lr=1e-4, weight_decay=0.05,
              log_every=10, mixed_precision=precision, callbacks=[timer], verbose=False)
    return timer


def part1(args, student_name: str) -> list[tuple]:
    rows = []
    for precision in args.precisions.split(","):
        keras.backend.clear_session()
        set_mixed_precision(precision if precision != "fp32" else None)
        policy = None if precision == "fp32" else precision
        student = models.create_model(student_name, num_classes=args.num_classes)
        teacher = models.create_model(args.teacher, num_classes=args.num_classes,
                                      input_size=args.teacher_size)
        ds = random_batches(args.size, args.batch, args.num_classes)
        ips = run(student, lambda step: ds, args.steps, args.warmup, policy).median()
        rows.append(("labels only", precision, args.size, "-", ips))
        d = Distiller(student, teacher, kind="soft", alpha=0.5, temperature=1.0)
        ips = run(d, lambda step: ds, args.steps, args.warmup, policy).median()
        rows.append((f"soft KD, {args.teacher}", precision, args.size, args.teacher_size, ips))
        print(f"  {precision}: labels only {rows[-2][-1]:.1f} img/s, distillation "
              f"{rows[-1][-1]:.1f} img/s", flush=True)
    set_mixed_precision(None)
    return rows


def part2(args, student_name: str) -> list[tuple] | None:
    try:
        from experiments import data as ip
    except ImportError as e:
        print(f"\nskipping the multi-scale vs fixed-256 comparison: {e}")
        return None
    if not pathlib.Path(args.data, "train").is_dir():
        print(f"\nskipping the multi-scale vs fixed-256 comparison: no data at {args.data}")
        return None
    precision = args.pipeline_precision
    source = ip.load_source(str(args.data), "train", limit_per_class=args.limit_per_class)
    epoch_images = ip.load_source(str(args.data), "train", verify=False).num_examples
    samplers = {"multi-scale 160-320": ip.MultiScaleSampler(base_size=256, base_batch=args.batch),
                "fixed 256": ip.MultiScaleSampler.fixed(256, args.batch)}
    rows = []
    for label, sampler in samplers.items():
        keras.backend.clear_session()
        set_mixed_precision(None if precision == "fp32" else precision)
        student = models.create_model(student_name, num_classes=source.num_classes)
        t0 = time.perf_counter()
        ips = run(student, lambda step: ip.train_dataset(source, sampler, start_step=step),
                  args.pipeline_steps, args.warmup,
                  None if precision == "fp32" else precision).mean()
        rows.append((label, precision, str(sampler.pairs), ips, epoch_images / ips / 60,
                     time.perf_counter() - t0))
        print(f"  {label}: {ips:.1f} img/s", flush=True)
    set_mixed_precision(None)
    return rows, epoch_images


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", default=None)
    p.add_argument("--teacher", default="vit_tiny_patch16")
    p.add_argument("--size", type=int, default=128, help="student input size of part 1")
    p.add_argument("--teacher_size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed steps per part-1 figure")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before each figure")
    p.add_argument("--num_classes", type=int, default=10)
    p.add_argument("--precisions", default="fp32,mixed_bfloat16")
    p.add_argument("--data", default=os.environ.get("IMAGENETTE_DIR", str(DEFAULT_DATA)))
    p.add_argument("--pipeline_steps", type=int, default=8)
    p.add_argument("--pipeline_precision", default="mixed_bfloat16")
    p.add_argument("--limit_per_class", type=int, default=100,
                   help="images per class the part-2 pipeline reads (throughput only)")
    p.add_argument("--skip_pipeline", action="store_true")
    args = p.parse_args(argv)
    for prec in args.precisions.split(",") + [args.pipeline_precision]:
        if prec not in ("fp32", "mixed_bfloat16"):
            p.error(f"--precisions/--pipeline_precision take fp32 or mixed_bfloat16, got {prec!r}")
    student = args.student or default_student()
    print(f"student {student}, teacher {args.teacher}; {os.cpu_count()} CPUs, "
          f"TF {tf.__version__}, median of {args.steps} steps after {args.warmup} untimed",
          flush=True)

    rows = part1(args, student)
    print("\n| step | precision | student px | teacher px | img/s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.1f} |")

    if not args.skip_pipeline:
        out = part2(args, student)
        if out:
            rows2, epoch_images = out
            print(f"\nlabels-only {student} on the input pipeline ({args.pipeline_steps} timed "
                  f"steps after {args.warmup} untimed); epoch = {epoch_images} images")
            print("| sampler | precision | (size, batch) pairs | img/s | epoch min | wall s |\n"
                  "|---|---|---|---|---|---|")
            for r in rows2:
                print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]:.1f} | {r[5]:.0f} |")


if __name__ == "__main__":
    main()
