"""The report stage: report.md (its only writer: the distillation gain, the teacher, provenance,
the results table, the training stages), the plots, and the HParams view in tb/hparams."""

from __future__ import annotations

import glob

from experiments.stages.context import Run
from experiments.workdir import StageDir


def run(ctx: Run, stage: StageDir) -> None:
    from compress.results import table
    from compress.results.hparams import write_hparams
    from compress.results.report import write_report
    from experiments import fingerprint, summary

    stage.begin({})
    gain = ctx.distillation_gain()
    rows = table.read_results(str(ctx.workdir))  # the benchmark's, with the training figures
    report = write_report(
        str(ctx.workdir), rows=rows,
        title=f"{ctx.student} from {ctx.teacher_arg} ({ctx.cfg.preset} preset)",
        preamble=[gain["line"], "", teacher_line(ctx), "",
                  *fingerprint.report_lines(ctx.workdir)],
        appendix=training_lines(ctx))
    write_hparams(str(ctx.workdir), [
        *({**r, "distill.kind": ctx.cfg.distill.kind} for r in rows),  # each file's student
        *summary.student_trials(gain, model=ctx.student, input_size=ctx.export_size)])
    stage.finish({"report": report,
                  "plots": sorted(glob.glob(str(ctx.workdir / "*.png")))})


def training_lines(ctx: Run) -> list[str]:
    """report.md's table of the training stages: Keras top-1, steps, minutes."""
    lines = ["## Training stages (Keras, validation split)", "",
             "| stage | val top-1 | steps | minutes | note |", "|---|---|---|---|---|"]
    for name in ("teacher", "distill", "prune", "qat"):
        m = StageDir(ctx.workdir, name).metrics()
        if not m:
            continue
        note = {"teacher": f"{ctx.teacher_arg}: head {m.get('head', 'trained')}",
                "distill": f"{ctx.cfg.distill.kind} KD, alpha {ctx.cfg.distill.alpha}, "
                           f"T {ctx.cfg.distill.temperature}" + (
                               f", teacher cache of {m['teacher_cache']['views']} views"
                               if m.get("teacher_cache") else ""),
                "prune": f"sparsity {m.get('sparsity', float('nan')):.3f}",
                "qat": "fake-quant model"}[name]
        minutes = f"{m['wall_s'] / 60:.1f}" if m.get("wall_s") else ""
        lines.append(f"| {name} | {_pct(m.get('val_top1'))} | {m.get('step', '')} | "
                     f"{minutes} | {note} |")
        if name == "distill" and m.get("baseline_val_top1") is not None:
            lines.append(f"| labels-only baseline | {_pct(m['baseline_val_top1'])} | | | "
                         "same student, steps and data, no teacher |")
    return lines


def teacher_line(ctx: Run) -> str:
    """report.md's second line: where the teacher came from, how its head was made, its
    top-1, and what its cached outputs cost."""
    t = StageDir(ctx.workdir, "teacher")
    if not t.done:
        return "Teacher: not run in this workdir."
    spec, m = t.model_json(), t.metrics()
    rec = spec.get("kind") and spec
    what = (f"{rec['architecture']} ({rec['kind']}, weights {rec['weights']}), head "
            f"{rec.get('head') or 'as saved'}" if rec else spec["name"])
    line = (f"Teacher: {what}; top-1 {_pct(m.get('val_top1'))} at {spec.get('input_size')} px "
            f"(Keras, whole validation split), {m.get('step', 0)} training steps.")
    cache = StageDir(ctx.workdir, "distill").metrics().get("teacher_cache")
    if cache:
        line += (f" Teacher cache: {cache['views']} views per image, "
                 f"{cache.get('build_s_this_stage', 0) / 60:.1f} min to build "
                 f"({cache['bytes'] / 2**20:.1f} MiB).")
    return line


def _pct(value) -> str:
    return "" if value is None else f"{100 * float(value):.1f}%"
