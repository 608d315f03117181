"""Latency harness, TFLite evaluation, results.csv/report/HParams, compare, compress.bench and
scripts/bench_tflite.py.

The .tflite files are tiny models converted here with a plain TFLiteConverter (a private
stand-in for compress.tflite.convert, which this file does not depend on).
"""

import csv
import glob
import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from compress import bench
from compress.measure import accuracy, floor, host, latency
from compress.results import hparams, report, table
from compress.tflite import interpreter
from experiments import benchmark as ebench
from models.compat import keras, tf
from tests.helpers import require_module

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAST = dict(warmup=2, runs=8, min_secs=0.0)
SIZE, CLASSES = 16, 4


def _tiny_conv(seed=0, size=SIZE, classes=CLASSES):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(inp)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    out = keras.layers.Dense(classes, name="head")(x)
    return keras.Model(inp, out)


def _convert(model, path, *, int8=False, rep=None, sparse=False, int8_io=False):
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    if int8:
        conv.optimizations = [tf.lite.Optimize.DEFAULT] + (
            [tf.lite.Optimize.EXPERIMENTAL_SPARSITY] if sparse else []
        )
        conv.representative_dataset = lambda: ([x] for x in rep)
        if int8_io:
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            conv.inference_input_type = tf.int8
            conv.inference_output_type = tf.int8
    with open(path, "wb") as f:
        f.write(conv.convert())
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """fp32 and int8 (int8 I/O) files of a tiny conv net, and a sparse int8 Dense net."""
    d = tmp_path_factory.mktemp("wd") / "export"
    d.mkdir()
    rng = np.random.default_rng(0)
    model = _tiny_conv()
    rep = [rng.uniform(0, 1, (1, SIZE, SIZE, 3)).astype(np.float32) for _ in range(16)]
    out = {
        "model": model,
        "fp32": _convert(model, d / "tiny.distill.fp32.tflite"),
        "int8": _convert(model, d / "tiny.distill.int8.tflite", int8=True, rep=rep, int8_io=True),
    }
    # A Dense net with 80 % zero kernels, stored sparse: XNNPACK in ai-edge-litert 2.3.0 refuses
    # to prepare its int8 FULLY_CONNECTED nodes ("failed to delegate FULLY_CONNECTED node").
    inp = keras.Input((32,))
    x = keras.layers.Dense(64, activation="relu", name="d1")(inp)
    dense = keras.Model(inp, keras.layers.Dense(CLASSES, name="head")(x))
    for layer in dense.layers[1:]:
        k, b = layer.get_weights()
        k[rng.random(k.shape) < 0.8] = 0.0
        layer.set_weights([k, b])
    rep32 = [rng.standard_normal((1, 32)).astype(np.float32) for _ in range(8)]
    out["sparse"] = _convert(
        dense, d / "dense.prune.int8_sparse.tflite", int8=True, rep=rep32, sparse=True
    )
    return out


# --------------------------------------------------------------------------- latency


def test_latency_runs_in_a_fresh_process_with_sane_statistics(files):
    r = latency.measure_latency(files["fp32"], threads=1, **FAST)
    assert r["error"] is None and r["note"] == ""
    assert r["pid"] != os.getpid()
    assert r["runtime"] == "ai_edge_litert" and r["runtime_version"]
    assert r["runs"] >= FAST["runs"] and r["warmup"] == FAST["warmup"]
    assert 0 < r["latency_min_ms"] <= r["latency_p50_ms"] <= r["latency_p90_ms"] <= r["latency_p99_ms"]
    assert r["latency_mean_ms"] > 0 and r["latency_std_ms"] >= 0
    assert r["first_invoke_ms"] > 0
    # The child imports ai_edge_litert and numpy only; TensorFlow alone would be > 400 MB.
    assert 0 < r["peak_rss_mb"] < 300
    assert r["partitions"] >= 1  # XNNPACK took the float conv net
    assert r["undelegated_ops"] == {}
    assert r["measured_delegate"] == "xnnpack"


def test_repeats_use_one_fresh_process_each(files):
    r = latency.measure_latency(files["fp32"], threads=1, repeats=3, **FAST)
    assert r["repeats"] == 3 and len(set(r["pids"])) == 3 and os.getpid() not in r["pids"]
    assert r["latency_p50_ms"] == pytest.approx(float(np.median(r["latency_p50_ms_repeats"])))
    assert r["runs"] >= 3 * FAST["runs"]


def test_amx_can_be_refused_to_the_timed_process(files):
    """On a CPU with AMX-INT8 the child either leaves it to XNNPACK or refuses it (seccomp on
    the permission request); elsewhere the column says it is absent. The parent is untouched."""
    allowed = latency.measure_latency(files["int8"], threads=1, **FAST)
    denied = latency.measure_latency(files["int8"], threads=1, deny_amx=True, **FAST)
    for r in (allowed, denied):
        assert r["error"] is None and r["latency_p50_ms"] > 0 and r["partitions"] >= 1
    if host.cpu_has_amx():
        assert (allowed["amx"], denied["amx"]) == ("available", "denied")
        assert latency._amx_permission()  # this process can still ask for it
    else:
        assert allowed["amx"] == denied["amx"] == "absent"
    assert host.machine_info()["amx_int8"] == host.cpu_has_amx()


