"""The smoke pipeline run shared by the smoke test and the fault-injection test (one unbroken
run of every stage per session)."""

import subprocess
import sys
import time

import pytest


def pipeline(workdir, data, *extra):
    cmd = [sys.executable, "-m", "experiments.pipeline", "--student=mobilevit_xxs",
           "--teacher=vit_tiny_patch16", f"--data={data}", f"--workdir={workdir}",
           "--preset=smoke", *extra]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc, time.time() - start


@pytest.fixture(scope="session")
def run_pipeline():
    """`run_pipeline(workdir, data, *flags)`: the smoke pipeline in a subprocess, asserted to
    succeed; returns (CompletedProcess, seconds)."""
    return pipeline


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, imagenette_dir):
    workdir = tmp_path_factory.mktemp("smoke")
    proc, seconds = pipeline(workdir, imagenette_dir)
    print(f"smoke pipeline: {seconds:.0f} s")
    return workdir, proc, imagenette_dir
