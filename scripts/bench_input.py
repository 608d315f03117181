"""Images/s of the training input pipeline: MobileViT multi-scale sampler vs a fixed resolution.

    python scripts/bench_input.py --data=$IMAGENETTE_DIR --seconds=30 \
        [--preset=full] [--parallel=0,1,2,4]

Runs `experiments.data.train_dataset` on its own (no model) and prints, for each
sampler, the steady-state images/s and batches/s (the first `--warmup` batches are not timed),
plus the load + decode-check time of the source and the eval pipeline's images/s. The sampler
is the `--preset`'s distill sampler (full: 160..320, 5 scales, base 256 x 128) and the fixed
one its base size x base batch. `--parallel`: the decode/augment map's num_parallel_calls, one
row each (0 = AUTOTUNE, which tf.data tunes up to the CPU budget: the core count).

Measured (2-core VM shared with other jobs, load average 13, default augmentation, 10 s a row,
full preset): multi-scale (160:327 192:227 256:128 288:101 320:81) 1065 img/s with AUTOTUNE,
790 / 741 with 1 / 2 parallel calls; fixed 256:128 587 (AUTOTUNE), 613 / 636; eval at 256 456
img/s. First decode check of the train split 11-22 s, 0.4 s when cached.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import data as ip  # noqa: E402
from experiments.configs import PRESETS, get_config  # noqa: E402
from models.compat import tf  # noqa: E402


def _time(ds, seconds: float, warmup: int):
    it = iter(ds)
    for _ in range(warmup):
        next(it)
    images = batches = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        x, _ = next(it)
        images += int(x.shape[0])
        batches += 1
    wall = time.perf_counter() - start
    return images / wall, batches / wall


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.environ.get("IMAGENETTE_DIR"),
                   required=not os.environ.get("IMAGENETTE_DIR"),
                   help="Imagenette folder (default: $IMAGENETTE_DIR)")
    p.add_argument("--preset", default="full", choices=PRESETS, help="whose distill sampler")
    p.add_argument("--parallel", default="0",
                   help="comma list of num_parallel_calls of the decode map; 0 = AUTOTUNE")
    p.add_argument("--seconds", type=float, default=30.0, help="timed seconds per configuration")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    p.add_argument("--randaugment", type=int, default=0)
    p.add_argument("--mix", action="store_true", help="mixup 0.8 / cutmix 1.0")
    args = p.parse_args(argv)
    try:
        parallel = [int(v) for v in args.parallel.split(",")]
        assert all(v >= 0 for v in parallel)
    except (ValueError, AssertionError):
        p.error(f"--parallel takes non-negative integers (0 = AUTOTUNE), got {args.parallel!r}")
    s = get_config(args.preset).distill.sampler

    t = time.perf_counter()
    src = ip.load_source(args.data, "train")
    print(f"source: {src!r}; load + decode check {time.perf_counter() - t:.1f} s")
    aug = ip.Augment(randaugment=args.randaugment,
                     mixup_alpha=0.8 if args.mix else 0.0, cutmix_alpha=1.0 if args.mix else 0.0)
    samplers = {
        "multi-scale": ip.MultiScaleSampler(min_size=s.min_size, max_size=s.max_size,
                                            n_scales=s.n_scales, base_size=s.base_size,
                                            base_batch=s.base_batch),
        f"fixed {s.base_size}": ip.MultiScaleSampler.fixed(s.base_size, s.base_batch),
    }
    budget = tf.data.Options().autotune.cpu_budget or os.cpu_count()
    print(f"cpus: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f}, augment: {aug}, "
          f"{args.preset} preset sampler; AUTOTUNE budget {budget} cores")
    print(f"{'sampler':<14} {'parallel':>8} {'pairs':<58} {'img/s':>7} {'batch/s':>8}")
    for name, sampler in samplers.items():
        for calls in parallel:
            ds = ip.train_dataset(src, sampler, augment=aug,
                                  num_parallel_calls=calls or tf.data.AUTOTUNE)
            ips, bps = _time(ds, args.seconds, args.warmup)
            pairs = " ".join(f"{size}:{b}" for size, b in sampler.pairs)
            label = calls or "AUTOTUNE"
            print(f"{name:<14} {label:>8} {pairs:<58} {ips:7.0f} {bps:8.2f}", flush=True)
    ev = ip.eval_dataset(ip.load_source(args.data, "val"), size=s.base_size,
                         batch_size=s.base_batch)
    ips, bps = _time(ev.repeat(), args.seconds, 1)
    print(f"{'eval':<14} {'AUTOTUNE':>8} {f'{s.base_size}:{s.base_batch}':<58} {ips:7.0f} "
          f"{bps:8.2f}")


if __name__ == "__main__":
    main()
