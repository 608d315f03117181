"""No stale figure survives: every stage records what it is made from (experiments/fingerprint.py)
and a run refuses, before any work and in one line, to reuse or keep a stage made from other
inputs; every figure carries its provenance; a damaged teacher cache shard is rebuilt.

The command lines run through `python -m tests.experiments.pipeline_cases` (TensorFlow imported once per
batch) on a tiny folder of random images, with two steps per training stage.
"""

import csv
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[2]
WORKER = ["-m", "tests.experiments.pipeline_cases"]
SMALL = ["--config.teacher.steps=2", "--config.distill.steps=2", "--config.distill.baseline=false",
         "--config.prune.steps=2", "--config.export.formats.distill=('fp32',)",
         "--config.export.formats.prune=('fp32',)"]


def _images(root, per_class):
    for split, n in (("train", per_class), ("val", 2)):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rng = np.random.default_rng(100 * ord(c) + 10 * (split == "val") + i)
                Image.fromarray(rng.integers(0, 256, (48, 56, 3), dtype=np.uint8)).save(
                    root / split / c / f"{i}.JPEG")
    return root


def _batch(tmp, cases):
    """Run `cases` ([(argv, ...)]) in order; returns their results (code, stdout, stderr)."""
    path, out = tmp / "cases.json", tmp / "results.json"
    path.write_text(json.dumps([{"argv": argv} for argv in cases]))
    env = {**os.environ, "VIT_COMPRESS_CACHE": str(tmp / "decoded")}
    proc = subprocess.run([sys.executable, *WORKER, str(path), str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def _ok(r):
    assert r["code"] == 0, (r["argv"], r["stderr"][-3000:])
    return r


def _refused(r, pattern):
    """Exit status non-zero, the last line matches, no stage started, no traceback."""
    err = r["stderr"]
    assert r["code"] not in (0, None), (r["argv"], err[-2000:])
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert re.search(pattern, last), f"last line: {last!r}\nargv: {r['argv']}"
    assert "starting" not in r["stdout"], r["stdout"]


def _json(path):
    return json.loads(pathlib.Path(path).read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One workdir taken through the cases in order; returns (workdir, {case: result})."""
    tmp = tmp_path_factory.mktemp("stale")
    data = _images(tmp / "data", 4)
    plus_one = tmp / "data_plus_one"
    shutil.copytree(data, plus_one)  # the same files (and times), one image more
    Image.fromarray(np.zeros((48, 56, 3), np.uint8)).save(plus_one / "train" / "a" / "extra.JPEG")
    wd = tmp / "wd"

    def argv(*extra, data=data, teacher="vit_tiny_patch16"):
        return ["--student=mobilevit_xxs", f"--teacher={teacher}", f"--data={data}",
                f"--workdir={wd}", "--preset=smoke", *SMALL, *extra]

    names1 = ["first", "config_changed", "data_plus_one", "other_teacher"]
    first = _batch(tmp, [
        argv("--stages=teacher,distill"),
        argv("--stages=teacher,distill", "--config.distill.steps=3", "--config.distill.lr=0.01"),
        argv("--stages=teacher,distill", data=plus_one),
        argv("--stages=distill", teacher="vit_small_patch16"),
    ])
    results = dict(zip(names1, first))
    _ok(results["first"])
    results["distill_after_refusals"] = _json(wd / "distill" / "metrics.json")
    shard = wd / "distill" / "teacher_cache" / "shard_00000.npy"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one bit-flipped byte in the records
    shard.write_bytes(bytes(raw))

    names2 = ["prune_reads_cache", "distill_redone_alone", "exported", "prune_redone_alone",
              "prune_and_after_redone"]
    second = _batch(tmp, [
        argv("--stages=prune"),
        argv("--stages=distill", "--overwrite", "--config.distill.steps=3"),
        argv("--stages=export"),
        argv("--stages=prune", "--overwrite", "--config.prune.keep=0.6"),
        argv("--stages=prune,export,benchmark,report", "--overwrite",
             "--config.prune.keep=0.6"),
    ])
    results.update(zip(names2, second))
    return wd, results


def test_a_changed_config_is_refused_before_any_work(runs):
    wd, r = runs
    _refused(r["config_changed"], r"distill: config differs from the finished stage: steps 2 -> 3, "
             r"lr 0\.002 -> 0\.01; rerun with --overwrite or use another --workdir")
    assert r["distill_after_refusals"]["step"] == 2


def test_a_data_folder_with_one_image_more_is_refused(runs):
    _, r = runs
    _refused(r["data_plus_one"],
             r"teacher: data differs from the finished stage: 12 files -> 13 files;")


def test_another_teacher_is_refused(runs):
    _, r = runs
    _refused(r["other_teacher"], r"distill: teacher differs from the finished stage: "
             r"vit_tiny_patch16 -> vit_small_patch16;")


def test_a_corrupted_cache_shard_is_named_and_rebuilt(runs):
    wd, r = runs
    out = _ok(r["prune_reads_cache"])["stdout"]
    assert re.search(r"shard_00000\.npy fails its checksum .*: rebuilt", out), out
    manifest = _json(wd / "distill" / "teacher_cache" / "manifest.json")
    from experiments.data.teacher_cache import _checksum

    assert manifest["checksums"]["shard_00000.npy"] == _checksum(
        wd / "distill" / "teacher_cache" / "shard_00000.npy")


def test_overwrite_invalidates_the_stages_made_from_it(runs):
    """A stage redone with --overwrite: the finished stages made from it are refused unless
    selected, and redone when they are."""
    wd, r = runs
    _refused(r["distill_redone_alone"],
             r"prune: made from a distill stage that was redone; add prune to --stages$")
    _refused(r["prune_redone_alone"],
             r"export: made from a prune stage that was redone; add export to --stages$")
    _ok(r["prune_and_after_redone"])
    distill, prune, export = (_json(wd / s / "fingerprint.json")
                              for s in ("distill", "prune", "export"))
    assert prune["components"]["upstream"]["distill"] == distill["fingerprint"]
    assert export["components"]["upstream"]["prune"] == prune["fingerprint"]
    assert prune["components"]["config"]["keep"] == 0.6
    assert _json(wd / "prune" / "metrics.json")["fingerprint"] == prune["fingerprint"]


def test_every_figure_carries_its_provenance(runs):
    """results.csv: the contract's columns first, the provenance columns appended; each row's
    fingerprints are those of its stage's and the benchmark's metrics.json (no row of the prune
    stage that was redone survives); the report's header names them."""
    from compress.results.table import COLUMNS, PROVENANCE_COLUMNS

    wd, r = runs
    _ok(r["exported"])
    _ok(r["prune_and_after_redone"])  # measured the files: benchmark and report
    with open(wd / "results.csv") as f:
        rows = list(csv.DictReader(f))
    header = list(rows[0])
    assert header[:len(COLUMNS)] == list(COLUMNS)
    assert header[-len(PROVENANCE_COLUMNS):] == list(PROVENANCE_COLUMNS)
    assert header.index("baseline_top1") < header.index("stage_fingerprint")
    bench = _json(wd / "benchmark" / "metrics.json")
    assert {row["stage"] for row in rows} == {"distill", "prune"}
    for row in rows:
        metrics = _json(wd / row["stage"] / "metrics.json")
        assert row["stage_fingerprint"] == metrics["fingerprint"]
        assert row["benchmark_fingerprint"] == bench["fingerprint"]
        assert row["code_version"] == bench["code_version"] and row["host"]  # what measured it
        assert row["tensorflow_version"] == metrics["runtime"]["tensorflow"]
        assert row["litert_version"] == metrics["runtime"]["litert"]
    assert bench["host"]["cores"] and bench["host"]["threads"] == [1]
    report = (wd / "report.md").read_text()
    for stage in ("distill", "prune", "benchmark"):
        assert _json(wd / stage / "metrics.json")["fingerprint"] in report


def _fake_run(**config):
    from experiments.configs import get_config

    cfg = get_config("smoke")
    for key, value in config.items():
        section, name = key.split(".")
        cfg[section][name] = value
    from models import teachers

    return types.SimpleNamespace(cfg=cfg, student="mobilevit_xxs", export_size=64,
                                 teacher_arg="vit_tiny_patch16", data="tfds:imagenette",
                                 teacher_record=teachers.resolve("vit_tiny_patch16"),
                                 train_src=None, workdir=pathlib.Path("/nonexistent"))


def test_keys_that_change_no_figure_leave_the_fingerprint_alone():
    from experiments import fingerprint as fp

    base = fp.make_record(_fake_run(), "distill", {"teacher": "t"})
    same = fp.make_record(_fake_run(**{"distill.checkpoint_every": 3, "distill.eval_every": 5}),
                          "distill", {"teacher": "t"})
    other = fp.make_record(_fake_run(**{"distill.temperature": 4.0}), "distill", {"teacher": "t"})
    assert base["fingerprint"] == same["fingerprint"] != other["fingerprint"]
    assert fp.differences(base, other) == {"config": ["temperature 2.0 -> 4.0"]}
    moved = fp.make_record(_fake_run(), "distill", {"teacher": "u"})
    assert fp.differences(base, moved) == {"inputs": ["made from a teacher stage that was redone"]}


def test_no_speed_up_between_rows_of_different_hosts():
    from compress.results.report import glance_lines

    rows = [{"model": "m", "stage": "distill", "format": "fp32", "path": "a", "threads": "1",
             "delegate": "xnnpack", "latency_p50_ms": "2.0", "host": "cpu A, 2 cores"},
            {"model": "m", "stage": "distill", "format": "int8", "path": "b", "threads": "1",
             "delegate": "xnnpack", "latency_p50_ms": "1.0", "host": "cpu B, 8 cores"},
            {"model": "m", "stage": "prune", "format": "fp32", "path": "c", "threads": "1",
             "delegate": "xnnpack", "latency_p50_ms": "1.0", "host": "cpu A, 2 cores"}]
    table = "\n".join(glance_lines(rows))
    assert "none: measured on cpu B, 8 cores, its reference on cpu A, 2 cores" in table
    assert "| 2.00x |" in table


@pytest.mark.slow
def test_a_sweep_with_overwrite_matches_fresh_runs(tmp_path):
    """One key swept over three values in one workdir, --overwrite each time: each value's
    figures equal those of a fresh workdir run with that value (nothing of the previous value
    leaks into the next)."""
    data = _images(tmp_path / "data", 4)

    def argv(wd, lr, *extra):
        return ["--student=mobilevit_xxs", "--teacher=vit_tiny_patch16", f"--data={data}",
                f"--workdir={wd}", "--preset=smoke", *SMALL, f"--config.distill.lr={lr}",
                "--stages=teacher,distill", *extra]

    lrs = (0.002, 0.02, 0.2)
    sweep, figures = tmp_path / "sweep", {}
    for lr in lrs:  # the sweep's figures are read before the next value replaces them
        _ok(_batch(tmp_path, [argv(sweep, lr, "--overwrite")])[0])
        figures[lr] = _json(sweep / "distill" / "metrics.json")
    fresh = _batch(tmp_path, [argv(tmp_path / f"fresh{i}", lr) for i, lr in enumerate(lrs)])
    for i, lr in enumerate(lrs):
        _ok(fresh[i])
        alone = _json(tmp_path / f"fresh{i}" / "distill" / "metrics.json")
        for key in ("val_top1", "val_loss", "train_loss", "step", "fingerprint"):
            assert figures[lr][key] == alone[key], (lr, key, figures[lr][key], alone[key])
    assert len({figures[lr]["train_loss"] for lr in lrs}) == 3  # the key did change the run
