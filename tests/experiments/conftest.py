"""The smoke pipeline run shared by the tests that read its outputs (one unbroken run of every
stage, into a temporary workdir, once per test run)."""

import shutil

import pytest

from tests.helpers import run_pipeline as _run_pipeline


@pytest.fixture(scope="session")
def run_pipeline():
    """`run_pipeline(workdir, data, *flags)`: the smoke pipeline in a subprocess, asserted to
    succeed; returns (CompletedProcess, seconds). (tests.helpers.run_pipeline as a fixture.)"""
    return _run_pipeline


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, imagenette_dir):
    """(workdir, CompletedProcess, data) of one full smoke run; read it, never write into it
    (copy it first: `smoke_copy`)."""
    workdir = tmp_path_factory.mktemp("smoke")
    proc, seconds = _run_pipeline(workdir, imagenette_dir)
    print(f"smoke pipeline: {seconds:.0f} s")
    return workdir, proc, imagenette_dir


@pytest.fixture
def smoke_teacher(smoke_run, tmp_path):
    """A fresh workdir holding only the smoke run's finished teacher stage (the same preset, so
    a later run's teacher stage is done already), and the data: (workdir, data)."""
    unbroken, _, data = smoke_run
    workdir = tmp_path / "run"
    shutil.copytree(unbroken / "teacher", workdir / "teacher")
    return workdir, data
