"""The distillation gain of a workdir (experiments/summary.py): report line, HParams trials."""

import numpy as np

from experiments import summary


def _workdir(tmp_path, labels, **correct):
    """Stage folders whose saved predictions are right on the first `correct[stage]` images."""
    folders = {"teacher": "teacher", "distill": "distill", "baseline": "distill/baseline"}
    for name, n_right in correct.items():
        folder = tmp_path / folders[name]
        folder.mkdir(parents=True, exist_ok=True)
        pred = labels.copy()
        pred[n_right:] = (labels[n_right:] + 1) % 10
        summary.save_predictions(folder, pred)
    return tmp_path


def test_report_opens_with_the_gain_and_warns_about_a_weak_teacher(tmp_path):
    labels = np.arange(200) % 10
    wd = _workdir(tmp_path, labels, teacher=80, baseline=120, distill=150)
    gain = summary.distillation_gain(wd, labels, kind="soft")
    assert gain["teacher_top1"] == 0.4 and gain["baseline_top1"] == 0.6
    assert gain["paired"]["diff"] == 0.15 and gain["paired"]["low"] > 0
    assert "teacher 40.0%, labels-only 60.0%, distilled 75.0%; gain +15.0 points" in gain["line"]
    assert "Warning: the teacher is below the labels-only student" in gain["line"]
    from compress.results.report import write_report

    report = write_report(str(tmp_path), rows=[], title="title", preamble=[gain["line"]])
    lines = open(report).read().split("\n")
    assert lines[0] == "# title" and lines[2] == gain["line"] and lines[4] == "## Machine"
    trials = summary.student_trials(gain, model="m", input_size=64)
    assert [(t["stage"], t["distill.kind"], t["top1"]) for t in trials] == [
        ("baseline", "none", 0.6), ("distill", "soft", 0.75)]
    assert all(t["gain"] == 0.15 and t["teacher_top1"] == 0.4 for t in trials)


def test_without_baseline_the_line_says_so(tmp_path):
    labels = np.arange(50) % 10
    wd = _workdir(tmp_path, labels, teacher=40, distill=30)
    gain = summary.distillation_gain(wd, labels, kind="hard")
    assert gain["paired"] is None and "no labels-only baseline" in gain["line"]
    assert "teacher 80.0%, distilled 60.0%" in gain["line"]
    # predictions made on another validation split are not paired
    assert summary.load_predictions(wd / "teacher", 49) is None
