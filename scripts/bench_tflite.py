"""Convert registered models to TFLite at their default size and time each file in a fresh process.

    python scripts/bench_tflite.py --models=vit_tiny_patch16 --threads=1,2 \
        [--formats=fp32,int8] [--delegates=xnnpack,none] --json=runs/bench.json

The library is `compress.bench`. Each model is built with `models.create_model(name,
input_size=default_size)` (random weights, 1000 classes), converted to every format (`fp32`,
`fp16`, `drq`, `int8` = full integer with a representative set of random images in [0, 1], or the
pipeline's representative images of `--calib_dir`), and each file is timed
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
`available` or `denied`, `--amx=allow,deny`), `note`, `error`, `machine`: a results.csv row
(`compress.results.table.make_row`) with the latency keys shortened and the benchmark's own keys.
Figures from an x86 host are labelled host figures.

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

import os
import sys
import tempfile
from typing import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from compress.bench import FORMATS, bench_models, format_table  # noqa: E402

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
    "calib_dir", None, "Image folder (e.g. imagenette2-160/train) for int8 calibration and the "
    "comparison with Keras; its images are prepared as the pipeline's representative images "
    "(centre crop, [0, 1]). Default: random images in [0, 1].")  # fmt: skip
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
