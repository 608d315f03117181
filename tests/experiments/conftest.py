"""The smoke pipeline runs shared by tests: one unbroken run of every stage (`smoke_run`, once
per test run: tests/conftest.py sends its readers to one worker), and a teacher stage alone
(`smoke_teacher`, for the tests that start from a finished teacher)."""

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


@pytest.fixture(scope="session")
def smoke_teacher_stage(tmp_path_factory, imagenette_dir):
    """A workdir where the smoke preset ran its teacher stage alone (a minute, not the whole
    smoke run's several): (workdir, data)."""
    workdir = tmp_path_factory.mktemp("smoke_teacher")
    _run_pipeline(workdir, imagenette_dir, "--stages=teacher")
    return workdir, imagenette_dir


@pytest.fixture
def smoke_teacher(smoke_teacher_stage, tmp_path):
    """A fresh workdir holding only a finished smoke teacher stage (the same preset, so a later
    run's teacher stage is done already), and the data: (workdir, data)."""
    finished, data = smoke_teacher_stage
    workdir = tmp_path / "run"
    shutil.copytree(finished / "teacher", workdir / "teacher")
    return workdir, data
