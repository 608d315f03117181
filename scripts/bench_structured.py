"""Latency and size of structured-pruned students against the dense ones, and whether magnitude
sparsity buys anything under XNNPACK (the structured front, measured without training;
docs/structured_pruning.md).

    python scripts/bench_structured.py --models=mobilevit_xxs:256,efficientformer_l1:224 \
        --keeps=1,0.7,0.55,0.4 --calib_dir=$IMAGENETTE_DIR/train \
        --outdir=runs/bench_structured --rounds=8 [--sparse]

Each model is built at its size with 10 classes and random weights, its BatchNorm statistics
re-estimated on real images (`compress.bench`, as `scripts/bench_tflite.py` does), and cut to every `--keeps`
fraction of its MACs by `compress.structured.prune_structured` with `magnitude` importance (the
widths, hence the latency, depend on the importance; trained weights and the Taylor importance
of the pipeline give other widths at the same MACs). Every model is exported to fp32 and int8 by
`compress.tflite.convert.export_tflite` (the pipeline's fast int8 path, the same representative
images) and timed by `compress.measure.latency.measure_latency` in fresh processes, one
thread, XNNPACK, in paired rounds (`_time_paired`: a shared host's load moves absolute times
far more than the ratios of one round). A keep below the smallest model is reported and
skipped. `--former_heads=2,1` also times each Mobile-Former with only its Formers' heads cut
to 2 and to 1 (of 4).

`--sparse` also zeroes the 50% (and 75%) smallest weights of every Conv2D/Dense kernel the
pipeline's magnitude prune touches (`prune.skip` globs of the preset) in the dense model and
times its fp32 file and its `fp32_sparse` file (sparse storage) beside the dense fp32 file:
XNNPACK's sparse inference path would show as a faster fp32_sparse file.

Prints one table; writes `<outdir>/bench_structured.json`.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def _zero_smallest(model, fraction: float, skip) -> None:
    """Magnitude sparsity without training: the smallest `fraction` of every prunable kernel."""
    from compress.prune import prunable_weights

    for layer in model.layers:
        if any(fnmatch.fnmatch(layer.name, g) for g in skip):
            continue
        for w in prunable_weights(layer):
            v = w.numpy()
            k = int(fraction * v.size)
            if k:
                cut = np.partition(np.abs(v).ravel(), k - 1)[k - 1]
                w.assign(np.where(np.abs(v) <= cut, 0, v).astype(v.dtype))


def _former_heads_cut(dense, name, size, heads: int):
    """`dense` with only its Formers' heads cut, to the `heads` of highest magnitude score each
    (`--former_heads`): what removing heads alone buys, which a MAC budget mixes with the rest."""
    import models
    from compress import bench, structured

    p = structured.plan(dense, input_size=size, importance="magnitude")
    kept = {g.name: np.arange(g.units) for g in p.groups}
    formers = [g for g in p.groups if g.ids is not None]
    if not formers:
        raise SystemExit(f"--former_heads: {name} has no Former (a mobile_former_* model does)")
    for g in formers:
        kept[g.name] = np.sort(np.argsort(-p.scores[g.name], kind="stable")[:heads])
    small = models.create_model(name, num_classes=10, input_size=size,
                                widths=structured.widths_of(p.groups, kept))
    structured.transfer(dense, small, p.groups, kept)
    return small


def _row(path, *, label, fmt, costs):
    from compress.tflite.audit import audit_tflite

    audit = audit_tflite(path)
    return dict(path=path, model=label, format=fmt, macs=costs["macs"], params=costs["params"],
                size_bytes=os.path.getsize(path), partitions=audit.get("partitions"),
                float_heavy_ops=audit.get("float_heavy_ops"), sparsity=audit.get("sparsity"))


def _time_paired(rows, args) -> None:
    """`--rounds` rounds; in each, every file (in reverse order every other round), one fresh
    process each: a busy host slows a round's files alike, so the ratios of one round hold
    where the absolute times do not. p50 = median over rounds; speed-up = median over rounds
    of dense / file (the dense file: the first row of the same model and format family)."""
    from compress.measure.latency import measure_latency

    times = {r["path"]: [] for r in rows}
    for i in range(args.rounds):
        for r in rows if i % 2 == 0 else rows[::-1]:  # alternate: no file always last
            lat = measure_latency(r["path"], threads=1, warmup=args.warmup, runs=args.runs,
                                  min_secs=0.5)
            times[r["path"]].append(lat["latency_p50_ms"])
            r.update(measured_delegate=lat["measured_delegate"], note=lat["note"])
    base = {}
    for r in rows:
        b = base.setdefault((r["model"].split()[0], r["format"].replace("_sparse", "")), r)
        t, tb = np.array(times[r["path"]]), np.array(times[b["path"]])
        r.update(p50_ms=float(np.median(t)), p50_rounds=t.tolist(),
                 speedup=float(np.median(tb / t)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="mobilevit_xxs:256,efficientformer_l1:224")
    p.add_argument("--keeps", default="1,0.7,0.55,0.4")
    p.add_argument("--calib_dir", default=None)
    p.add_argument("--outdir", default="runs/bench_structured")
    p.add_argument("--num_calib", type=int, default=32)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--rounds", type=int, default=8, help="paired timing rounds")
    p.add_argument("--sparse", action="store_true")
    p.add_argument("--former_heads", default="",
                   help="comma-separated head counts: also cut only the heads of every "
                        "Mobile-Former Former to that many (the highest-magnitude heads)")
    args = p.parse_args(argv)

    import models
    from compress import structured
    from compress.measure.costs import static_costs
    from compress.tflite.convert import export_tflite
    from experiments.configs import get_config
    from models.compat import keras

    os.makedirs(args.outdir, exist_ok=True)
    rows = []
    for spec in args.models.split(","):
        name, size = spec.split(":")
        size = int(size)
        images = np.concatenate(bench.bench_images(size, args.num_calib,
                                                   calib_dir=args.calib_dir))
        keras.backend.clear_session()
        dense = models.create_model(name, num_classes=10, input_size=size)
        bench.recalibrate_batchnorm(dense, images)
        dense_costs = static_costs(dense, size)
        for keep in [float(k) for k in args.keeps.split(",")]:
            try:
                model, cut = structured.prune_structured(
                    dense, lambda w: models.create_model(name, num_classes=10, input_size=size,
                                                         widths=w),
                    keep=keep, input_size=size, importance="magnitude")
            except ValueError as e:  # below the smallest model of min_width
                print(f"{name}: {e}")
                continue
            costs = static_costs(model, size)
            label = f"{name} keep {keep:g}"
            for fmt in ("fp32", "int8"):
                path = os.path.join(args.outdir, f"{name}.keep{keep:g}.{fmt}.tflite")
                export_tflite(model, path, fmt=fmt, input_size=size, representative=images)
                r = _row(path, label=label, fmt=fmt, costs=costs)
                r.update(keep=keep, kept_fraction=costs["macs"] / dense_costs["macs"],
                         params_ratio=costs["params"] / dense_costs["params"],
                         widths=cut["widths"])
                rows.append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "widths"}), flush=True)
        for heads in [int(h) for h in args.former_heads.split(",") if h]:
            model, label = _former_heads_cut(dense, name, size, heads), f"{name} heads {heads}"
            costs = static_costs(model, size)
            for fmt in ("fp32", "int8"):
                path = os.path.join(args.outdir, f"{name}.heads{heads}.{fmt}.tflite")
                export_tflite(model, path, fmt=fmt, input_size=size, representative=images)
                r = _row(path, label=label, fmt=fmt, costs=costs)
                r.update(kept_fraction=costs["macs"] / dense_costs["macs"],
                         params_ratio=costs["params"] / dense_costs["params"])
                rows.append(r)
                print(json.dumps(r), flush=True)
        if args.sparse:
            skip = tuple(get_config("quick").prune.skip)
            for fraction in (0.5, 0.75):
                _zero_smallest(dense, fraction, skip)  # cumulative: 0.75 includes the 0.5 zeros
                for fmt in ("fp32", "fp32_sparse"):
                    path = os.path.join(args.outdir, f"{name}.sparse{fraction:g}.{fmt}.tflite")
                    export_tflite(dense, path, fmt=fmt, input_size=size)
                    r = _row(path, label=f"{name} magnitude {fraction:g}", fmt=fmt,
                             costs=dense_costs)
                    rows.append(r)
                    print(json.dumps(r), flush=True)
    _time_paired(rows, args)
    out = os.path.join(args.outdir, "bench_structured.json")
    with open(out + ".tmp", "w") as f:
        json.dump(rows, f, indent=1, default=str)
    os.replace(out + ".tmp", out)
    _print_table(rows)
    return 0


def _print_table(rows) -> None:
    """Ratios against the first (dense) row of the same model and storage-independent format
    (an fp32_sparse file against the dense fp32 file); speed-ups from `_time_paired`."""
    print("\n| model | format | MMACs | kept MACs | params | params ratio | size KiB | size ratio "
          "| p50 ms | speed-up vs dense | partitions | float heavy ops |")
    print("|" + "---|" * 12)
    base = {}
    for r in rows:
        b = base.setdefault((r["model"].split()[0], r["format"].replace("_sparse", "")), r)
        print(f"| {r['model']} | {r['format']} | {r['macs'] / 1e6:.0f} | "
              f"{r.get('kept_fraction', 1.0):.2f} | {r['params']:,} | "
              f"{r.get('params_ratio', 1.0):.2f} | {r['size_bytes'] / 1024:.0f} | "
              f"{r['size_bytes'] / b['size_bytes']:.2f} | {r['p50_ms']:.2f} | "
              f"{r['speedup']:.2f}x | {r['partitions']} | {r['float_heavy_ops']} |")


if __name__ == "__main__":
    sys.exit(main())
