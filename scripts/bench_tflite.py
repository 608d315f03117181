"""Convert registered models to TFLite at their default size and time each file in a fresh process.

    python scripts/bench_tflite.py --models=vit_tiny_patch16 --threads=1,2 \
        [--formats=fp32,int8] [--delegates=xnnpack,none] --json=runs/bench.json

Each model is built with `models.create_model(name, input_size=default_size)` (random weights,
1000 classes), converted to every format (`fp32`, `fp16`, `drq`, `int8` = full integer with a
representative set of random images, or real ones with `--calib_dir`), and each file is timed
with `compress.measure.latency.measure_latency` for every thread count and delegate. Conversion uses
`compress.tflite.convert.export_tflite` (the fast int8 path); `--reference_converter=stock` converts the
reference implementation with a plain TFLiteConverter instead.

`--reference=kecam` also builds the same architectures from another Keras implementation,
keras-cv-attention-models (`pip install keras-cv-attention-models==1.4.3`; MobileViT v1 and
EfficientFormer v1, random weights), converts them the way its users would (the stock
TFLiteConverter from a [1, s, s, 3] concrete function, `--reference_converter=stock`) or with our
export (`ours`), and times them in the same run, so the two implementations sit side by side.

Writes a JSON array (one object per file x threads x delegate) with the keys `model`, `format`,
`input_size`, `threads`, `p50_ms`, `p90_ms`, `partitions`, `undelegated_ops` ({op: count}),
`size_bytes`, plus `delegate`, `p99_ms`, `mean_ms`, `std_ms`, `first_invoke_ms`, `peak_rss_mb`,
`gzip_bytes`, `runtime`, `runtime_version`, `flex_ops`, `float_heavy_ops`, `converter`,
`convert_s`, `implementation` (`ours` or the reference's name), `amx` (`absent`,
`available` or `denied`, `--amx=allow,deny`), `note`, `error`, `machine`. Figures from an x86 host are labelled host figures.

Beside each latency, how far the file is from its Keras model and from the host's limit:
`agreement` (top-1 agreement with the Keras model on `--num_eval` images that were not used for
calibration), `rel_l2` (||file - keras|| / ||keras|| of the logits), `max_abs_diff`; `macs`,
`floor_ms` (2 * MACs at the GEMM ceiling measured in the same run, `--floor`: float ceiling for
fp32/fp16 files, int8 ceiling for int8/drq files) and `x_floor` (p50 / floor). The weights are
random, so the BatchNorm statistics are first re-estimated on the calibration images
(`--recalibrate_bn`): the logits then depend on the image and the agreement means something (it is
not an accuracy: trained weights and real labels are the pipeline's job, `results.csv`). The
comparison is computed when a file is converted and kept beside it (`FILE.tflite.json`), so
`--reuse` reports it too. The ceiling goes in the JSON's rows as `ceiling` and is printed.
"""

from __future__ import annotations

import glob
import importlib
import itertools
import json
import os
import sys
import tempfile
import time
from typing import Callable, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

FORMATS = ("fp32", "fp16", "drq", "int8")
FLAGS = flags.FLAGS

_MODELS = flags.DEFINE_list("models", None, "Registered model names, comma-separated.")
_THREADS = flags.DEFINE_list("threads", ["1"], "Interpreter thread counts, e.g. 1,2.")
_FORMATS = flags.DEFINE_list("formats", ["fp32", "int8"], f"Formats among {', '.join(FORMATS)}.")
_DELEGATES = flags.DEFINE_list("delegates", ["xnnpack"], "xnnpack and/or none (no XNNPACK).")
_JSON = flags.DEFINE_string("json", None, "Where to write the JSON array of results.")
_OUTDIR = flags.DEFINE_string("outdir", None, "Keep the .tflite files here (default: a temp dir).")
_WARMUP = flags.DEFINE_integer("warmup", 10, "Untimed invokes before timing.")
_RUNS = flags.DEFINE_integer("runs", 50, "Minimum timed invokes per configuration.")
_MIN_SECS = flags.DEFINE_float("min_secs", 1.0, "Minimum seconds of timed invokes.")
_REPEATS = flags.DEFINE_integer("repeats", 1, "Fresh processes per configuration (medians).")
_NUM_CALIB = flags.DEFINE_integer("num_calib", 16, "Representative images for int8.")
_CALIB_DIR = flags.DEFINE_string(
    "calib_dir", None, "Image folder (e.g. imagenette2-160/train) for int8 calibration; "
    "images are scaled to [-1, 1]. Default: random images in [-1, 1].")  # fmt: skip
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 1000, "Classes of the built models.")
_REUSE = flags.DEFINE_bool(
    "reuse", False, "Time files already in --outdir as they are instead of converting again "
    "(e.g. after a killed run, or files converted earlier with --notime).")  # fmt: skip