def test_no_delegate_control_has_no_partitions(files):
    r = latency.measure_latency(files["fp32"], threads=1, delegate="none", **FAST)
    assert r["error"] is None and r["measured_delegate"] == "none"
    assert r["partitions"] == 0
    assert r["undelegated_ops"] == r["op_counts"] and "CONV_2D" in r["op_counts"]
    assert r["latency_p50_ms"] <= r["latency_p90_ms"]


def test_sparse_int8_that_xnnpack_cannot_run_is_reported_not_raised(files):
    r = latency.measure_latency(files["sparse"], threads=1, **FAST)
    assert r["error"] and "XNNPack" in r["error"]
    assert r["delegate"] == "xnnpack" and r["measured_delegate"] == "none"
    assert "BUILTIN_WITHOUT_DEFAULT_DELEGATES" in r["note"]
    assert r["runtime"] != "ai_edge_litert"  # says which runtime configuration ran it
    assert math.isfinite(r["latency_p50_ms"]) and r["latency_p50_ms"] <= r["latency_p90_ms"]
    assert r["undelegated_ops"].get("DENSIFY", 0) >= 1

    no_fallback = latency.measure_latency(files["sparse"], threads=1, fallback=False, **FAST)
    assert no_fallback["error"] and math.isnan(no_fallback["latency_p50_ms"])


def test_unreadable_file_returns_an_error(tmp_path):
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"not a flatbuffer" * 10)
    r = latency.measure_latency(str(bad), threads=1, **FAST)
    assert r["error"] and math.isnan(r["latency_p50_ms"]) and r["runtime"] is None
    with pytest.raises(FileNotFoundError):
        latency.measure_latency(str(tmp_path / "missing.tflite"), threads=1)


def test_delegation_summary_counts_partition_members(files):
    interp = interpreter.make_interpreter(files["fp32"], 1, "xnnpack")
    s = interpreter.delegation_summary(interp)
    # CONV_2D and FULLY_CONNECTED are both XNNPACK ops; MEAN (global pool) too.
    assert s["partitions"] == 1 and s["undelegated_ops"] == {}
    assert s["op_counts"]["CONV_2D"] == 1 and s["op_counts"]["FULLY_CONNECTED"] == 1


# --------------------------------------------------------------------------- accuracy


def _dataset_with_known_top1(model, n=12, k=9, batch=5):
    """Batches whose labels equal Keras's top-1 for the first k images and differ after."""
    rng = np.random.default_rng(1)
    images = rng.uniform(0, 1, (n, SIZE, SIZE, 3)).astype(np.float32)
    keras_pred = np.argmax(model.predict(images, verbose=0), axis=-1)
    labels = np.where(np.arange(n) < k, keras_pred, (keras_pred + 1) % CLASSES).astype(np.int32)
    batches = [(images[i : i + batch], labels[i : i + batch]) for i in range(0, n, batch)]
    return batches, keras_pred


def test_evaluate_tflite_top1_and_agreement(files):
    batches, keras_pred = _dataset_with_known_top1(files["model"])
    r = accuracy.evaluate_tflite(files["fp32"], batches, threads=1, progress=False)
    assert r["n"] == 12 and r["predictions"].shape == (12,)
    assert accuracy.agreement(r["predictions"], keras_pred) == 1.0
    assert r["top1"] == pytest.approx(9 / 12, abs=1e-9)
    assert np.array_equal(accuracy.keras_predictions(files["model"], batches), keras_pred)
    tf_batches = tf.data.Dataset.from_tensor_slices(
        (np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]))
    ).batch(4)
    r2 = accuracy.evaluate_tflite(files["fp32"], tf_batches, threads=1, limit=7, progress=False)
    assert r2["n"] == 7 and np.array_equal(r2["predictions"], r["predictions"][:7])


def test_evaluate_int8_io_file_quantizes_inputs(files):
    batches, keras_pred = _dataset_with_known_top1(files["model"])
    r = accuracy.evaluate_tflite(files["int8"], batches, threads=1, progress=False)
    # A calibrated int8 copy of a 4-class net keeps most top-1 decisions of the float model.
    assert accuracy.agreement(r["predictions"], keras_pred) >= 0.75


def test_evaluate_sparse_int8_falls_back_with_a_note(files):
    rng = np.random.default_rng(2)
    batches = [(rng.standard_normal((4, 32)).astype(np.float32), np.zeros(4, np.int32))]
    r = accuracy.evaluate_tflite(files["sparse"], batches, threads=1, progress=False)
    assert r["n"] == 4 and "BUILTIN_WITHOUT_DEFAULT_DELEGATES" in r["note"]
    assert r["delegate"] == "none"


