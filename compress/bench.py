"""Convert registered models to TFLite at their default size and time each file: the library of
`scripts/bench_tflite.py` (its module documentation describes the measurement and the flags).

`bench_models(names, ...)` converts every (model, format) of our implementation and of each
reference implementation that has the model (`REFERENCES`), compares each file with its Keras
model on images not used for calibration, and times each file for every thread count, delegate
and AMX mode; one row per (file, threads, delegate, amx), built by
`compress.results.table.make_row` with the latency keys shortened (`p50_ms`, `p90_ms`, ...) and
`undelegated_ops` kept as an `{op: count}` object. `format_table(rows)` prints them.

Calibration and comparison images are the pipeline's (`experiments.data.representative_images`,
[0, 1] like every model's input) read from an image folder, or uniform random images in [0, 1].
"""

from __future__ import annotations

import glob
import importlib
import itertools
import json
import os
import time
from typing import Callable, Sequence

import numpy as np

FORMATS = ("fp32", "fp16", "drq", "int8")
_LATENCY_KEYS = ("p50", "p90", "p99", "mean", "std", "min")  # latency_<k>_ms -> <k>_ms

# Other Keras implementations of our architectures: registered name -> "module.builder" inside
# the package. kecam has no Mobile-Former and its ViTs differ in layout, so only these six.
REFERENCES = {
    "kecam": {
        "package": "keras_cv_attention_models",
        "pip": "keras-cv-attention-models==1.4.3",
        "models": {
            "mobilevit_xxs": "mobilevit.MobileViT_XXS",
            "mobilevit_xs": "mobilevit.MobileViT_XS",
            "mobilevit_s": "mobilevit.MobileViT_S",
            "efficientformer_l1": "efficientformer.EfficientFormerL1",
            "efficientformer_l3": "efficientformer.EfficientFormerL3",
            "efficientformer_l7": "efficientformer.EfficientFormerL7",
        },
    },
}


def reference_builder(impl: str, name: str) -> Callable | None:
    """`build(num_classes, input_size)` of `name` in the reference implementation `impl`, or None
    when it lacks that model. ValueError for an unknown or uninstalled reference."""
    if impl not in REFERENCES:
        raise ValueError(f"--reference: unknown implementation {impl!r}; known: {', '.join(REFERENCES)}")
    ref = REFERENCES[impl]
    if name not in ref["models"]:
        return None
    import models.compat  # noqa: F401  (TF_USE_LEGACY_KERAS before the package imports Keras)

    module, fn = ref["models"][name].rsplit(".", 1)
    try:
        mod = importlib.import_module(f"{ref['package']}.{module}")
    except ImportError as e:
        raise ValueError(f"--reference={impl}: not installed ({e}); pip install {ref['pip']}") from e

    def build(num_classes: int, input_size: int, **kwargs):
        return getattr(mod, fn)(
            input_shape=(input_size, input_size, 3), num_classes=num_classes, pretrained=None,
            **kwargs,
        )

    return build


# --------------------------------------------------------------------------- conversion


def bench_images(input_size: int, n: int, *, calib_dir: str | None = None, seed: int = 0
                 ) -> list[np.ndarray]:
    """`n` float32 [1, s, s, 3] images in [0, 1]: uniform random, or the pipeline's
    representative images (`experiments.data.representative_images`: centre crop, [0, 1]) of
    the image files anywhere under `calib_dir`."""
    if n < 1:
        return []
    if not calib_dir:
        rng = np.random.default_rng(seed)
        return [rng.random((1, input_size, input_size, 3), np.float32) for _ in range(n)]
    from experiments.data import Source, representative_images

    files = sorted(
        f for ext in ("jpg", "jpeg", "JPEG", "png")
        for f in glob.glob(os.path.join(calib_dir, "**", f"*.{ext}"), recursive=True)
    )  # fmt: skip
    if not files:
        raise ValueError(f"--calib_dir: no images under {calib_dir!r}")
    source = Source(name=calib_dir, split="calibration", class_names=["image"],
                    labels=[0] * len(files), paths=files)
    return [x[None] for x in representative_images(source, input_size, n, seed=seed)]