_TIME = flags.DEFINE_bool("time", True, "Time the files; --notime only converts them.")
_AMX = flags.DEFINE_list(
    "amx", ["allow"], "allow and/or deny: time with XNNPACK free to use Intel AMX int8 kernels "
    "(the default interpreter) and/or with AMX refused to it (AVX512-VNNI, as on CPUs without "
    "AMX); see compress/measure/latency.py. Only matters on CPUs with amx_int8.")  # fmt: skip
_NUM_EVAL = flags.DEFINE_integer(
    "num_eval", 32, "Images (not among the calibration ones) on which each file is compared with "
    "its Keras model: top-1 agreement, relative logit error. 0 skips the comparison.")  # fmt: skip
_RECALIBRATE_BN = flags.DEFINE_bool(
    "recalibrate_bn", True, "Re-estimate the BatchNorm statistics of the random-weight models on "
    "the calibration images before converting: with init statistics the logits barely depend on "
    "the image, and top-1 agreement would measure nothing.")  # fmt: skip
_FLOOR = flags.DEFINE_bool(
    "floor", True, "Measure this host's GEMM ceiling (compress.measure.floor.gemm_ceiling) and give "
    "each file its floor, 2 * MACs / ceiling, and p50 / floor.")  # fmt: skip
_REFERENCE = flags.DEFINE_list(
    "reference", [], "Other Keras implementations to time beside ours, among: kecam "
    "(keras-cv-attention-models 1.4.3). Models it lacks are skipped for it.")  # fmt: skip
_REFERENCE_CONVERTER = flags.DEFINE_enum(
    "reference_converter", "stock", ["stock", "ours"], "How reference models are converted: the "
    "stock TFLiteConverter as their users would, or our compress.tflite.convert.")  # fmt: skip

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


def representative_images(
    input_size: int, n: int, *, calib_dir: str | None = None, seed: int = 0
) -> list[np.ndarray]:
    """`n` float32 [1, s, s, 3] calibration images in [-1, 1]: random, or read from a folder."""
    if not calib_dir:
        rng = np.random.default_rng(seed)
        return [rng.uniform(-1, 1, (1, input_size, input_size, 3)).astype(np.float32) for _ in range(n)]
    from models.compat import tf

    files = sorted(
        f for ext in ("jpg", "jpeg", "JPEG", "png")
        for f in glob.glob(os.path.join(calib_dir, "**", f"*.{ext}"), recursive=True)
    )  # fmt: skip
    if not files:
        raise ValueError(f"--calib_dir: no images under {calib_dir!r}")
    rng = np.random.default_rng(seed)
    out = []
    for f in rng.choice(files, size=min(n, len(files)), replace=False):
        img = tf.io.decode_image(tf.io.read_file(f), channels=3, expand_animations=False)
        img = tf.image.resize(tf.cast(img, tf.float32), (input_size, input_size))
        out.append((img.numpy()[None] / 127.5 - 1.0).astype(np.float32))
    return out


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