def test_machine_info_labels_host_figures():
    m = host.machine_info()
    assert m["host_figures"] is True and m["cpu"] and m["cores"] >= 1
    assert m["packages"]["ai-edge-litert"] and m["packages"]["tensorflow"]
    assert "not phone figures" in m["label"]
    if m["machine"] == "x86_64" and os.path.exists("/proc/cpuinfo"):
        assert m["cpu_family"] and f"family {m['cpu_family']}" in m["label"]
        assert "avx2" in m["isa"] and set(m["isa"]) <= host._ISA_FLAGS


def test_gemm_ceiling_and_the_floor_it_gives(tmp_path):
    c = floor.gemm_ceiling(str(tmp_path), threads=(1,), shapes=((8, 64), (4, 128)), runs=5,
                        min_secs=0.0)[1]
    assert sorted(c["by_shape"]) == ["4x4x128", "8x8x64"]
    for fmt, key in (("fp32", "fp32_gflops"), ("int8", "int8_gops")):
        rates = [v[fmt] for v in c["by_shape"].values()]
        assert all(r > 0 for r in rates) and c[key] == max(rates)
    assert sorted(os.listdir(tmp_path)) == sorted(
        f"conv1x1_{k}.{f}.tflite" for k in c["by_shape"] for f in ("fp32", "int8"))
    assert floor.floor_ms(10**9, "int8", c) == pytest.approx(2e3 / c["int8_gops"])
    assert floor.floor_ms(10**9, "drq", c) == floor.floor_ms(10**9, "int8", c)
    assert floor.floor_ms(10**9, "fp16", c) == pytest.approx(2e3 / c["fp32_gflops"])
    assert floor.floor_ms(None, "fp32", c) is None and floor.floor_ms(10**9, "fp32", None) is None


# --------------------------------------------------------------------------- results.csv


def _rows(files, threads=(1,), delegates=("xnnpack",)):
    rows = []
    for key in ("fp32", "int8"):
        for d in delegates:
            for t in threads:
                lat = latency.measure_latency(files[key], threads=t, delegate=d, **FAST)
                rows.append(
                    table.make_row(
                        files[key], lat, workdir=os.path.dirname(os.path.dirname(files[key])),
                        input_size=SIZE, evaluation={"top1": 0.5 if key == "fp32" else 0.4},
                        agreement=1.0 if key == "fp32" else 0.9, params=100, macs=5000,
                        sparsity=0.0, machine=host.machine_info(),
                    )
                )  # fmt: skip
    return rows


@pytest.fixture(scope="module")
def rows(files):
    return _rows(files, threads=(1, 2))


def test_results_csv_has_contract_columns_and_merges(files, rows, tmp_path):
    path = table.write_results(tmp_path, rows, machine=host.machine_info())
    with open(path, newline="") as f:
        header = next(csv.reader(f))
    assert tuple(header[: len(table.COLUMNS)]) == table.COLUMNS
    assert table.COLUMNS[:4] == ("model", "stage", "format", "path")
    back = table.read_results(tmp_path, numeric=True)
    assert len(back) == 4
    assert {(r["format"], r["threads"]) for r in back} == {("fp32", 1), ("fp32", 2), ("int8", 1), ("int8", 2)}
    assert back[0]["model"] == "tiny" and back[0]["stage"] == "distill"
    workdir = os.path.dirname(os.path.dirname(files["fp32"]))
    assert back[0]["path"] == os.path.join("export", "tiny.distill.fp32.tflite")
    assert back[0]["size_bytes"] == os.path.getsize(os.path.join(workdir, back[0]["path"]))

    # A resumed benchmark re-measures one configuration: the row is replaced, not added.
    again = dict(rows[0], latency_p50_ms=123.0, note="re-measured")
    table.write_results(tmp_path, [again])
    back2 = table.read_results(tmp_path, numeric=True)
    assert len(back2) == 4 and back2[0]["latency_p50_ms"] == 123.0 and back2[0]["note"] == "re-measured"
    assert back2[1:] == back[1:]
    table.write_results(tmp_path, [dict(rows[0], delegate="none")])
    assert len(table.read_results(tmp_path)) == 5
    assert sorted(os.listdir(tmp_path)) == ["machine.json", "results.csv"]  # no temp files left
    with pytest.raises(ValueError, match="key"):
        table.write_results(tmp_path, [dict(rows[0], path="")])


def test_ops_round_trip_and_name_parsing():
    ops = {"SOFTMAX": 2, "BATCH_MATMUL": 4}
    assert table.format_ops(ops) == "BATCH_MATMUL:4;SOFTMAX:2"
    assert table.parse_ops(table.format_ops(ops)) == ops
    assert table.parse_tflite_name("export/mobilevit_xxs.qat.int8.tflite") == {
        "model": "mobilevit_xxs", "stage": "qat", "format": "int8"
    }  # fmt: skip
    with pytest.raises(ValueError):
        table.parse_tflite_name("model.tflite")