def _plain_convert(
    model, path: str, fmt: str, input_size: int, representative: list[np.ndarray] | None
) -> None:
    """TFLiteConverter with the usual settings of each format, from a concrete function pinned
    to [1, s, s, 3]: with a free batch dim, every Dense on a rank-3 tensor keeps a
    SHAPE/GATHER/PACK/REDUCE_PROD/RESHAPE chain that XNNPACK does not take, splitting a ViT
    into ~100 delegate partitions."""
    from models.compat import tf

    spec = tf.TensorSpec([1, input_size, input_size, 3], tf.float32)
    fn = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
    conv = tf.lite.TFLiteConverter.from_concrete_functions([fn], model)
    if fmt in ("fp16", "drq", "int8"):
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    if fmt == "fp16":
        conv.target_spec.supported_types = [tf.float16]
    if fmt == "int8":
        if representative is None:
            raise ValueError("int8 needs a representative set")
        conv.representative_dataset = lambda: ([x] for x in representative)
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = tf.int8
        conv.inference_output_type = tf.int8
    with open(path, "wb") as f:
        f.write(conv.convert())


def convert(
    model, path: str, fmt: str, input_size: int, representative: list[np.ndarray] | None,
    *, stock: bool = False,
) -> dict:
    """Write `model` as a .tflite file with our export (or the stock converter when `stock`);
    returns {'converter', 'convert_s', ...export info}."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    from compress.tflite.convert import export_tflite

    t0 = time.perf_counter()
    if not stock:
        info = export_tflite(
            model,
            path,
            fmt=fmt,
            input_size=input_size,
            representative=(lambda: ([x] for x in representative)) if representative else None,
        )
        info = dict(info or {})
        converter = "compress.tflite.convert"
    else:
        _plain_convert(model, path, fmt, input_size, representative)
        info, converter = {}, "TFLiteConverter"
    return {**info, "converter": converter, "convert_s": time.perf_counter() - t0}


def recalibrate_batchnorm(model, images: np.ndarray) -> int:
    """Sets every BatchNormalization's moving mean and variance to the statistics of `images`
    (one forward pass in training mode with momentum 0), as a data-dependent init would: a
    random-weight network then normalises its activations and its logits vary with the image.
    Returns the number of BatchNormalization layers."""
    from models.compat import keras

    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [bn.momentum for bn in bns]
    try:
        for bn in bns:
            bn.momentum = 0.0
        if bns:
            model(np.asarray(images, np.float32), training=True)
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m
    return len(bns)


def _fidelity(model, path: str, images: list[np.ndarray]) -> dict:
    """Keras-vs-file comparison on `images` (agreement, errors); {} without images."""
    if model is None or not images:
        return {}
    from compress.tflite.audit import parity

    try:
        p = parity(model, path, np.concatenate(images), threads=1)
    except Exception as e:  # a file the interpreter cannot run: the timing reports it
        return {"fidelity_error": f"{type(e).__name__}: {e}"}
    return {"agreement": p["top1_agreement"], "rel_l2": p["rel_l2"],
            "max_abs_diff": p["max_abs_diff"], "eval_images": p["n"]}


def _sidecar(path: str) -> str:
    return path + ".json"


def _write_sidecar(path: str, info: dict) -> None:
    from compress.io import write_json

    write_json(_sidecar(path), info)


def _read_sidecar(path: str) -> dict:
    try:
        with open(_sidecar(path)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _audit(path: str) -> dict:
    try:
        from compress.tflite.audit import audit_tflite
    except ImportError:
        return {}
    try:
        return dict(audit_tflite(path))
    except Exception as e:  # an audit failure must not lose the timing
        return {"audit_error": f"{type(e).__name__}: {e}"}


# --------------------------------------------------------------------------- benchmark


def check_names(names: Sequence[str]) -> None:
    """ValueError naming the unknown models and listing the known ones."""
    from models import list_models

    known = list_models()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(
            f"--models: unknown model(s) {', '.join(unknown)}; known models: {', '.join(known)}"
        )


def bench_models(
    names: Sequence[str],
    *,
    threads: Sequence[int] = (1,),
    formats: Sequence[str] = ("fp32", "int8"),
    delegates: Sequence[str] = ("xnnpack",),
    outdir: str,
    warmup: int = 10,
    runs: int = 50,
    min_secs: float = 1.0,
    repeats: int = 1,
    num_calib: int = 16,
    calib_dir: str | None = None,
    num_classes: int = 1000,
    create: Callable | None = None,
    references: Sequence[str] = (),
    reference_converter: str = "stock",
    amx: Sequence[str] = ("allow",),
    reuse: bool = False,
    time_files: bool = True,
    num_eval: int = 0,
    recalibrate_bn: bool = False,
    floor: bool = False,
    ceiling_fn: Callable | None = None,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Convert and time every (model, format) of our implementation and of each reference
    implementation that has the model; one result dict per (file, threads, delegate).

    `num_eval`, `recalibrate_bn` and `floor` are the flags of the same names (off by default
    here, on in the command line); `ceiling_fn` replaces `compress.measure.floor.gemm_ceiling`."""
    import models
    from compress.measure.costs import static_costs
    from compress.measure.floor import gemm_ceiling
    from compress.measure.host import machine_info

    check_names(names)
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ValueError(f"--formats: unknown {', '.join(bad)}; known: {', '.join(FORMATS)}")
    bad = [d for d in delegates if d not in ("xnnpack", "none")]
    if bad:
        raise ValueError(f"--delegates: unknown {', '.join(bad)}; known: xnnpack, none")
    if not threads or any(int(t) < 1 for t in threads):
        raise ValueError(f"--threads: thread counts must be >= 1, got {list(threads)}")
    bad = [a for a in amx if a not in ("allow", "deny")]
    if bad or not amx:
        raise ValueError(f"--amx: {', '.join(bad) or 'empty'}; accepted: allow, deny")
    if reference_converter not in ("stock", "ours"):
        raise ValueError(f"--reference_converter: {reference_converter!r}; accepted: stock, ours")
    if num_eval < 0:
        raise ValueError(f"--num_eval: must be >= 0, got {num_eval}")
    create = create or models.create_model
    machine = machine_info()
    os.makedirs(outdir, exist_ok=True)
    ceiling = {}
    if floor and time_files:
        ceiling_fn = ceiling_fn or gemm_ceiling
        for amx_mode in amx:
            log(f"GEMM ceiling (1x1 convs), amx={amx_mode}")
            for t, c in ceiling_fn(os.path.join(outdir, "ceiling"), threads=[int(t) for t in threads],
                                   deny_amx=amx_mode == "deny").items():
                ceiling[(t, amx_mode)] = c
                log(f"  threads={t}: fp32 {c['fp32_gflops']:.0f} GFLOP/s, int8 {c['int8_gops']:.0f} GOP/s")
    results = []
    for name in names:
        size = models.get_model_info(name).default_size
        builders = [("ours", lambda: create(name, num_classes=num_classes, input_size=size))]
        for impl in references:
            build = reference_builder(impl, name)
            if build is None:
                log(f"{impl} has no {name}; skipped for it")
                continue
            builders.append((impl, lambda build=build: build(num_classes, size)))
        need = num_calib if ("int8" in formats or recalibrate_bn) else 0
        images = bench_images(size, need + num_eval, calib_dir=calib_dir)
        rep, evals = (images[:need] or None), images[need:]
        for impl, build in builders:
            paths = {f: _file_path(outdir, name, impl, f) for f in formats}
            have_all = reuse and all(os.path.exists(p) for p in paths.values())
            model = None if have_all else build()
            extra = {}
            if model is not None:
                if recalibrate_bn and rep:
                    extra["bn_recalibrated"] = recalibrate_batchnorm(model, np.concatenate(rep)) > 0
                extra["macs"] = static_costs(model, size)["macs"]
            stock = impl != "ours" and reference_converter == "stock"
            results += _bench_one(
                model, name, impl, size, paths, rep, stock=stock, reuse=reuse,
                time_files=time_files, threads=threads, delegates=delegates, warmup=warmup,
                runs=runs, min_secs=min_secs, repeats=repeats, machine=machine, amx=amx, log=log,
                evals=evals, extra=extra, ceiling=ceiling,
            )  # fmt: skip
            del model
    return results