def _count(v) -> int | None:
    if v is None:
        return None
    if isinstance(v, dict):
        return int(sum(v.values()))
    if isinstance(v, (list, tuple)):
        return len(v)
    return int(v)


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
        images = (representative_images(size, need + num_eval, calib_dir=calib_dir)
                  if need + num_eval else [])  # fmt: skip
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
    from compress.io import file_sizes
    from compress.measure.floor import floor_ms
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
        sizes = file_sizes(path)
        audit = _audit(path)
        for delegate, t, amx_mode in itertools.product(delegates, threads, amx):
            lat = measure_latency(
                path, threads=int(t), delegate=delegate, warmup=warmup, runs=runs,
                min_secs=min_secs, input_size=size, repeats=repeats,
                deny_amx=amx_mode == "deny",
            )  # fmt: skip
            floor = floor_ms(info.get("macs"), fmt, (ceiling or {}).get((int(t), amx_mode)))
            p50 = lat["latency_p50_ms"]
            results.append(
                {
                    "model": name,
                    "implementation": impl,
                    "format": fmt,
                    "input_size": size,
                    "threads": int(t),
                    "p50_ms": lat["latency_p50_ms"],
                    "agreement": info.get("agreement"),
                    "rel_l2": info.get("rel_l2"),
                    "max_abs_diff": info.get("max_abs_diff"),
                    "eval_images": info.get("eval_images"),
                    "bn_recalibrated": info.get("bn_recalibrated"),
                    "macs": info.get("macs"),
                    "floor_ms": floor,
                    "x_floor": p50 / floor if floor and p50 == p50 else None,
                    "ceiling": (ceiling or {}).get((int(t), amx_mode)),
                    "p90_ms": lat["latency_p90_ms"],
                    "partitions": lat["partitions"],
                    "undelegated_ops": lat["undelegated_ops"],
                    "size_bytes": sizes["size_bytes"],
                    "gzip_bytes": sizes["gzip_bytes"],
                    "delegate": delegate,
                    "measured_delegate": lat.get("measured_delegate"),
                    "amx": lat.get("amx"),
                    "p99_ms": lat.get("latency_p99_ms"),
                    "mean_ms": lat.get("latency_mean_ms"),
                    "std_ms": lat.get("latency_std_ms"),
                    "min_ms": lat.get("latency_min_ms"),
                    "first_invoke_ms": lat.get("first_invoke_ms"),
                    "runs": lat.get("runs"),
                    "warmup": lat.get("warmup"),
                    "repeats": lat.get("repeats", 1),
                    "peak_rss_mb": lat.get("peak_rss_mb"),
                    "runtime": lat.get("runtime"),
                    "runtime_version": lat.get("runtime_version"),
                    "op_counts": lat.get("op_counts"),
                    "flex_ops": _count(audit.get("flex_ops")),
                    "float_heavy_ops": _count(audit.get("float_heavy_ops")),
                    "path": path,
                    "converter": conv["converter"],
                    "convert_s": round(conv["convert_s"], 2),
                    "note": lat.get("note", ""),
                    "error": lat.get("error"),
                    "machine": machine,
                }
            )
            results[-1] = {k: _nan_to_none(v) for k, v in results[-1].items()}
            log(f"  threads={t} {delegate} amx={lat.get('amx')}: "
                f"p50 {_fmt(lat['latency_p50_ms'])} ms")
    return results


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


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        threads = [int(t) for t in _THREADS.value]
    except ValueError as e:
        raise app.UsageError(f"--threads: integers expected, got {_THREADS.value}") from e
    tmp = None if _OUTDIR.value else tempfile.TemporaryDirectory(prefix="bench_tflite_")
    outdir = _OUTDIR.value or tmp.name
    try:
        results = bench_models(
            _MODELS.value,
            threads=threads,
            formats=_FORMATS.value,
            delegates=_DELEGATES.value,
            outdir=outdir,
            warmup=_WARMUP.value,
            runs=_RUNS.value,
            min_secs=_MIN_SECS.value,
            repeats=_REPEATS.value,
            num_calib=_NUM_CALIB.value,
            calib_dir=_CALIB_DIR.value,
            num_classes=_NUM_CLASSES.value,
            references=_REFERENCE.value,
            reference_converter=_REFERENCE_CONVERTER.value,
            amx=_AMX.value,
            reuse=_REUSE.value,
            time_files=_TIME.value,
            num_eval=_NUM_EVAL.value,
            recalibrate_bn=_RECALIBRATE_BN.value,
            floor=_FLOOR.value,
        )
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    finally:
        if tmp is not None:
            tmp.cleanup()
    print()
    print(format_table(results))
    if results and results[0].get("machine"):
        print(f"\n{results[0]['machine']['label']}")
    seen = set()
    for r in results:
        c, key = r.get("ceiling"), (r.get("threads"), r.get("amx"))
        if c and key not in seen:
            seen.add(key)
            print(f"GEMM ceiling, threads={key[0]} amx={key[1]}: fp32 {c['fp32_gflops']:.0f} GFLOP/s, "
                  f"int8 {c['int8_gops']:.0f} GOP/s (floor = 2 * MACs / ceiling; x_floor = p50 / floor)")
    if _JSON.value:
        from compress.io import write_json

        write_json(_JSON.value, results)
        print(f"wrote {_JSON.value}")


if __name__ == "__main__":
    flags.mark_flag_as_required("models")
    app.run(main)