def _png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 2000


def test_report_and_plots_are_written(rows, tmp_path):
    table.write_results(tmp_path, rows, machine=host.machine_info())
    path = report.write_report(str(tmp_path))
    text = open(path).read()
    assert "host figures" in text and "| model |" in text
    glance, results = text.split("## At a glance")[1].split("## Results")
    assert glance.count("| tiny | distill |") == 2  # one per file: fp32 and int8
    assert "| tiny | distill | fp32 |" in glance and "| +0.0 |" in glance
    assert results.count("| tiny | distill |") == 4  # every (file, threads, delegate) row
    for name in report.PLOTS:
        assert _png(tmp_path / name), name
        assert f"]({name})" in text
    assert "no data for this plot" not in text
    assert not (tmp_path / report.FRONT).exists()  # no structured cut among these rows


def test_structured_rows_get_a_front_plot(rows, tmp_path):
    """A structured cut adds front.png: the model's dense fp32/int8 files and the cut's, two
    lines, every point labelled with its kept fraction and MACs."""
    dense = [dict(r, prune_method="none", kept_fraction=1.0, macs=4e6) for r in rows]
    cuts = [dict(r, stage="prune", prune_method="structured", kept_fraction=0.5, macs=2e6,
                 path=r["path"].replace(".distill.", ".prune."),
                 latency_p50_ms=r["latency_p50_ms"] / 2) for r in rows]
    points = table.one_row_per_file(dense + cuts)
    series = report._front_points(points)
    assert sorted(series) == [("tiny", "fp32"), ("tiny", "int8")]
    assert [p[3] for p in series[("tiny", "int8")]] == ["dense 4M", "keep 0.50 2M"]
    table.write_results(tmp_path, dense + cuts, machine=host.machine_info())
    text = open(report.write_report(str(tmp_path))).read()
    assert _png(tmp_path / report.FRONT) and f"]({report.FRONT})" in text


def _events(logdir):
    from tensorflow.core.util import event_pb2

    tags = []
    for f in glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
        for rec in tf.data.TFRecordDataset(f):
            ev = event_pb2.Event.FromString(rec.numpy())
            tags += [v.tag for v in ev.summary.value]
    return tags


def test_hparams_one_trial_per_row(rows, tmp_path):
    table.write_results(tmp_path, rows)
    logdir = hparams.write_hparams(str(tmp_path))
    assert logdir == os.path.join(str(tmp_path), "tb", "hparams")
    assert "_hparams_/experiment" in _events(logdir)
    trials = sorted(d for d in os.listdir(logdir) if os.path.isdir(os.path.join(logdir, d)))
    assert len(trials) == len(rows)
    tags = _events(os.path.join(logdir, trials[0]))
    assert "_hparams_/session_start_info" in tags
    assert {"latency_p50_ms", "top1", "size_bytes", "agreement"} <= set(tags)


def test_benchmark_files_fills_a_workdir_and_resumes(files, tmp_path):
    import shutil

    (tmp_path / "export").mkdir()
    for key in ("fp32", "int8"):
        shutil.copy(files[key], tmp_path / "export")
    batches, keras_pred = _dataset_with_known_top1(files["model"])
    kw = dict(threads=(1,), delegates=("xnnpack", "none"), dataset=batches, eval_threads=1,
              reference_predictions=lambda path: keras_pred, log=lambda msg: None,
              file_info=lambda path: {"params": files["model"].count_params()}, **FAST)  # fmt: skip
    written = ebench.benchmark_files(str(tmp_path), **kw)
    assert len(written) == 4
    back = table.read_results(tmp_path, numeric=True)
    assert len(back) == 4 and {r["delegate"] for r in back} == {"xnnpack", "none"}
    fp32 = [r for r in back if r["format"] == "fp32"]
    assert all(r["top1"] == pytest.approx(9 / 12) and r["agreement"] == 1.0 for r in fp32)
    assert all(r["input_size"] == SIZE and r["params"] == files["model"].count_params() for r in back)
    assert all(r["partitions"] == 0 for r in back if r["delegate"] == "none")
    assert os.path.exists(tmp_path / "machine.json")
    assert ebench.benchmark_files(str(tmp_path), **kw) == []  # resumed: nothing left to measure
    assert len(table.read_results(tmp_path)) == 4


