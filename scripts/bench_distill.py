"""What the teacher cache costs and saves: seconds per distill step and top-1 against online KD.

  python scripts/bench_distill.py timing [--student=mobilevit_xxs] [--teacher=vit_tiny_patch16]
      [--teacher_size=128] [--images=512] [--views=8] [--top_k=10] [--warmup=8] [--rounds=4]
      [--steps=12] [--precision=mixed_bfloat16] [--data=DIR]

  python scripts/bench_distill.py accuracy --teacher_dir=RUN/teacher --workdir=runs/cmp
      [--steps=150] [--train_per_class=0] [--val_per_class=100] [--views=8] [--data=DIR]

`timing`: the one-off cache build on `--images` training images (seconds per image-view, bytes
per image-view), then labels-only, online KD (the teacher run on every batch at
`--teacher_size`) and cached KD (`Distiller(teacher_from_data=True)` on the cached stream),
each a MobileViT student on the quick preset's multi-scale sampler (128..256 px, base 192 x
48), random weights, real images. The three are built once and traced during `--warmup` steps,
then timed in `--rounds` interleaved rounds of `--steps` steps (the same steps, so the same
resolutions and batch sizes, for the three; the order rotates each round; the first step of
each round is not timed): the VM is shared, so the figures are the medians over rounds of the
seconds per step, and of the ratios to labels-only within each round.

`accuracy`: the pipeline's distill stage twice from the same teacher folder at the quick preset
with `--steps` steps, once online (`teacher_cache.views=0`) and once from the cache, in
`<workdir>/online` and `<workdir>/cached`; prints both top-1 and the paired difference
(compress.stats) on the same validation images.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

REPO = pathlib.Path(__file__).resolve().parents[1]


def timing(args) -> None:
    import numpy as np

    import models
    from compress.distill import Distiller
    from compress.training import make_optimizer, set_mixed_precision
    from experiments import data as ip
    from experiments.data import teacher_cache as tc
    from models.compat import keras

    set_mixed_precision(args.precision)
    src = ip.load_source(str(args.data), "train", limit=args.images)
    sampler = ip.MultiScaleSampler(min_size=128, max_size=256, n_scales=5, base_size=192,
                                   base_batch=48, seed=0)
    teacher = models.create_model(args.teacher, num_classes=src.num_classes)
    teacher.trainable = False
    spec = tc.ViewSpec(views=args.views, top_k=min(args.top_k, src.num_classes),
                       scale=(0.08, 1.0), teacher_size=args.teacher_size)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cache = tc.build(pathlib.Path(tmp) / "cache", src, teacher, spec, verbose=False)
        build_s = time.perf_counter() - t0
    n_views = src.num_examples * args.views
    print(f"cache build: {src.num_examples} images x {args.views} views of {args.teacher} at "
          f"{args.teacher_size} px in {build_s:.1f} s: {1e3 * build_s / n_views:.2f} ms per "
          f"image-view (shards only: {1e3 * cache.manifest['build_s_per_view']:.2f} ms); "
          f"{tc.bytes_per_view(spec.top_k)} bytes per image-view "
          f"({cache.records.nbytes / 2**20:.2f} MiB for these images)", flush=True)

    augment = ip.Augment(scale=(0.08, 1.0))
    configs = {}
    for name in ("labels", "online", "cached"):
        keras.utils.set_random_seed(0)
        student = models.create_model(args.student, num_classes=src.num_classes)
        d = Distiller(student, teacher if name == "online" else None,
                      kind="none" if name == "labels" else "soft", alpha=0.5, temperature=2.0,
                      teacher_size=args.teacher_size if name == "online" else None,
                      teacher_from_data=name == "cached", label_smoothing=0.1)
        d.compile(optimizer=make_optimizer(student.trainable_variables, lr=1e-4,
                                           weight_decay=0.01, steps=10_000))
        configs[name] = (d, name == "cached")

    class StepTimes(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.last, self.times = None, []

        def on_train_batch_end(self, batch, logs=None):
            now = time.perf_counter()
            if self.last is not None:
                self.times.append(now - self.last)
            self.last = now

    def fit(name, start, steps):
        d, cached = configs[name]
        ds = ip.train_dataset(src, sampler, start_step=start, augment=augment,
                              teacher_cache=cache if cached else None)
        timer = StepTimes()
        d.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0, callbacks=[timer])
        return sum(timer.times) / max(len(timer.times), 1)

    for name in configs:
        fit(name, 0, args.warmup)
    names = list(configs)
    per_round = {n: [] for n in names}
    for r in range(args.rounds):
        start = args.warmup + r * args.steps
        order = names[r % 3:] + names[:r % 3]
        for name in order:
            per_round[name].append(fit(name, start, args.steps))
        print(f"round {r + 1}: " + ", ".join(f"{n} {per_round[n][-1]:.3f} s/step" for n in names),
              flush=True)
        # the summary so far after every round: a run cut short still reports its figures
        med = {n: float(np.median(v)) for n, v in per_round.items()}
        ratios = {n: np.array(per_round[n]) / np.array(per_round["labels"]) for n in names}
        print(f"{args.student}, quick sampler, {args.precision}, seconds per step (median of "
              f"{r + 1} round(s) of {args.steps - 1} timed steps):")
        for n in names:
            print(f"  {n:7s} {med[n]:.3f} s/step  {np.median(ratios[n]):.2f}x labels-only "
                  f"(rounds {ratios[n].min():.2f}-{ratios[n].max():.2f})")
        print(json.dumps({"s_per_step": med,
                          "ratio_to_labels": {n: float(np.median(v)) for n, v in ratios.items()},
                          "build_ms_per_image_view": 1e3 * build_s / n_views,
                          "bytes_per_image_view": tc.bytes_per_view(spec.top_k)}), flush=True)


def accuracy(args) -> None:
    import numpy as np

    from compress.stats import paired_difference
    from experiments.data import load_source

    workdir = pathlib.Path(args.workdir)
    runs = {"online": 0, "cached": args.views}
    for name, views in runs.items():
        cmd = [sys.executable, "-m", "experiments.pipeline", f"--student={args.student}",
               f"--teacher={args.teacher_dir}", f"--data={args.data}",
               f"--workdir={workdir / name}", "--preset=quick", "--stages=teacher,distill",
               f"--config.distill.steps={args.steps}",
               f"--config.distill.warmup_steps={max(1, args.steps // 10)}",
               f"--config.data.train_per_class={args.train_per_class}",
               f"--config.data.val_per_class={args.val_per_class}",
               "--config.distill.baseline=false",
               f"--config.distill.teacher_cache.views={views}"]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=REPO)
    val = load_source(str(args.data), "val", limit_per_class=args.val_per_class or None)
    preds = {n: np.load(workdir / n / "distill" / "val_predictions.npy") for n in runs}
    r = paired_difference(preds["online"] == val.labels, preds["cached"] == val.labels)
    seconds = {n: json.loads((workdir / n / "distill" / "metrics.json").read_text())
               for n in runs}
    print(f"online KD top-1 {100 * r['top1_a']:.1f}%, cached KD {100 * r['top1_b']:.1f}%: "
          f"cached - online {100 * r['diff']:+.1f} points [95% CI {100 * r['low']:+.1f}, "
          f"{100 * r['high']:+.1f}], McNemar p {r['p_mcnemar']:.2g}, {r['n']} val images")
    for n, m in seconds.items():
        print(f"  {n}: {m.get('s_per_step', float('nan')):.3f} s/step over {m['step']} steps, "
              f"stage wall {m['wall_s']:.0f} s (+ cache: {m.get('teacher_cache')})")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=("timing", "accuracy"))
    p.add_argument("--student", default="mobilevit_xxs")
    p.add_argument("--teacher", default="vit_tiny_patch16")
    p.add_argument("--teacher_size", type=int, default=128)
    p.add_argument("--teacher_dir", help="accuracy: a teacher stage folder of a pipeline run")
    p.add_argument("--workdir", help="accuracy: where the two runs go")
    p.add_argument("--data", default=os.environ.get("IMAGENETTE_DIR"),
                   required=not os.environ.get("IMAGENETTE_DIR"),
                   help="Imagenette folder (default: $IMAGENETTE_DIR)")
    p.add_argument("--images", type=int, default=512, help="timing: training images used")
    p.add_argument("--views", type=int, default=8)
    p.add_argument("--top_k", type=int, default=10)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=None,
                   help="timing: steps per round (default 12); accuracy: distill steps (150)")
    p.add_argument("--train_per_class", type=int, default=0)
    p.add_argument("--val_per_class", type=int, default=100)
    p.add_argument("--precision", default="mixed_bfloat16")
    args = p.parse_args(argv)
    if args.mode == "timing":
        args.steps = args.steps or 12
        timing(args)
    else:
        if not args.teacher_dir or not args.workdir:
            p.error("accuracy needs --teacher_dir and --workdir")
        args.steps = args.steps or 150
        accuracy(args)


if __name__ == "__main__":
    main()
