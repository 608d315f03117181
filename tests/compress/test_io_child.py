"""compress.io (the one atomic write) and compress.child (the one child-process helper)."""

import json
import os

import numpy as np
import pytest

from compress import io as cio
from compress.child import run_in_child

T = "tests.compress.child_targets"


def test_atomic_write_replaces_whole_files_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "a.bin"
    cio.atomic_write(path, b"old")
    cio.atomic_write(path, "new text")
    assert path.read_bytes() == b"new text"
    assert os.listdir(path.parent) == ["a.bin"]
    assert (os.stat(path).st_mode & 0o777) != 0o600  # not mkstemp's private mode


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "weights.h5"
    cio.atomic_write(path, b"old")
    with pytest.raises(RuntimeError):
        with cio.atomic_path(path) as tmp:
            assert tmp.endswith(".h5") and os.path.dirname(tmp) == str(tmp_path)
            open(tmp, "wb").write(b"half")
            raise RuntimeError("killed")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["weights.h5"]


def test_write_json_takes_numpy_values(tmp_path):
    cio.write_json(tmp_path / "m.json", {"top1": np.float32(0.5), "n": np.int64(3),
                                         "p": np.arange(2), "path": tmp_path})
    got = json.loads((tmp_path / "m.json").read_text())
    assert got == {"top1": 0.5, "n": 3, "p": [0, 1], "path": str(tmp_path)}


def test_file_sizes_of_a_file_and_of_bytes_agree(tmp_path):
    data = b"a" * 10_000
    (tmp_path / "f").write_bytes(data)
    assert cio.file_sizes(tmp_path / "f") == cio.file_sizes(data)
    assert cio.file_sizes(data)["size_bytes"] == 10_000 > cio.file_sizes(data)["gzip_bytes"]


def test_child_returns_the_function_result_from_another_process():
    out = run_in_child(f"{T}:echo", {"a": 1, "b": [2, 3]})
    assert out["got"] == {"a": 1, "b": [2, 3]} and out["pid"] != os.getpid()


@pytest.mark.parametrize("target, kwargs, timeout, expected", [
    ("fail", {}, 60, "ValueError: no such thing"),
    ("abort", {}, 60, "process died (signal SIGABRT)"),
    ("sleep", {"seconds": 30}, 2, "timed out after 2 s"),
])
def test_child_failures_come_back_as_one_error(target, kwargs, timeout, expected):
    out = run_in_child(f"{T}:{target}", kwargs, timeout=timeout)
    assert set(out) == {"error"} and out["error"].startswith(expected)


def test_timed_children_never_load_tensorflow():
    for module in ("compress.measure.latency", "compress.tflite.interpreter"):
        assert run_in_child(f"{T}:heavy_modules_after", {"module": module}) == {"loaded": []}