def test_benchmark_files_scores_a_file_xnnpack_cannot_prepare_without_it(files, tmp_path,
                                                                        monkeypatch):
    """Evaluation runs in the pipeline's own process: a file whose XNNPACK preparation fails
    (or aborts the process, as an edited int8 file can) is scored without the delegate, as the
    audit's child-process probe says, and the row says so."""
    import shutil

    (tmp_path / "export").mkdir()
    shutil.copy(files["fp32"], tmp_path / "export")
    batches, _ = _dataset_with_known_top1(files["model"])
    used = []
    real = accuracy.evaluate_tflite
    monkeypatch.setattr(ebench, "evaluate_tflite", lambda *a, **k: used.append(k["delegate"])
                        or real(*a, **k))
    real_audit = ebench.audit_tflite

    def audit_says_xnnpack_fails(path, **k):
        a = real_audit(path, **k)
        return {**a, "runnable": {"xnnpack": False, "none": True}}

    monkeypatch.setattr(ebench, "audit_tflite", audit_says_xnnpack_fails)
    rows = ebench.benchmark_files(str(tmp_path), threads=(1,), dataset=batches, eval_threads=1,
                              log=lambda msg: None, **FAST)
    assert used == ["none"] and rows[0]["top1"] == pytest.approx(9 / 12)
    assert "XNNPACK cannot prepare the file" in rows[0]["note"]


# --------------------------------------------------------------------------- compare


def test_compare_merges_workdirs_and_names_the_flag(rows, tmp_path):
    from experiments.compare import compare

    a, b = tmp_path / "run_a", tmp_path / "run_b"
    table.write_results(a, rows[:2], machine=host.machine_info())
    table.write_results(b, rows, machine=host.machine_info())
    out = tmp_path / "cmp"
    paths = compare([str(a), str(b)], str(out))
    merged = table.read_results(out)
    assert len(merged) == 6  # same relative paths in both workdirs stay separate rows
    assert {r["workdir"] for r in merged} == {str(a), str(b)}
    assert list(merged[0])[: len(table.COLUMNS)] == list(table.COLUMNS)
    text = open(paths["report"]).read()
    assert "run_a" in text and "run_b" in text
    assert all(_png(out / n) for n in report.PLOTS)
    trials = [d for d in os.listdir(paths["hparams"]) if os.path.isdir(os.path.join(paths["hparams"], d))]
    assert len(trials) == 6

    with pytest.raises(ValueError, match="--workdirs.*does not exist"):
        compare([str(a), str(tmp_path / "nope")], str(out))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="--workdirs.*results.csv"):
        compare([str(tmp_path / "empty")], str(out))


