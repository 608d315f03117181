"""scripts/bench_gain.py: paired students over seeds, resumed without retraining, a changed
config refused in one line."""

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO, require_imagenette

SCRIPT = str(REPO / "scripts" / "bench_gain.py")


def _run(workdir, data, *extra):
    cmd = [sys.executable, SCRIPT, "--preset=smoke", "--teacher=efficientnet_lite0",
           f"--data={data}", f"--workdir={workdir}", "--seeds=0,1",
           "--variants=labels,soft:1:2", "--config.distill.steps=3", *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800,
                          check=False)


@pytest.mark.slow
def test_two_seeds_paired_then_reused_then_a_changed_config_refused(tmp_path):
    data = require_imagenette()
    first = _run(tmp_path, data)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((tmp_path / "gain.json").read_text())
    students = summary["students"]
    assert [(r["seed"], r["variant"]) for r in students] == [
        (0, "labels"), (0, "soft_a1_T2"), (1, "labels"), (1, "soft_a1_T2")]
    for r in students[1::2]:  # each distilled student against its own seed's twin
        assert r["paired"]["n"] == 50 and r["paired"]["low"] <= r["paired"]["diff"]
    (row,) = summary["summary"]
    assert row["gains"] == [r["paired"]["diff"] for r in students[1::2]]
    assert row["low"] <= row["mean"] <= row["high"]
    # the teacher stage ran once and was copied; the second seed has its own cache
    assert "[teacher] starting" in first.stdout and first.stdout.count("[teacher] starting") == 1

    again = _run(tmp_path, data)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done already, reused") == 4

    changed = _run(tmp_path, data, "--config.distill.lr=0.01")
    assert changed.returncode != 0
    last = changed.stderr.strip().splitlines()[-1]
    assert "holds a student of another config; --overwrite retrains it" in last, last
