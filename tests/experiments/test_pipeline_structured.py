"""Structured pruning in the pipeline (the smoke preset): the prune stage cuts the distilled
student to a smaller dense model that `prune/model.json` rebuilds without compress/structured.py,
and QAT and export work from it (its files smaller than the dense ones, its int8 files on the
dense file's fast path).

MobileViT-XXS (the quick preset's student: heads cut by count) runs in the default tier;
Mobile-Former-52M (its Formers' heads cut by index, the costliest graph to convert: about five
minutes on two idle cores) in the slow tier."""

import json

import pytest

import models
from compress.measure.costs import static_costs
from compress.tflite.audit import audit_tflite
from tests.helpers import run_pipeline

KEEP = 0.8
HEADS = 4  # attention heads of every transformer block, both families


@pytest.mark.parametrize("student", [
    "mobilevit_xxs", pytest.param("mobile_former_52m", marks=pytest.mark.slow)])
def test_structured_smoke_run_cuts_and_later_stages_use_the_cut(smoke_teacher, student):
    """From the smoke run's teacher, 2 steps per training stage and the formats read here."""
    workdir, data = smoke_teacher
    run_pipeline(workdir, data, "--stages=distill,prune,qat,export",
                 "--config.distill.baseline=false", "--config.prune.method=structured",
                 f"--config.prune.keep={KEEP}", "--config.distill.steps=2",
                 "--config.distill.warmup_steps=1", "--config.prune.steps=2",
                 "--config.qat.steps=2", "--config.export.formats.distill=('fp32', 'int8')",
                 "--config.export.formats.prune=('fp32', 'int8')", student=student)

    spec = json.loads((workdir / "prune" / "model.json").read_text())
    widths = spec["overrides"]["widths"]
    assert set(widths) == {"expand", "mlp", "heads"}
    for h in widths["heads"]:  # a count (MobileViT) or the kept heads' indices (Mobile-Former)
        assert (1 <= h <= HEADS) if isinstance(h, int) else (h and set(h) <= set(range(HEADS)))
    cut = models.create_model(spec["name"], num_classes=spec["num_classes"],
                              input_size=64, **spec["overrides"])
    cut.load_weights(str(workdir / "prune" / "weights.h5"))  # rebuilt from model.json alone
    dense = models.create_model(student, num_classes=spec["num_classes"], input_size=64)
    kept = static_costs(cut, 64)["macs"] / static_costs(dense, 64)["macs"]
    summary = json.loads((workdir / "prune" / "structured.json").read_text())
    assert abs(summary["kept_fraction"] - kept) < 1e-9 and KEEP - 0.1 < kept <= KEEP
    assert cut.count_params() < dense.count_params()

    export = workdir / "export"
    size = {p.name.split(".", 1)[1]: p.stat().st_size for p in export.glob("*.tflite")}
    assert size["prune.fp32.tflite"] < size["distill.fp32.tflite"]
    assert size["prune.int8.tflite"] < size["distill.int8.tflite"]
    assert "qat.int8.tflite" in size  # QAT trained from the cut model and exported
    dense_audit = audit_tflite(str(export / f"{student}.distill.int8.tflite"))
    for name in ("prune.int8", "qat.int8"):
        audit = audit_tflite(str(export / f"{student}.{name}.tflite"))
        assert audit["partitions"] == 1 and audit["undelegated_ops"] == {}, name
        # no float op the dense int8 file lacks (QAT's file quantizes even the stride-2
        # channel-multiplier depthwise convs that post-training int8 keeps float)
        extra = {op: n for op, n in audit["float_heavy_by_op"].items()
                 if n > dense_audit["float_heavy_by_op"].get(op, 0)}
        assert extra == {}, (name, extra)
    assert (audit_tflite(str(export / f"{student}.prune.int8.tflite"))["float_heavy_by_op"]
            == dense_audit["float_heavy_by_op"])