def test_compare_cli_reports_missing_workdir(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.compare", f"--workdirs={tmp_path / 'nope'}",
         f"--out={tmp_path / 'o'}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "--workdirs" in proc.stderr and "does not exist" in proc.stderr


# --------------------------------------------------------------------------- bench_tflite


@pytest.fixture(scope="module")
def bench_script():
    name = "bench_tflite_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "scripts", "bench_tflite.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sys.modules[name] = mod
    return sys.modules[name]


@pytest.fixture
def tiny_registered(monkeypatch):
    """A tiny model registered under a test name (removed afterwards)."""
    from models import registry

    registry.list_models()  # load the real registry first

    def tiny_bench_net(*, num_classes=1000, input_size=None, **overrides):
        return _tiny_conv(size=input_size or 24, classes=num_classes)

    info = registry.ModelInfo(
        name="tiny_bench_net", params=0, default_size=24, size_divisor=1, fixed_size=False,
        family="test", role="student", builder=tiny_bench_net,
    )  # fmt: skip
    monkeypatch.setitem(registry._REGISTRY, "tiny_bench_net", info)
    return "tiny_bench_net"


def test_bench_tflite_json_has_contract_keys(bench_script, tiny_registered, tmp_path):
    from absl.testing import flagsaver

    out_json = tmp_path / "bench.json"
    argv = (
        ["bench_tflite", f"--models={tiny_registered}", "--threads=1,2", "--formats=fp32,int8",
         f"--json={out_json}", "--runs=5", "--warmup=2", "--min_secs=0", "--num_calib=4",
         "--num_classes=10", f"--outdir={tmp_path / 'files'}"]
    )  # fmt: skip
    with flagsaver.flagsaver():
        bench_script.FLAGS(argv)
        bench_script.main(["bench_tflite"])
    data = json.loads(out_json.read_text())
    assert isinstance(data, list) and len(data) == 4
    keys = {"model", "format", "input_size", "threads", "p50_ms", "p90_ms", "partitions",
            "undelegated_ops", "size_bytes"}  # fmt: skip
    for r in data:
        assert keys <= set(r), keys - set(r)
        assert r["model"] == tiny_registered and r["input_size"] == 24
        assert isinstance(r["undelegated_ops"], dict)
        assert 0 < r["p50_ms"] <= r["p90_ms"]
        assert r["size_bytes"] == os.path.getsize(r["path"])
        assert r["error"] is None
        assert {"gzip_bytes", "p99_ms", "runtime", "cpu"} <= set(r)  # a results.csv row (make_row)
        # on by default in the command line: the comparison with Keras and the floor
        assert r["eval_images"] == 32 and 0 <= r["agreement"] <= 1 and r["rel_l2"] >= 0
        assert r["floor_ms"] > 0 and r["x_floor"] == pytest.approx(r["p50_ms"] / r["floor_ms"])
    assert {(r["format"], r["threads"]) for r in data} == {
        ("fp32", 1), ("fp32", 2), ("int8", 1), ("int8", 2)
    }  # fmt: skip
    fp32 = next(r for r in data if r["format"] == "fp32")
    int8 = next(r for r in data if r["format"] == "int8")
    assert int8["size_bytes"] < fp32["size_bytes"]
    table = bench.format_table(data)
    assert table.count(tiny_registered) == 4


def test_bench_tflite_refuses_unknown_models():
    with pytest.raises(ValueError, match="known models: .*vit_tiny_patch16"):
        bench.check_names(["vit_tiny_patch16", "no_such_net"])


def test_bench_tflite_cli_lists_known_models(tmp_path):
    proc = subprocess.run(
        [sys.executable, "scripts/bench_tflite.py", "--models=no_such_net", f"--json={tmp_path / 'x.json'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "no_such_net" in proc.stderr and "vit_tiny_patch16" in proc.stderr
    assert not (tmp_path / "x.json").exists()


@pytest.mark.slow
def test_bench_tflite_times_a_reference_implementation_beside_ours(tmp_path):
    """--reference=kecam: the same architecture from keras-cv-attention-models, converted with the
    stock converter, is timed in the same run; models it lacks are skipped for it (a minute of
    builds and conversions: slow tier)."""
    require_module("keras_cv_attention_models")
    logs = []
    rows = bench.bench_models(
        ["mobilevit_xxs", "mobile_former_26m"], formats=["fp32"], outdir=str(tmp_path),
        warmup=1, runs=3, min_secs=0, num_classes=10, references=["kecam"], log=logs.append,
        amx=["allow", "deny"],
    )  # fmt: skip
    assert {r["amx"] for r in rows} == ({"available", "denied"} if host.cpu_has_amx() else {"absent"})
    rows = [r for r in rows if r["amx"] != "denied"]
    got = {(r["model"], r["implementation"]) for r in rows}
    assert got == {("mobilevit_xxs", "ours"), ("mobilevit_xxs", "kecam"), ("mobile_former_26m", "ours")}
    assert any("kecam has no mobile_former_26m" in line for line in logs)
    ours, ref = (next(r for r in rows if r["model"] == "mobilevit_xxs" and r["implementation"] == i)
                 for i in ("ours", "kecam"))  # fmt: skip
    assert ref["converter"] == "TFLiteConverter" and ours["converter"] == "compress.tflite.convert"
    assert ref["path"] != ours["path"] and os.path.exists(ref["path"])
    for r in (ours, ref):
        assert r["error"] is None and r["p50_ms"] > 0 and r["partitions"] >= 1
    assert "kecam" in bench.format_table(rows)
    assert bench.reference_builder("kecam", "mobile_former_26m") is None


def test_an_unknown_reference_implementation_is_refused():
    with pytest.raises(ValueError, match="--reference: unknown implementation 'nope'; known: kecam"):
        bench.reference_builder("nope", "mobilevit_xxs")


def test_plot_labels_never_overlap_and_near_points_share_one():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(12.0, 0.735, "distill/fp32"), (12.05, 0.735, "distill/fp16"),  # one spot
           (9.4, 0.737, "distill/drq"), (7.4, 0.734, "qat/int8"), (7.5, 0.7345, "prune/int8"),
           (64.0, 0.715, "prune/int8_sparse")]  # fmt: skip
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=100)
    ax.scatter([p[0] for p in pts], [p[1] for p in pts])
    fig.tight_layout()
    report._label_points(fig, ax, pts)
    texts = [t for t in ax.texts]
    r = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(r) for t in texts]
    right_edge = ax.get_window_extent(r).x1
    plt.close(fig)
    assert all(b.x1 <= right_edge for b in boxes)  # none runs off the plot
    labels = [t.get_text() for t in texts]
    assert "distill/fp32, distill/fp16" in labels  # same spot: one label
    assert sorted(sum((lab.split(", ") for lab in labels), [])) == sorted(p[2] for p in pts)
    for i in range(len(boxes)):
        for j in range(i):
            assert not boxes[i].overlaps(boxes[j]), (labels[i], labels[j])


