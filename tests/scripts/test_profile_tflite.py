"""scripts/profile_tflite.py: XNNPACK kernel symbols grouped into families, ms per invoke."""

import importlib.util
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def prof():
    spec = importlib.util.spec_from_file_location(
        "profile_tflite_under_test", os.path.join(REPO, "scripts", "profile_tflite.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_symbols_map_to_the_kernel_families(prof):
    f = prof.family
    assert f("xnn_qs8_qc8w_gemm_minmax_fp32_ukernel_7x16c8__avx512vnni_prfm") == "gemm int8"
    assert f("xnn_qs8_qc8w_igemm_minmax_fp32_ukernel_7x16c8__avx512vnni_prfm") == "igemm int8"
    assert f("xnn_f32_gemm_minmax_ukernel_7x32__avx512f_broadcast").startswith("gemm f32")
    assert f("xnn_pack_qs8_to_qu8_gemm_gio_w").startswith("pack")  # not a GEMM
    assert f("xnn_f32_raddstoreexpminusmax_ukernel__avx512f_rr2_p5_u64_acc2") == "softmax"
    assert f("xnn_qs8_vmul_minmax_fp32_ukernel__avx_mul16_ld64_u16") == "mul"
    assert f("xnn_f32_qs8_vcvt_ukernel__avx512skx_u128") == "quantize / dequantize"
    assert f("blas_thread_server") is None and f("_PyEval_EvalFrameDefault") is None
    assert f("something_new") == "other"


def test_report_shares_leave_out_python_and_sum_to_one(prof):
    report = """# comment
    40.00%  libpywrap_litert_common.so  [.] xnn_f32_gemm_minmax_ukernel_7x32__avx512f_broadcast
    20.00%  libpywrap_litert_common.so  [.] xnn_f32_vmul_ukernel__avx512f_u32
    20.00%  libpython3.11.so.1.0        [.] _PyEval_EvalFrameDefault
    10.00%  libpywrap_litert_common.so  [.] xnn_f32_rmax_ukernel__avx512f_u64_acc4
    10.00%  libc.so.6                   [.] __memmove_avx512_unaligned_erms
     5.00%  libc.so.6                   [.] malloc
     5.00%  [kernel.kallsyms]           [k] clear_page_erms
"""
    shares = prof.parse_report(report)
    assert shares == pytest.approx({"gemm f32 (1x1 conv, FC, BMM)": 0.5, "mul": 0.25,
                                    "softmax": 0.125, "transpose / copy": 0.125})


def _perf_works():
    if shutil.which("perf") is None:
        return False
    p = subprocess.run(["perf", "record", "-q", "-o", os.devnull, "--", "true"],
                       capture_output=True)
    return p.returncode == 0


@pytest.mark.skipif(not _perf_works(), reason="perf record is not available here")
def test_profile_of_a_conv_file_is_mostly_gemm(prof, tmp_path):
    from models.compat import keras, tf

    inp = keras.Input((28, 28, 256))
    model = keras.Model(inp, keras.layers.Conv2D(256, 1)(inp))
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    path = tmp_path / "conv.tflite"
    path.write_bytes(conv.convert())
    p50, ms = prof.profile(str(path), invokes=200)
    assert p50 > 0 and sum(ms.values()) == pytest.approx(p50)
    assert max(ms, key=ms.get).startswith("gemm f32"), ms
    with pytest.raises(FileNotFoundError, match="no such .tflite file"):
        prof.profile(str(tmp_path / "missing.tflite"))
    assert np.isfinite(p50)