def _file_path(outdir: str, name: str, impl: str, fmt: str) -> str:
    return os.path.join(outdir, f"{name}.{'bench' if impl == 'ours' else impl}.{fmt}.tflite")


def _bench_one(model, name, impl, size, paths, rep, *, stock, reuse, time_files, threads,
               delegates, warmup, runs, min_secs, repeats, machine, amx, log, evals=(),
               extra=None, ceiling=None) -> list[dict]:
    """Convert one built model to every format (`paths`: format -> file), compare each file with
    the model on `evals` (kept beside the file), and time each file."""
    from compress.measure.latency import measure_latency

    results = []
    for fmt, path in paths.items():
        try:
            if reuse and os.path.exists(path):
                log(f"reusing {path}")
                conv = {"converter": "reused", "convert_s": 0.0}
                info = _read_sidecar(path)
            else:
                log(f"converting {impl} {name} {fmt} at {size}px -> {path}")
                conv = convert(model, path, fmt, size, rep if fmt == "int8" else None, stock=stock)
                info = {**(extra or {}), **_fidelity(model, path, list(evals))}
                _write_sidecar(path, info)
                if "agreement" in info:
                    log(f"  vs Keras on {info['eval_images']} images: top-1 agreement "
                        f"{info['agreement']:.3f}, relative logit error {info['rel_l2']:.4f}")
        except Exception as e:
            log(f"  conversion failed: {type(e).__name__}: {e}")
            results.append(
                {"model": name, "implementation": impl, "format": fmt, "input_size": size,
                 "threads": None, "p50_ms": None, "p90_ms": None, "partitions": None,
                 "undelegated_ops": {}, "size_bytes": None,
                 "error": f"conversion: {type(e).__name__}: {e}"}
            )  # fmt: skip
            continue
        if not time_files:
            continue
        audit = _audit(path)
        for delegate, t, amx_mode in itertools.product(delegates, threads, amx):
            lat = measure_latency(
                path, threads=int(t), delegate=delegate, warmup=warmup, runs=runs,
                min_secs=min_secs, input_size=size, repeats=repeats,
                deny_amx=amx_mode == "deny",
            )  # fmt: skip
            row = _row(path, lat, name=name, impl=impl, fmt=fmt, size=size, info=info,
                       conv=conv, audit=audit, machine=machine,
                       ceiling=(ceiling or {}).get((int(t), amx_mode)))
            results.append(row)
            log(f"  threads={t} {delegate} amx={lat.get('amx')}: p50 {_fmt(row['p50_ms'])} ms")
    return results