def test_bench_tflite_converts_only_then_times_reused_files(tiny_registered, tmp_path):
    kw = dict(formats=["fp32", "int8"], outdir=str(tmp_path), warmup=1, runs=3, min_secs=0,
              num_calib=4, num_classes=10, log=lambda _: None)  # fmt: skip
    assert bench.bench_models([tiny_registered], time_files=False, **kw) == []
    files = sorted(os.listdir(tmp_path))
    assert files == sorted(f"{tiny_registered}.bench.{fmt}.tflite{ext}"
                           for fmt in ("fp32", "int8") for ext in ("", ".json"))  # + its sidecar

    def never(*a, **k):
        raise AssertionError("a reused file must not be converted again")

    rows = bench.bench_models([tiny_registered], reuse=True, create=never, **kw)
    assert [(r["format"], r["converter"]) for r in rows] == [("fp32", "reused"), ("int8", "reused")]
    assert all(r["p50_ms"] > 0 and r["error"] is None for r in rows)


def test_glance_table_is_relative_to_the_distilled_fp32_file():
    rows = [
        {"model": "m", "stage": "distill", "format": "fp32", "path": "a", "threads": 1,
         "delegate": "xnnpack", "top1": 0.80, "latency_p50_ms": 10.0, "size_bytes": 4096},
        {"model": "m", "stage": "distill", "format": "fp32", "path": "a", "threads": 2,
         "delegate": "xnnpack", "top1": 0.80, "latency_p50_ms": 6.0, "size_bytes": 4096},
        {"model": "m", "stage": "qat", "format": "int8", "path": "b", "threads": 1,
         "delegate": "xnnpack", "top1": 0.793, "latency_p50_ms": 4.0, "size_bytes": 1024},
        {"model": "m", "stage": "prune", "format": "fp32", "path": "c", "threads": 1,
         "delegate": "none", "top1": 0.78, "latency_p50_ms": 50.0, "sparsity": 0.5},
    ]  # fmt: skip
    lines = report.glance_lines(rows)
    body = [line.split(" | ") for line in lines[2:]]
    assert [b[1:3] for b in body] == [["distill", "fp32"], ["prune", "fp32"], ["qat", "int8"]]
    distill, prune, qat = body
    assert distill[4:7] == ["+0.0", "10.00", "1.00x"]  # its 1-thread row, not the 2-thread one
    assert qat[3:7] == ["79.3%", "-0.7", "4.00", "2.50x"] and qat[8] == "1"
    assert prune[4] == "-2.0" and prune[9] == "0.500"
    assert report.glance_lines([]) == []


def test_glance_names_keep_levels_and_files_xnnpack_refused():
    """A structured prune's rows say their kept fraction (points of the latency/accuracy front)
    and MACs; a file XNNPACK refused (magnitude pruning's int8_sparse) is not given a speed-up as
    if it were a deployment candidate."""
    base = {"model": "m", "threads": 1, "delegate": "xnnpack", "top1": 0.8}
    rows = [
        {**base, "stage": "distill", "format": "int8", "path": "a", "latency_p50_ms": 4.0,
         "macs": 400e6},
        {**base, "stage": "distill", "format": "fp32", "path": "f", "latency_p50_ms": 8.0},
        {**base, "stage": "prune", "format": "int8", "path": "b", "latency_p50_ms": 2.0,
         "macs": 220e6, "prune_method": "structured", "kept_fraction": 0.55},
        {**base, "stage": "qat", "format": "int8_sparse", "path": "c", "latency_p50_ms": 60.0,
         "measured_delegate": "none"},
    ]
    body = {(b[1], b[2]): b for b in (line.split(" | ") for line in report.glance_lines(rows)[2:])}
    pruned = body[("prune(keep 0.55)", "int8")]
    assert pruned[5:8] == ["2.00", "4.00x", "220"]
    sparse = body[("qat", "int8_sparse")]
    assert sparse[5] == "60.00 (XNNPACK refused the file: timed without it)" and sparse[6] == ""
    assert report._label(rows[2], False) == "prune(keep 0.55)/int8 220M MACs"


def test_bench_images_are_the_pipelines_in_zero_one(tmp_path):
    """Random images, and a folder's images prepared as the pipeline's representative images:
    [1, s, s, 3] float32 in [0, 1], the range every model takes."""
    rand = bench.bench_images(16, 3)
    assert len(rand) == 3 and all(x.shape == (1, 16, 16, 3) and x.dtype == np.float32
                                  for x in rand)
    assert 0.0 <= min(x.min() for x in rand) and max(x.max() for x in rand) <= 1.0
    folder = tmp_path / "calib" / "some_class"
    folder.mkdir(parents=True)
    for i in range(2):
        pixels = np.full((20, 24, 3), 60 * i + 30, np.uint8)
        tf.io.write_file(str(folder / f"{i}.png"), tf.io.encode_png(pixels))
    real = bench.bench_images(16, 2, calib_dir=str(tmp_path / "calib"))
    assert sorted(round(float(x.mean()) * 255) for x in real) == [30, 90]
    with pytest.raises(ValueError, match="--calib_dir: no images under"):
        bench.bench_images(16, 2, calib_dir=str(tmp_path / "empty"))


def test_recalibrate_batchnorm_sets_the_statistics_of_the_images():
    inp = keras.Input((6, 6, 3))
    bn = keras.layers.BatchNormalization(momentum=0.9, name="bn")
    model = keras.Model(inp, keras.layers.Dense(4)(bn(inp)))
    x = np.random.default_rng(0).normal(2.0, 3.0, (16, 6, 6, 3)).astype("float32")
    assert bench.recalibrate_batchnorm(model, x) == 1
    mean, var = bn.moving_mean.numpy(), bn.moving_variance.numpy()
    np.testing.assert_allclose(mean, x.mean(axis=(0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(var, x.reshape(-1, 3).var(axis=0, ddof=1), rtol=1e-4)  # unbiased
    assert bn.momentum == 0.9
    np.testing.assert_allclose(model(x, training=False), model(x, training=True), rtol=2e-3)


def test_bench_tflite_compares_each_file_with_its_keras_model(tiny_registered, tmp_path):
    """Agreement and relative error on images not used for calibration, MACs and the floor
    beside each latency; kept beside the file, so a reused file reports them too."""
    from compress.measure.costs import static_costs

    kw = dict(formats=["fp32", "int8"], outdir=str(tmp_path), warmup=1, runs=3, min_secs=0,
              num_calib=4, num_classes=10, log=lambda _: None, num_eval=6, recalibrate_bn=True)
    rows = bench.bench_models([tiny_registered], **kw)
    fp32, int8 = rows
    assert fp32["agreement"] == 1.0 and fp32["rel_l2"] < 1e-5 and fp32["eval_images"] == 6
    assert 0.0 <= int8["agreement"] <= 1.0 and 0.0 < int8["rel_l2"] < 0.5
    assert fp32["bn_recalibrated"] is False  # the tiny net has no BatchNormalization
    macs = static_costs(tiny_registered_model(), 24)["macs"]
    assert fp32["macs"] == int8["macs"] == macs
    assert fp32["floor_ms"] is None and fp32["x_floor"] is None  # no --floor
    ceiling = {"fp32_gflops": 100.0, "int8_gops": 400.0, "by_shape": {}}
    reused = bench.bench_models(
        [tiny_registered], **{**kw, "num_eval": 0}, reuse=True,
        create=lambda *a, **k: pytest.fail("a reused file must not be converted again"))
    assert [(r["agreement"], r["rel_l2"]) for r in reused] == [
        (r["agreement"], r["rel_l2"]) for r in rows]
    # the floor: 2 * MACs at the ceiling of the format's kind
    got = bench.bench_models([tiny_registered], **kw, reuse=True, floor=True,
                                    ceiling_fn=lambda *a, **k: {1: ceiling})
    assert got[0]["floor_ms"] == pytest.approx(2 * macs / 100e9 * 1e3)
    assert got[1]["floor_ms"] == pytest.approx(2 * macs / 400e9 * 1e3)
    assert got[1]["x_floor"] == pytest.approx(got[1]["p50_ms"] / got[1]["floor_ms"])
    assert got[0]["ceiling"] == ceiling
    with pytest.raises(ValueError, match="--num_eval"):
        bench.bench_models([tiny_registered], **{**kw, "num_eval": -1})


def tiny_registered_model():
    return _tiny_conv(size=24, classes=10)


def test_hparams_student_trials_carry_distill_kind_and_gain(rows, tmp_path):
    """One extra trial per Keras student (experiments.summary.student_trials): distill.kind is
    a hyperparameter, the teacher / baseline top-1 and the gain are metrics."""
    from tensorboard.plugins.hparams import plugin_data_pb2
    from tensorflow.core.util import event_pb2

    student = {"model": "tiny", "stage": "distill", "format": "keras", "input_size": 32,
               "distill.kind": "soft", "top1": 0.7, "teacher_top1": 0.8, "baseline_top1": 0.6,
               "gain": 0.1, "gain_low": 0.05, "gain_high": 0.15}
    logdir = hparams.write_hparams(str(tmp_path / "tb" / "hparams"), list(rows) + [student])
    trials = sorted(d for d in os.listdir(logdir) if os.path.isdir(os.path.join(logdir, d)))
    assert len(trials) == len(rows) + 1 and trials[-1].endswith(".tiny.distill.keras")
    assert {"top1", "teacher_top1", "baseline_top1", "gain"} <= set(
        _events(os.path.join(logdir, trials[-1])))
    names = set()
    for f in glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
        for rec in tf.data.TFRecordDataset(f):
            for v in event_pb2.Event.FromString(rec.numpy()).summary.value:
                if v.tag == "_hparams_/experiment":
                    data = plugin_data_pb2.HParamsPluginData.FromString(
                        v.metadata.plugin_data.content)
                    names |= {h.name for h in data.experiment.hparam_infos}
                    names |= {m.name.tag for m in data.experiment.metric_infos}
    assert {"distill.kind", "teacher_top1", "gain_high", "stage"} <= names