def _row(path, lat, *, name, impl, fmt, size, info, conv, audit, machine, ceiling) -> dict:
    """One timed file as a results row (`make_row`), with the benchmark's own keys."""
    from compress.measure.floor import floor_ms
    from compress.results.table import make_row

    row = make_row(path, lat, model=name, format=fmt, input_size=size, audit=audit,
                   agreement=info.get("agreement"), macs=info.get("macs"), machine=machine)
    for k in _LATENCY_KEYS:
        row[f"{k}_ms"] = row.pop(f"latency_{k}_ms", None)
    floor = floor_ms(info.get("macs"), fmt, ceiling)
    p50 = row["p50_ms"]
    row.update({
        "implementation": impl,
        "undelegated_ops": dict(lat.get("undelegated_ops") or {}),
        "rel_l2": info.get("rel_l2"),
        "max_abs_diff": info.get("max_abs_diff"),
        "eval_images": info.get("eval_images"),
        "bn_recalibrated": info.get("bn_recalibrated"),
        "floor_ms": floor,
        "x_floor": p50 / floor if floor and p50 is not None and p50 == p50 else None,
        "ceiling": ceiling,
        "op_counts": lat.get("op_counts"),
        "converter": conv["converter"],
        "convert_s": round(conv["convert_s"], 2),
        "error": lat.get("error"),
        "machine": machine,
    })
    return {k: _nan_to_none(v) for k, v in row.items()}


def _nan_to_none(v):
    return None if isinstance(v, float) and v != v else v


def _fmt(v, spec=".2f") -> str:
    return "-" if v is None or (isinstance(v, float) and v != v) else format(v, spec)


def format_table(results: Sequence[dict]) -> str:
    """A plain-text table of the results."""
    head = ("model", "impl", "format", "size", "threads", "delegate", "amx", "p50_ms", "p90_ms", "KiB",
            "partitions", "undelegated", "agree", "rel_err", "x_floor", "note")  # fmt: skip
    rows = []
    for r in results:
        und = r.get("undelegated_ops") or {}
        rows.append((
            r["model"], r.get("implementation", "ours"), r["format"], str(r["input_size"]), str(r.get("threads")),
            str(r.get("delegate", "")), str(r.get("amx")), _fmt(r.get("p50_ms")), _fmt(r.get("p90_ms")),
            _fmt(r["size_bytes"] / 1024 if r.get("size_bytes") else None, ".0f"),
            str(r.get("partitions")), str(sum(und.values())),
            _fmt(r.get("agreement"), ".3f"), _fmt(r.get("rel_l2"), ".4f"), _fmt(r.get("x_floor"), ".1f"),
            (r.get("note") or r.get("error") or "")[:60],
        ))  # fmt: skip
    widths = [max(len(h), *(len(x[i]) for x in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])
